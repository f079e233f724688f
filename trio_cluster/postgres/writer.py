"""Group commit: concurrent writes of one kind go to the server in batches.

A writer task takes whatever is queued when it is free and writes it in one
statement, so one transaction and one WAL flush serve the whole batch. There
is no timer: batches grow only while the server is busy with the previous one
(the "natural batching" of group commit). A lone write, one that finds nothing
being written and nothing queued while traffic is light (the previous statement
carried one write), is written by its caller's own task instead of being handed
over: the hand-over cost two passes through the scheduler, a tenth of a lone
write's time on a busy machine. Under load the writer takes every write: the
callers woken together by one batch's commit write again together, and the
first of them, written alone, would split what the writer's next batch takes
in one statement. Either way one statement of a kind is out at a time, in the
order the writes came. A waiter is answered when
its batch's statement has returned, that is after its commit; a caller
cancelled during its own lone write abandons the statement (the driver cancels
it), so, as with a queued write it stops waiting for, it cannot know whether
the write was committed.

The queue is bounded: when it is full, writers wait to enqueue (back-pressure
to senders) instead of growing memory.

A batch that the server refuses as a whole (one bad row, a deadlock) is
written again one item at a time, so one bad item fails alone. A lost
connection fails the whole batch, each waiter with the storage's error: none
of them was acknowledged, and each caller retries as it would alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

from ..errors import ClusterError, PersistenceError
from ..pgdriver.errors import ConnectionLost
from .batching import split_conflicts
from .boundary import translated

log = logging.getLogger("trio_cluster.postgres.writer")

T = TypeVar("T")
R = TypeVar("R")


class _Pending(Generic[T, R]):
    __slots__ = ("done", "item", "outcome")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = trio.Event()
        self.outcome: R | BaseException | None = None

    def settle(self, outcome: R | BaseException) -> None:
        if not self.done.is_set():
            self.outcome = outcome
            self.done.set()


class GroupWriter(Generic[T, R]):
    """Writes items of one kind in batches through ``write``, for as long as it runs.

    ``write`` gets a batch (no key of ``keys`` twice in it) and returns one outcome
    per item, in order; it raises when the server refused the statement as a whole.
    """

    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], Awaitable[list[R | ClusterError]]],
        *,
        keys: Callable[[T], Sequence[Hashable]] = lambda _: (),
        max_batch: int = 200,
        capacity: int = 1000,
    ) -> None:
        self.name = name
        self._write = write
        self._keys = keys
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_Pending[T, R]](capacity)
        self._open = False
        self._busy = False
        """A statement is out (the writer's batch or a caller's lone write)."""
        self._queued = 0
        """Writes handed to the queue and not yet in a batch being written (the channel
        hands one straight to a waiting writer, which may not have run yet)."""
        self._light = True
        """The previous statement carried one write: traffic is light."""
        self._idle = trio.Event()
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """Queue ``item`` (waiting while the queue is full) and return its outcome once
        its batch is committed; raise its error."""
        pending: _Pending[T, R] = _Pending(item)
        if self._lone():
            await trio.lowlevel.checkpoint_if_cancelled()
            self._busy = True
            try:
                await self._write_all([pending])
            finally:
                self._done_writing()
        else:
            self._queued += 1
            try:
                await self._send.send(pending)
            except BaseException as error:
                self._queued -= 1
                if isinstance(error, trio.ClosedResourceError | trio.BrokenResourceError):
                    raise PersistenceError(f"cannot {self.name}: the storage is closed") from None
                raise
            await pending.done.wait()
        outcome = pending.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value] # settled, so an R

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the writer task for the block; then fail what is still queued."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run, name=f"{self.name} writer")
            self._open = True
            try:
                yield
            finally:
                self._open = False
                nursery.cancel_scope.cancel()
        self._send.close()
        closed = PersistenceError(f"cannot {self.name}: the storage is closed")
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                self._receive.receive_nowait().settle(closed)

    def _lone(self) -> bool:
        """Whether a write now would be alone: none out, none queued before it, and
        none came with the previous one."""
        return self._open and self._light and not self._busy and not self._queued

    def _done_writing(self) -> None:
        self._busy = False
        self._idle.set()
        self._idle = trio.Event()

    async def _run(self) -> None:
        async for first in self._receive:
            try:
                while self._busy:
                    await self._idle.wait()  # a caller's lone write, begun before ours came
            except BaseException:
                # Cancelled (the storage closing): the write taken is not in the channel
                # any more, so the drain after the writer would not find it.
                first.settle(PersistenceError(f"cannot {self.name}: the storage is closed"))
                raise
            batch = [first]
            with contextlib.suppress(trio.WouldBlock):
                while len(batch) < self._max_batch:
                    batch.append(self._receive.receive_nowait())
            self._busy = True
            self._queued -= len(batch)
            try:
                await self._write_all(batch)
            finally:
                self._done_writing()

    async def _write_all(self, batch: list[_Pending[T, R]]) -> None:
        """Write ``batch`` and settle each of its waiters, whatever happens."""
        self._light = len(batch) == 1
        try:
            for part in split_conflicts(batch, lambda p: self._keys(p.item)):
                await self._write_batch(part)
        except Exception:
            # A bug, not the database: this batch fails (each waiter gets an
            # error), the writer goes on.
            log.exception("%s: writing a batch of %s failed", self.name, len(batch))
            failed = PersistenceError(f"cannot {self.name}: internal error")
            for pending in batch:
                pending.settle(failed)
        finally:
            # Cancelled mid-batch (the storage closing): nobody is left waiting.
            closed = PersistenceError(f"cannot {self.name}: the storage is closed")
            for pending in batch:
                pending.settle(closed)

    async def _write_batch(self, batch: list[_Pending[T, R]]) -> None:
        try:
            with translated(self.name):
                outcomes = await self._write([p.item for p in batch])
        except ClusterError as error:
            lost = isinstance(error.__cause__, ConnectionLost | OSError)
            if lost or len(batch) == 1:
                for pending in batch:
                    pending.settle(error)
                return
            log.info(
                "%s: a batch of %s was refused (%s); writing its items one by one",
                self.name,
                len(batch),
                error,
            )
            for pending in batch:
                await self._write_batch([pending])
            return
        self.batches += 1
        self.items += len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.settle(outcome)
