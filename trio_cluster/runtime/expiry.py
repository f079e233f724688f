"""Deadlines of callers waiting for a reply slot, kept by one task, not a cancel scope each.

A volatile ``ask`` spends almost all its time waiting for its reply slot,
which the link or the local entity resolves. Bounding that wait with a Trio
cancel scope of its own costs as much as a sixth of the CPU the whole ask
spends in its caller (profiled under 100 concurrent senders:
``CancelScope.__enter__``, ``__exit__`` and ``move_on_after`` took 18% of
the client process), so the deadline is kept here instead: a waiting slot is
filed in the bucket of its deadline (``GRAIN`` wide, rounded up, so a wait
never expires early), and one task expires each bucket when its time comes.

A slot answered first leaves its bucket at once: what is filed is bounded by
the callers waiting now (the heap of bucket times by twice that, plus a
little), and the task wakes at most once per bucket. While
the task is not running (before the runner started it, after it stopped) a
wait takes the cancel scope after all. Slots still filed when the task stops
(the runner is closing) are failed with ``RunnerUnavailable``: nothing that
could answer them is left running.
"""

from __future__ import annotations

import heapq
import math

import trio

from ..core import reply as replies
from ..errors import RunnerUnavailable
from .replies import ReplySlot

GRAIN = 0.005
"""Width of a bucket, seconds: how late a wait may expire, at most."""

_SLACK = 64
"""Ticks of emptied buckets the heap may keep beyond twice the live ones."""

_CLOSED = replies.cluster_error(
    RunnerUnavailable("the runner closed while the caller waited for the reply")
)


class Expiries:
    """Reply slots waiting with a deadline, by bucket of deadline."""

    def __init__(self, grain: float = GRAIN) -> None:
        self._grain = grain
        self._buckets: dict[int, set[ReplySlot]] = {}
        self._ticks: list[int] = []
        """Heap of the buckets' ticks; a tick whose bucket emptied stays until it is reached."""
        self._soonest = math.inf
        """When the task wakes next, by itself (a sooner bucket wakes it)."""
        self._wake = trio.Event()
        self._running = False

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    async def wait(self, slot: ReplySlot, deadline: float) -> bytes | None:
        """The reply ``slot`` receives; None once ``deadline`` (Trio's clock) passed."""
        if deadline == math.inf:
            return await slot.wait()
        if not self._running:
            with trio.move_on_at(deadline):
                return await slot.wait()
            return None
        tick = self._file(slot, deadline)
        try:
            reply = await slot.wait()
        finally:
            self._unfile(slot, tick)
        return None if slot.expired else reply

    def _file(self, slot: ReplySlot, deadline: float) -> int:
        tick = math.ceil(deadline / self._grain)
        if tick * self._grain < deadline:  # the division rounded down
            tick += 1
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
            if tick * self._grain < self._soonest:
                self._wake.set()
        bucket.add(slot)
        return tick

    def _unfile(self, slot: ReplySlot, tick: int) -> None:
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.discard(slot)
            if not bucket:
                del self._buckets[tick]
                # The ticks of emptied buckets wait in the heap until they are due, and
                # far deadlines (a long timeout) would pile them up: rebuild it then.
                if len(self._ticks) > 2 * len(self._buckets) + _SLACK:
                    self._ticks = list(self._buckets)
                    heapq.heapify(self._ticks)

    def expire(self, now: float) -> float:
        """Expire every bucket due at ``now``; the time the next one is due (inf: none)."""
        ticks = self._ticks
        while ticks:
            tick = ticks[0]
            due = tick * self._grain
            bucket = self._buckets.get(tick)
            if bucket is not None and due > now:
                return due
            heapq.heappop(ticks)
            if bucket is not None:
                del self._buckets[tick]
                for slot in bucket:
                    slot.expire()
        return math.inf

    async def run(self) -> None:
        """Expire the waits whose deadline passed, until cancelled."""
        self._running = True
        try:
            while True:
                self._wake = trio.Event()
                self._soonest = self.expire(trio.current_time())
                with trio.move_on_at(self._soonest):
                    await self._wake.wait()
        finally:
            self._running = False
            self._soonest = math.inf
            buckets, self._buckets, self._ticks = self._buckets, {}, []
            for bucket in buckets.values():
                for slot in bucket:
                    slot.resolve(_CLOSED)
