"""The call a task is making or handling: the call chain, the request being handled, and
what instruments see of both.

Context variables set by the entity task for each request it takes, read by
``ask`` (the call chain, against deadlock) and by handlers (their request).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import attrs

from ..core.envelope import Envelope
from ..core.hashing import ShardId

if TYPE_CHECKING:
    from .context import EntityAddress

call_chain: ContextVar[tuple[str, ...]] = ContextVar("trio_cluster_call_chain", default=())
"""Turn-based entities waiting, up the stack, on the code running now.

Set by the entity task for each message; read by ``ask`` to refuse a call
that would wait on one of them (A asks A, or A asks B asks A), which at
concurrency 1 can never be answered.
"""


class _Request:
    """What a call and a handling share: the request, the runner, the start time and the
    instruments' scratch space (``notes``, made on first use)."""

    __slots__ = ("_notes", "envelope", "runner", "started")

    def __init__(self, envelope: Envelope, runner: str) -> None:
        self.envelope = envelope
        self.runner = runner
        """The address of the runner sending (a call) or handling (a handling) it."""
        self.started = time.perf_counter()
        """When it began (``time.perf_counter()``)."""
        self._notes: dict[object, object] | None = None

    @property
    def notes(self) -> dict[object, object]:
        if self._notes is None:
            self._notes = {}
        return self._notes

    @property
    def request_id(self) -> int:
        return self.envelope.request_id

    @property
    def entity_type(self) -> str:
        return self.envelope.entity_type

    @property
    def entity_id(self) -> str:
        return self.envelope.entity_id

    @property
    def rpc(self) -> str:
        return self.envelope.rpc

    @property
    def shard(self) -> ShardId:
        return ShardId(self.envelope.shard_group, self.envelope.shard_index)

    @property
    def persisted(self) -> bool:
        return self.envelope.persisted


class Call(_Request):
    """One ``ask``, ``tell`` or ``stream`` as its caller sends it: what an instrument sees of it.

    ``headers`` may be added to in ``request_sent`` (they are sent with the
    request); ``notes`` is the instruments' own scratch space for this call.
    """

    __slots__ = ("headers", "kind")

    def __init__(self, envelope: Envelope, kind: str, runner: str) -> None:
        super().__init__(envelope, runner)
        self.kind = kind
        """``"ask"``, ``"tell"`` or ``"stream"``."""
        self.headers = dict(envelope.headers)


class Handling(_Request):
    """What the running task handles: one request, as delivered, and the attempt at it.

    Also what instruments see of a request being handled (``notes`` is their
    scratch space for it).
    """

    __slots__ = ("address", "attempt", "redelivered", "resume_from", "suspended_on")

    def __init__(
        self, envelope: Envelope, redelivered: bool, address: EntityAddress, runner: str
    ) -> None:
        super().__init__(envelope, runner)
        self.redelivered = redelivered
        """Read back by a redelivery scan: it may have run before (see RequestInfo)."""
        self.address = address
        self.attempt = 1
        self.suspended_on: str | None = None
        """The deferred the handler's last run suspended on (see ``ctx.deferred``)."""
        self.resume_from = 0
        """A persisted stream's first chunk to yield: the stored ack (see RequestInfo)."""

    @property
    def headers(self) -> Mapping[str, str]:
        return self.envelope.headers


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
    resume_from: int = 0
    """A persisted stream's handler yields chunk ``resume_from`` first: the chunks its
    caller acknowledged (0 on the first run) are never produced again."""

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
            resume_from=handling.resume_from,
        )


def handling(
    envelope: Envelope,
    redelivered: bool,
    chain: tuple[str, ...],
    address: EntityAddress,
    runner: str,
) -> Handling:
    """Enter the context of one request, in the task that is about to handle it."""
    call_chain.set(envelope.call_chain + chain)
    current = Handling(envelope, redelivered, address, runner)
    current_request.set(current)
    return current
