"""What a handler knows about itself and the request it handles.

A handler never sees its callers' context variables: entity tasks run in a
copy of the context of the task that opened the runner (taken when
``open_runner`` was entered), whoever activated the entity. What a request
carries for its handler travels explicitly, in the envelope: its headers,
readable through :attr:`EntityContext.request`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from ..core.hashing import ShardId
from .calls import RequestInfo, current_request

if TYPE_CHECKING:
    from .client import Client


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
    hanging.
    """

    address: EntityAddress
    client: Client
    runner_address: str
    _is_draining: Callable[[], bool] = attrs.field(default=_never, alias="is_draining", repr=False)

    @property
    def request(self) -> RequestInfo:
        """The request being handled by the task that asks (LookupError outside a handler)."""
        current = current_request.get()
        if current is None:
            raise LookupError("no request is being handled here (outside a handler method)")
        return RequestInfo.of(current)

    @property
    def draining(self) -> bool:
        """Whether the entity's shard is being handed off: finish up, take nothing long on."""
        return self._is_draining()
