"""What a handler knows about itself and the request it handles, and the call chain.

A handler never sees its callers' context variables: entity tasks run in a
copy of the context of the task that opened the runner (taken when
``open_runner`` was entered), whoever activated the entity. What a request
carries for its handler travels explicitly, in the envelope: its headers,
readable through :attr:`EntityContext.request`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import attrs

from ..core.envelope import Envelope
from ..core.hashing import ShardId

if TYPE_CHECKING:
    from .client import Client

call_chain: ContextVar[tuple[str, ...]] = ContextVar("trio_cluster_call_chain", default=())
"""Turn-based entities waiting, up the stack, on the code running now.

Set by the entity task for each message; read by ``ask`` to refuse a call
that would wait on one of them (A asks A, or A asks B asks A), which at
concurrency 1 can never be answered.
"""

_current_request: ContextVar[RequestInfo | None] = ContextVar(
    "trio_cluster_current_request", default=None
)


@attrs.frozen
class EntityAddress:
    entity_type: str
    entity_id: str
    shard: ShardId

    def __str__(self) -> str:
        return f"{self.entity_type}/{self.entity_id}@{self.shard}"


@attrs.frozen
class RequestInfo:
    """The request a handler is handling now, as its sender sent it."""

    request_id: int
    rpc: str
    headers: Mapping[str, str]
    """What the sender attached (``ask(..., headers=...)``); stored with persisted requests."""
    persisted: bool
    deliver_at: datetime | None
    """When the sender asked for it to be handled, if it did (UTC)."""

    @classmethod
    def of(cls, envelope: Envelope) -> RequestInfo:
        due = envelope.deliver_at_ms
        return cls(
            request_id=envelope.request_id,
            rpc=envelope.rpc,
            headers=envelope.headers,
            persisted=envelope.persisted,
            deliver_at=None if due is None else datetime.fromtimestamp(due / 1000, UTC),
        )


def handling(envelope: Envelope, chain: tuple[str, ...]) -> None:
    """Enter the context of one request, in the task that is about to handle it."""
    call_chain.set(envelope.call_chain + chain)
    _current_request.set(RequestInfo.of(envelope))


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

    @property
    def request(self) -> RequestInfo:
        """The request being handled by the task that asks (LookupError outside a handler)."""
        info = _current_request.get()
        if info is None:
            raise LookupError("no request is being handled here (outside a handler method)")
        return info
