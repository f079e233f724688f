"""Requests held back until their ``deliver_at``: one heap per shard, bounded.

No I/O and no Trio here; the shard's timer task asks when the next one is
due and takes what is. The bound is what keeps a sender of far-future
requests from growing the runner without limit: a volatile request past it
is refused (MailboxFull, the sender may retry); a persisted one is already
in storage, so it is simply not held in memory, and :attr:`overflow_due`
remembers the earliest such request, when the shard reads storage again.
"""

from __future__ import annotations

import heapq
import itertools

from ..errors import MailboxFull
from .delivery import Delivery


class Scheduled:
    __slots__ = ("_capacity", "_heap", "_order", "_persisted", "overflow_due")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # (due ms, arrival order, delivery): equal times keep their arrival order,
        # and deliveries themselves are never compared.
        self._heap: list[tuple[int, int, Delivery]] = []
        self._order = itertools.count()
        # Persisted request ids held, so a request read again is not held twice.
        self._persisted: set[int] = set()
        self.overflow_due: int | None = None
        """The earliest due time of a persisted request left in storage for want of room."""

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, delivery: Delivery, due: int) -> None:
        """Hold ``delivery`` until ``due`` (Unix ms); MailboxFull if volatile and past the bound."""
        envelope = delivery.envelope
        if envelope.persisted:
            if envelope.request_id in self._persisted:
                return
            if len(self._heap) >= self._capacity:
                if self.overflow_due is None or due < self.overflow_due:
                    self.overflow_due = due
                return
            self._persisted.add(envelope.request_id)
        elif len(self._heap) >= self._capacity:
            raise MailboxFull(
                f"shard holds {self._capacity} requests waiting for their deliver_at",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        heapq.heappush(self._heap, (due, next(self._order), delivery))

    def discard(self, request_id: int) -> None:
        """Forget a persisted request held here (a timer cancelled or replaced in storage)."""
        if request_id in self._persisted:
            self._persisted.discard(request_id)
            self._heap = [held for held in self._heap if held[2].envelope.request_id != request_id]
            heapq.heapify(self._heap)

    def next_due(self) -> int | None:
        """When something is next due: a held request, or the read-back of an overflow."""
        candidates = [self._heap[0][0]] if self._heap else []
        if self.overflow_due is not None:
            candidates.append(self.overflow_due)
        return min(candidates, default=None)

    def pop_due(self, now: int) -> tuple[list[Delivery], bool]:
        """The held requests due by ``now``, in order; and whether storage must be read
        again for persisted requests that did not fit (the overflow is then forgotten)."""
        due: list[Delivery] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            delivery = heapq.heappop(heap)[2]
            if delivery.envelope.persisted:
                self._persisted.discard(delivery.envelope.request_id)
            due.append(delivery)
        overflowed = self.overflow_due is not None and self.overflow_due <= now
        if overflowed:
            self.overflow_due = None
        return due, overflowed

    def clear(self) -> list[Delivery]:
        """Give up everything held (the shard is stopping)."""
        held = [delivery for _, _, delivery in self._heap]
        self._heap.clear()
        self._persisted.clear()
        self.overflow_due = None
        return held
