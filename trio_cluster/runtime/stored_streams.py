"""Persisted streams: the owner's end, which stores chunks, and the caller's, which reads them.

A persisted stream never travels as stream frames, as a persisted request
never travels as a Request frame: storage is between its two ends. The
owner stores chunk ``seq`` (fenced by its lease), then waits while
``seq - acked`` reaches the window, woken by ack notices; the caller takes
chunks from chunk notices, or reads them from storage after a missed
notice, drops those below its next index, and acknowledges half a window
at a time. The stored reply ends the stream. So after a crash or a shard
move the new owner runs the handler again with ``resume_from`` the stored
ack, and the caller, which drops what it already has, sees each chunk once.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import msgspec
import trio

from ..core import reply as replies
from ..core.envelope import Envelope
from ..entity import Rpc
from ..errors import ClusterError, SendTimeout, SerializationError
from ..storage.base import Lease, StreamStorage
from .replies import ReplySlot

C = TypeVar("C")

_END = msgspec.msgpack.Decoder(type(None))
"""A stream's end decodes as None (the handler returned) or raises its error."""


class StreamWatch:
    """What notices told one end of one persisted stream since it last looked.

    ``chunks`` holds those a chunk notice carried, from the caller's next
    index on and at most a window of them; ``reread`` says storage may hold
    more than notices said (a notice without its chunk, a Gap).
    """

    __slots__ = ("_changed", "chunks", "low", "reread", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.low = 0
        """The caller's next index: chunks below it are dropped."""
        self.chunks: dict[int, bytes] = {}
        self.reread = True
        self._changed = trio.Event()

    def armed(self) -> trio.Event:
        """The event the next notice sets (a fresh one once the last was set)."""
        if self._changed.is_set():
            self._changed = trio.Event()
        return self._changed

    def chunk(self, seq: int, chunk: bytes | None) -> None:
        if seq < self.low:
            return
        if chunk is None or seq >= self.low + self.window:
            self.reread = True
        else:
            self.chunks.setdefault(seq, chunk)
        self._changed.set()

    def wake(self, *, reread: bool = False) -> None:
        self.reread = self.reread or reread
        self._changed.set()


class StreamWatchers:
    """The ends of persisted streams on this runner, by request id, fed by notices:
    callers hear of chunks, owners of acks (a stream's two ends may share a runner)."""

    def __init__(self) -> None:
        self._callers: dict[int, list[StreamWatch]] = {}
        self._owners: dict[int, list[StreamWatch]] = {}

    def caller(self, request_id: int, window: int) -> StreamWatch:
        return _add(self._callers, request_id, window)

    def owner(self, request_id: int, window: int) -> StreamWatch:
        return _add(self._owners, request_id, window)

    def forget(self, request_id: int, watch: StreamWatch) -> None:
        for watching in (self._callers, self._owners):
            watches = watching.get(request_id, [])
            if watch in watches:
                watches.remove(watch)
                if not watches:
                    del watching[request_id]

    def chunk_stored(self, request_id: int, seq: int, chunk: bytes | None) -> None:
        for watch in self._callers.get(request_id, ()):
            watch.chunk(seq, chunk)

    def acked(self, request_id: int) -> None:
        for watch in self._owners.get(request_id, ()):
            watch.wake()

    def gap(self) -> None:
        """Notices were missed: every end looks in storage again."""
        for watching in (self._callers, self._owners):
            for watches in watching.values():
                for watch in watches:
                    watch.wake(reread=True)


def _add(watching: dict[int, list[StreamWatch]], request_id: int, window: int) -> StreamWatch:
    watch = StreamWatch(window)
    watching.setdefault(request_id, []).append(watch)
    return watch


class StoredChunkSink:
    """The owner's end: stores each chunk the handler yields, at most a window past the ack."""

    __slots__ = ("_lease", "_request_id", "_storage", "_watch", "_window", "acked", "seq")

    def __init__(
        self,
        storage: StreamStorage,
        watch: StreamWatch,
        lease: Lease,
        request_id: int,
        acked: int,
    ) -> None:
        self._storage = storage
        self._watch = watch
        self._lease = lease
        self._request_id = request_id
        self._window = watch.window
        self.acked = acked
        self.seq = acked
        """The next chunk's index: the handler was run with ``resume_from`` the stored ack."""

    async def send_chunk(self, chunk: bytes) -> None:
        while self.seq - self.acked >= self._window:
            changed = self._watch.armed()
            self.acked = max(self.acked, await self._storage.acked(self._request_id))
            if self.seq - self.acked < self._window:
                break
            await changed.wait()
        await self._storage.save_chunk(self._request_id, self.seq, chunk, self._lease)
        self.seq += 1


class StoredChunks(Generic[C]):
    """What ``Client.stream`` yields for a persisted stream: its chunks from ``start``, in order.

    Each chunk is waited for at most ``timeout`` seconds (SendTimeout); the
    stream ends with its stored reply, after every chunk.
    """

    def __init__(
        self,
        *,
        storage: StreamStorage,
        watch: StreamWatch,
        reply: ReplySlot,
        rpc: Rpc[Any, C],
        envelope: Envelope,
        request_id: int,
        start: int,
        timeout: float,
        origin: int,
    ) -> None:
        self._storage = storage
        self._watch = watch
        self._reply = reply
        self._rpc = rpc
        self._entity_id = envelope.entity_id
        self._request_id = request_id
        self._timeout = timeout if timeout > 0 else math.inf
        self._origin = origin
        self._batch = (watch.window + 1) // 2
        self._sent_ack = start
        watch.low = start
        self.outcome = "cancelled"
        """For the instruments: how the stream ended, as far as its caller read it."""

    def __aiter__(self) -> AsyncIterator[C]:
        return self

    async def __anext__(self) -> C:
        try:
            chunk = await self._next_chunk()
            if chunk is not None:
                return self._decode(chunk)
            replies.decode(
                self._reply.reply,
                _END,
                self._rpc.errors_by_name,
                entity_id=self._entity_id,
                request_id=self._request_id,
            )
        except ClusterError as error:
            self.outcome = error.reason
            raise
        except self._rpc.errors:
            self.outcome = "error"
            raise
        self.outcome = "success"
        raise StopAsyncIteration

    async def _next_chunk(self) -> bytes | None:
        """The next chunk, or None once the stored reply came after the last one."""
        watch = self._watch
        while True:
            changed = watch.armed()
            chunk = watch.chunks.pop(watch.low, None)
            if chunk is not None:
                await self._consumed()
                return chunk
            ended = self._reply.answered
            if watch.reread or ended:
                # The reply is stored after every chunk: read after it, storage has them all.
                watch.reread = False
                for seq, stored in await self._storage.chunks(
                    self._request_id, watch.low, watch.window
                ):
                    watch.chunk(seq, stored)
                if watch.low in watch.chunks:
                    continue
                if ended:
                    return None
            with trio.move_on_after(self._timeout) as waited:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_reply, self._reply, nursery.cancel_scope)
                    await changed.wait()
                    nursery.cancel_scope.cancel()
            if waited.cancelled_caught:
                raise SendTimeout(
                    f"no chunk of {self._rpc!r} within {self._timeout} s",
                    entity_id=self._entity_id,
                    request_id=self._request_id,
                )

    async def _consumed(self) -> None:
        """Count the chunk taken; acknowledge every ``window / 2`` of them."""
        watch = self._watch
        watch.low += 1
        if watch.low - self._sent_ack >= self._batch:
            await self._storage.ack(self._request_id, watch.low, self._origin)
            self._sent_ack = watch.low

    def _decode(self, chunk: bytes) -> C:
        try:
            value: C = self._rpc.success_decoder.decode(chunk)
        except msgspec.MsgspecError as exc:
            raise SerializationError(
                f"cannot decode a chunk of {self._rpc!r}: {exc}",
                entity_id=self._entity_id,
                request_id=self._request_id,
            ) from exc
        return value


async def _cancel_on_reply(reply: ReplySlot, scope: trio.CancelScope) -> None:
    """End the caller's wait for a notice when the reply comes first."""
    await reply.wait()
    scope.cancel()
