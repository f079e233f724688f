"""A caller's end of one stream: the chunks received and not yet consumed, then its end.

One object serves both paths. A handler on this runner sends into it
directly (:meth:`StreamSlot.send_chunk` waits for credit, so the handler
suspends at its ``yield`` while the window is full); a handler on another
runner sends over the link, which feeds it (:meth:`StreamSlot.receive_chunk`)
and carries the credits back. Either way at most ``window`` chunks wait
here: a link's chunk beyond that is refused, never queued.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import msgspec
import trio

from ..core import reply as replies
from ..core.envelope import Envelope
from ..core.streaming import ChunkReceiver, ChunkSink, CreditWindow
from ..entity import Rpc
from ..errors import ClusterError, SendTimeout, SerializationError

C = TypeVar("C")

_END = msgspec.msgpack.Decoder(type(None))
"""A stream's end decodes as None (the handler returned) or raises its error."""


class StreamSlot(ChunkSink, ChunkReceiver):
    """One stream's chunks waiting for its caller, at most a window of them, then its end."""

    __slots__ = ("_chunks", "_consumer", "_credit", "_final", "_grant", "_producer")

    def __init__(self, window: int) -> None:
        self._credit = CreditWindow(window)
        self._chunks: deque[bytes] = deque()
        self._final: bytes | None = None
        self._consumer = trio.Event()
        self._producer = trio.Event()
        self._grant: Callable[[int], None] | None = None

    @property
    def window(self) -> int:
        return self._credit.window

    @property
    def answered(self) -> bool:
        """The stream ended (its handler's reply came, or its link failed)."""
        return self._final is not None

    @property
    def final(self) -> bytes | None:
        return self._final

    @property
    def ready(self) -> bool:
        """A chunk or the end is here (the first time: the request reached its handler,
        or was refused)."""
        return bool(self._chunks) or self._final is not None

    def grant_with(self, grant: Callable[[int], None]) -> None:
        self._grant = grant

    async def send_chunk(self, chunk: bytes) -> None:
        while not self._credit.arrived():
            # The caller left: the handler is cancelled here (its delivery interrupted).
            await self._producer.wait()
        self._push(chunk)

    def receive_chunk(self, chunk: bytes) -> bool:
        if self._final is not None:
            return True  # a late chunk of a stream already ended: dropped
        if not self._credit.arrived():
            return False
        self._push(chunk)
        return True

    def resolve(self, reply: bytes) -> None:
        if self._final is None:
            self._final = reply
            self._wake_consumer()

    async def wait_ready(self) -> None:
        while not self.ready:
            await self._consumer.wait()

    async def next(self) -> bytes | None:
        """The next chunk, or None once the stream has ended (its reply in ``final``)."""
        await self.wait_ready()
        return self.take()

    def take(self) -> bytes | None:
        """The next chunk if one is here (its credit granted back as the window says),
        else None: the stream has ended, or nothing came yet."""
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        credits = self._credit.consumed()
        if credits:
            if self._grant is None:
                self._producer.set()
                self._producer = trio.Event()
            else:
                self._grant(credits)
        return chunk

    def _push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        self._consumer.set()
        self._consumer = trio.Event()


class Chunks(Generic[C]):
    """What ``Client.stream`` yields: the stream's chunks, decoded, in order.

    Each chunk is waited for at most ``timeout`` seconds (SendTimeout); the
    stream ends when its handler returns, or raises the error it ended in
    (declared, or a ClusterError) after every chunk it sent.
    """

    def __init__(
        self, slot: StreamSlot, rpc: Rpc[Any, C], envelope: Envelope, timeout: float
    ) -> None:
        self._slot = slot
        self._rpc = rpc
        self._entity_id = envelope.entity_id
        self._request_id = envelope.request_id
        self._timeout = timeout if timeout > 0 else math.inf
        self.outcome = "cancelled"
        """For the instruments: how the stream ended, as far as its caller read it."""

    def __aiter__(self) -> AsyncIterator[C]:
        return self

    async def __anext__(self) -> C:
        rpc = self._rpc
        slot = self._slot
        # A chunk already here is taken without a cancel scope, which would cost
        # more than the rest of the chunk's way; a cancellation is still seen.
        await trio.lowlevel.checkpoint_if_cancelled()
        timed_out = False
        if not slot.ready:
            with trio.move_on_after(self._timeout) as waited:
                await slot.wait_ready()
            timed_out = waited.cancelled_caught
        chunk = slot.take()
        try:
            if timed_out:
                raise SendTimeout(
                    f"no chunk of {rpc!r} within {self._timeout} s",
                    entity_id=self._entity_id,
                    request_id=self._request_id,
                )
            if chunk is not None:
                try:
                    value: C = rpc.success_decoder.decode(chunk)
                except msgspec.MsgspecError as exc:
                    raise SerializationError(
                        f"cannot decode a chunk of {rpc!r}: {exc}",
                        entity_id=self._entity_id,
                        request_id=self._request_id,
                    ) from exc
                return value
            final = slot.final
            assert final is not None  # ready, and no chunk: the end came
            replies.decode(
                final,
                _END,
                rpc.errors_by_name,
                entity_id=self._entity_id,
                request_id=self._request_id,
            )
        except ClusterError as error:
            self.outcome = error.reason
            raise
        except rpc.errors:
            self.outcome = "error"
            raise
        self.outcome = "success"
        raise StopAsyncIteration
