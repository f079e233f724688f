"""What a handler knows about itself and the request it handles.

A handler never sees its callers' context variables: entity tasks run in a
copy of the context of the task that opened the runner (taken when
``open_runner`` was entered), whoever activated the entity. What a request
carries for its handler travels explicitly, in the envelope: its headers,
readable through :attr:`EntityContext.request`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import attrs

from ..core.hashing import ShardId
from .calls import RequestInfo, current_request

if TYPE_CHECKING:
    from .client import Client
    from .deferreds import EntityDeferreds
    from .timers import EntityTimers

T = TypeVar("T")


@attrs.frozen
class EntityAddress:
    entity_type: str
    entity_id: str
    shard: ShardId

    def __str__(self) -> str:
        return f"{self.entity_type}/{self.entity_id}@{self.shard}"


def _never() -> bool:
    return False


@attrs.frozen
class EntityContext:
    """Handed to a handler class when an entity is activated.

    ``client`` sends from inside the entity: calls made through it carry
    the call chain, so a cycle back into this entity fails fast instead of
    hanging. ``timers`` arms and cancels the entity's durable timers.
    """

    address: EntityAddress
    client: Client
    runner_address: str
    timers: EntityTimers
    _deferreds: EntityDeferreds = attrs.field(alias="deferreds", repr=False)
    _is_draining: Callable[[], bool] = attrs.field(default=_never, alias="is_draining", repr=False)

    @property
    def request(self) -> RequestInfo:
        """The request being handled by the task that asks (LookupError outside a handler)."""
        current = current_request.get()
        if current is None:
            raise LookupError("no request is being handled here (outside a handler method)")
        return RequestInfo.of(current)

    def resume_token(self, name: str) -> str:
        """The token that completes deferred ``name`` of the persisted request being handled.

        The same on every run of the request: hand it to whoever is to
        complete the deferred (``complete_deferred`` / ``fail_deferred`` on any
        runner's client), then ``await self.deferred(name, ...)``.
        """
        return self._deferreds.token(name)

    async def deferred(self, name: str, result_type: type[T]) -> T:
        """The outcome of deferred ``name`` of the persisted request being handled.

        Completed: its value, decoded as ``result_type``; failed: raises
        DeferredFailed. Not yet: raises Suspended, which ends the handler
        (do not catch it) and suspends the request, stored, until the
        deferred is completed; then the handler runs again from the start
        and this call returns. TypeError in a volatile request.
        """
        return await self._deferreds.outcome(name, result_type)

    @property
    def draining(self) -> bool:
        """Whether the entity's shard is being handed off: finish up, take nothing long on."""
        return self._is_draining()
