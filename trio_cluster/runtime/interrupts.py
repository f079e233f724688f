"""Interrupts of one shard's persisted requests, by request id: pure bookkeeping.

A volatile request is interrupted through its :class:`~.delivery.Delivery`,
which only its caller (or its peer's link) holds. A persisted one is
interrupted through storage: its caller marks it there (so a redelivery
reads the mark and answers ``Interrupted`` without running it) and its
owner hears of it by the storage's notice, with only the request id. The
shard then cancels the handler if one runs it, and otherwise remembers the
id, so that a request it holds in memory already (queued in a mailbox,
waiting for its ``deliver_at``, or in a storage read that began before the
mark) is skipped when it comes up. Persisted request ids come from storage,
never from a peer, so an id names one request.

What is remembered is bounded: the oldest ids go first, and a request
they named is then still found by its stored mark the next time it is read.
"""

from __future__ import annotations

from .delivery import Delivery

MAX_REMEMBERED = 10_000
"""Interrupted ids one shard keeps for requests not running yet."""


class ShardInterrupts:
    __slots__ = ("_limit", "_pending", "_running")

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._pending: dict[int, None] = {}  # an ordered set: oldest first
        self._running: dict[int, Delivery] = {}

    def interrupt(self, request_id: int) -> None:
        """The request's caller withdrew it: cancel its handler, or skip it when it comes up."""
        running = self._running.get(request_id)
        if running is not None:
            running.interrupt()
            return
        self._pending[request_id] = None
        if len(self._pending) > self._limit:
            del self._pending[next(iter(self._pending))]

    def starting(self, delivery: Delivery) -> bool:
        """A handler is about to run ``delivery``: False if it was interrupted already."""
        request_id = delivery.envelope.request_id
        if self._pending.pop(request_id, 0) is None:
            delivery.interrupt()
        if delivery.interrupted:
            return False
        self._running[request_id] = delivery
        return True

    def finished(self, delivery: Delivery) -> None:
        self._running.pop(delivery.envelope.request_id, None)

    def __len__(self) -> int:
        return len(self._pending) + len(self._running)
