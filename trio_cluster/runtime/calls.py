"""The call a task is making or handling: the call chain, and the request being handled.

Context variables set by the entity task for each request it takes, read by
``ask`` (the call chain, against deadlock) and by handlers (their request).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime

import attrs

from ..core.envelope import Envelope

call_chain: ContextVar[tuple[str, ...]] = ContextVar("trio_cluster_call_chain", default=())
"""Turn-based entities waiting, up the stack, on the code running now.

Set by the entity task for each message; read by ``ask`` to refuse a call
that would wait on one of them (A asks A, or A asks B asks A), which at
concurrency 1 can never be answered.
"""


class Handling:
    """What the running task handles: one request, as delivered, and the attempt at it."""

    __slots__ = ("attempt", "envelope", "redelivered")

    def __init__(self, envelope: Envelope, redelivered: bool) -> None:
        self.envelope = envelope
        self.redelivered = redelivered
        self.attempt = 1


current_request: ContextVar[Handling | None] = ContextVar(
    "trio_cluster_current_request", default=None
)
"""The request the running task handles; a RequestInfo is built from it only when asked for."""


@attrs.frozen
class RequestInfo:
    """The request a handler is handling now, as its sender sent it and as it was delivered."""

    request_id: int
    rpc: str
    headers: Mapping[str, str]
    """What the sender attached (``ask(..., headers=...)``); stored with persisted requests."""
    persisted: bool
    deliver_at: datetime | None
    """When the sender asked for it to be handled, if it did (UTC)."""
    redelivered: bool
    """Read back from storage by a redelivery scan (the shard was acquired, or notices were
    missed): an earlier owner may have run it, wholly or in part, without storing its reply."""
    attempt: int
    """1, then 2, 3, ... when the defect policy runs the handler again for this delivery."""

    @classmethod
    def of(cls, handling: Handling) -> RequestInfo:
        envelope = handling.envelope
        due = envelope.deliver_at_ms
        return cls(
            request_id=envelope.request_id,
            rpc=envelope.rpc,
            headers=envelope.headers,
            persisted=envelope.persisted,
            deliver_at=None if due is None else datetime.fromtimestamp(due / 1000, UTC),
            redelivered=handling.redelivered,
            attempt=handling.attempt,
        )


def handling(envelope: Envelope, redelivered: bool, chain: tuple[str, ...]) -> Handling:
    """Enter the context of one request, in the task that is about to handle it."""
    call_chain.set(envelope.call_chain + chain)
    current = Handling(envelope, redelivered)
    current_request.set(current)
    return current
