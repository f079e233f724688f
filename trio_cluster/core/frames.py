"""The wire format between runners: length-prefixed msgpack frames.

A frame is a 4-byte big-endian body length followed by the body, one message
encoded by msgspec.  Messages are tagged array-like structs, so a body is
``[tag, field, ...]``: no field names on the wire, and one decoder for the whole
union that picks the type from the tag without trying each in turn.

Compatibility rules, since both ends of a connection may run different builds:

* tags are part of the format and are never reused;
* a field may only be appended, with a default; older decoders ignore trailing
  fields of an array-like struct, so such a change needs no new protocol version;
* ``Hello`` never changes shape: it carries the version, so it must be readable by
  every version (see :mod:`trio_cluster.core.protocol`);
* a message type may be added, with a new tag, when it is only ever sent to a peer
  that showed it knows it: an older decoder refuses an unknown tag and drops the
  connection. So a :class:`StreamChunk` answers only a Request that asked for a
  stream (which an older build never sends), and a :class:`StreamCredit` is sent
  only once the peer sent a chunk of that stream: no new protocol version.

Everything here is pure, with no I/O: :class:`FrameDecoder` is fed whatever bytes
the socket delivered and hands back whole messages, like h11's connection object.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias

import msgspec

from .envelope import Envelope

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FrameDecoder",
    "FrameTooLarge",
    "Goodbye",
    "Hello",
    "Interrupt",
    "Message",
    "Notify",
    "Ping",
    "Pong",
    "ProtocolError",
    "Reject",
    "Reply",
    "Request",
    "StreamChunk",
    "StreamCredit",
    "Welcome",
    "encode",
    "encode_into",
    "encode_many",
]

DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
"""Both ends use this unless configured: a frame the peer would refuse is refused here."""

_HEADER: Final = struct.Struct(">I")
_HEADER_SIZE: Final = _HEADER.size
_MAX_LENGTH: Final = 2**32 - 1  # what a 4-byte length can say


class ProtocolError(ValueError):
    """The peer's byte stream is not a valid sequence of frames.

    The stream cannot be resynchronised after a bad frame (its length may be the
    part that is wrong), so the decoder refuses all further input and the
    connection must be dropped.  ``messages`` holds the whole messages that came
    before the bad frame in the same :meth:`FrameDecoder.feed`: they are valid, and
    a connection must act on them first (a Goodbye followed by garbage is still a
    Goodbye), or the events would depend on how the network split the stream.
    """

    def __init__(self, reason: str, messages: Sequence[Message] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.messages = list(messages)


class FrameTooLarge(ValueError):
    """A message we were about to send encodes to more than the frame size limit.

    Raised before anything is queued, so only this message fails: sending it would
    make the peer drop the whole connection, with every request in flight on it.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message encodes to {size} bytes, over the {limit}-byte frame limit")
        self.size = size
        self.limit = limit


class _Frame(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Options shared by every message (``frozen=True`` is repeated on each for mypy).

    ``gc=False``: no message can be part of a reference cycle (their fields are
    scalars, lists of ints and envelopes), and a busy runner holds many of them,
    which would otherwise all be traversed by every garbage collection.
    """


class Hello(_Frame, tag=1, frozen=True):
    """Sent first by both sides: who we are, and a fresh challenge for the peer."""

    protocol_version: int
    cluster: str
    runner: str
    nonce: bytes


class Welcome(_Frame, tag=2, frozen=True):
    """Answers the peer's Hello with proof that we hold the shared secret (if any)."""

    proof: bytes


class Reject(_Frame, tag=3, frozen=True):
    """The handshake or the stream was refused; the sender closes after it."""

    reason: str


class Goodbye(_Frame, tag=4, frozen=True):
    """Graceful shutdown: the sender will send nothing more and closes."""

    reason: str


class Request(_Frame, tag=5, frozen=True):
    """A volatile request. With ``ack`` (a ``tell`` that wants to hear of a refusal),
    the Reply comes as soon as the request is queued or refused, not from its
    handler; an older receiver ignores ``ack`` and replies after the handler,
    which the sender takes as queued all the same.

    ``stream_window`` > 0 asks for a stream (a StreamRpc): the receiver may send
    that many StreamChunks before it hears of any StreamCredit, and the Reply
    ends the stream."""

    envelope: Envelope
    ack: bool = False
    stream_window: int = 0


class Reply(_Frame, tag=6, frozen=True):
    """The encoded reply (see :mod:`trio_cluster.core.reply`) to one request."""

    request_id: int
    reply: bytes


class Interrupt(_Frame, tag=7, frozen=True):
    """The caller gave up on a request: cancel its handler if it is still running.

    Sent on the link the request went out on, for a request still in flight
    there; the receiver ignores an id it is not handling (answered already,
    or never received), so an interrupt racing the reply loses.
    """

    request_id: int


class Notify(_Frame, tag=8, frozen=True):
    """Persisted requests were stored for a shard the receiver owns: poll storage."""

    shard_group: str
    shard_index: int
    request_ids: list[int]


class Ping(_Frame, tag=9, frozen=True):
    nonce: int


class Pong(_Frame, tag=10, frozen=True):
    nonce: int


class StreamChunk(_Frame, tag=11, frozen=True):
    """One chunk (an encoded value of the stream's chunk type) of a streaming request.

    Each spends one credit of the stream's window; a chunk beyond it ends the
    stream on the receiver's side (the peer is not keeping to the window).
    """

    request_id: int
    chunk: bytes


class StreamCredit(_Frame, tag=12, frozen=True):
    """The caller consumed ``credits`` chunks of a stream: the handler may send that
    many more."""

    request_id: int
    credits: int


Message: TypeAlias = (
    Hello
    | Welcome
    | Reject
    | Goodbye
    | Request
    | Reply
    | Interrupt
    | Notify
    | Ping
    | Pong
    | StreamChunk
    | StreamCredit
)

_MESSAGE_TYPES: Final[dict[int | str | None, str]] = {
    cls.__struct_config__.tag: cls.__name__
    for cls in (
        Hello,
        Welcome,
        Reject,
        Goodbye,
        Request,
        Reply,
        Interrupt,
        Notify,
        Ping,
        Pong,
        StreamChunk,
        StreamCredit,
    )
}

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class _Head(msgspec.Struct, array_like=True):
    """The tag alone (trailing items are skipped), to explain a frame that failed."""

    tag: int


_head_decoder = msgspec.msgpack.Decoder(_Head)

_UNDECODABLE: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
"""What msgspec raises for bytes that are not msgpack of the expected shape.

UnicodeDecodeError: a string that is not UTF-8.  RecursionError: msgspec's guard
against deeply nested input, raised cleanly from C.
"""


def encode_into(
    message: Message, buffer: bytearray, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> None:
    """Append one frame to ``buffer``, encoding in place (no intermediate bytes).

    On any failure (FrameTooLarge; msgspec's TypeError, OverflowError or
    UnicodeEncodeError for a value msgpack cannot carry) ``buffer`` is left as it
    was, so the frames already in it stay valid.
    """
    start = len(buffer)
    buffer += b"\0\0\0\0"
    try:
        _encoder.encode_into(message, buffer, start + _HEADER_SIZE)
    except BaseException:
        del buffer[start:]
        raise
    size = len(buffer) - start - _HEADER_SIZE
    if size > min(max_frame_size, _MAX_LENGTH):
        del buffer[start:]
        raise FrameTooLarge(size, min(max_frame_size, _MAX_LENGTH))
    buffer[start : start + _HEADER_SIZE] = size.to_bytes(_HEADER_SIZE, "big")


def encode(message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """One message as one frame."""
    return encode_many((message,), max_frame_size=max_frame_size)


def encode_many(
    messages: Iterable[Message], *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """Several frames in one buffer, for one system call; all or nothing."""
    buffer = bytearray()
    for message in messages:
        encode_into(message, buffer, max_frame_size=max_frame_size)
    return bytes(buffer)


class FrameDecoder:
    """Turns a byte stream, in chunks of any size, back into messages.

    Unconsumed bytes live in one bytearray from ``_start`` on: consuming a frame
    only moves the offset, and the consumed prefix is dropped once it is at least
    as long as what remains, so every byte is moved a bounded number of times
    however the stream is split, and a large frame arriving in many small reads is
    appended to, never rebuilt.

    Any error (:class:`ProtocolError`, never another exception) is final: the
    buffer is released and every later call raises the same error.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._start = 0
        self._error: str | None = None
        self.max_frame_size = max_frame_size

    @property
    def max_frame_size(self) -> int:
        """The largest body accepted; may change between feeds (a connection raises it
        once the peer has authenticated). Bytes already buffered are judged anew."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, limit: int) -> None:
        if not 1 <= limit <= _MAX_LENGTH:
            raise ValueError(f"max_frame_size must be in 1..{_MAX_LENGTH} (got {limit})")
        self._max_frame_size = limit

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame (non-zero at EOF: truncated)."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes, *, at_most: int | None = None) -> list[Message]:
        """Buffer ``data`` and return every message it completes, in order.

        With ``at_most``, decoding stops after that many messages and the rest
        stays buffered for the next call (``feed(b"")`` goes on): a caller whose
        frame limit changes with a message (the handshake's end) sets the new
        limit before the next frame is judged.
        """
        if self._error is not None:
            raise ProtocolError(self._error)
        buffer = self._buffer
        if self._start and self._start >= len(buffer) - self._start:
            del buffer[: self._start]
            self._start = 0
        buffer += data
        position = self._start
        end = len(buffer)
        max_size = self._max_frame_size
        decode = _decoder.decode
        messages: list[Message] = []
        wanted = -1 if at_most is None else at_most
        # One view for the whole batch: a memoryview costs as much as decoding a
        # small message, and slicing the bytearray instead would copy every body.
        with memoryview(buffer) as view:
            while end - position >= _HEADER_SIZE and len(messages) != wanted:
                (size,) = _HEADER.unpack_from(buffer, position)
                if size > max_size:
                    # Refused on the length alone: the body is never waited for.
                    reason = f"frame of {size} bytes exceeds the {max_size}-byte limit"
                    raise self._fail(reason, messages)
                stop = position + _HEADER_SIZE + size
                if stop > end:
                    break
                # No name for the slice: a view left alive would pin the buffer's size.
                try:
                    messages.append(decode(view[position + _HEADER_SIZE : stop]))
                except msgspec.ValidationError as exc:
                    reason = _explain(view[position + _HEADER_SIZE : stop], exc)
                    raise self._fail(reason, messages) from None
                except _UNDECODABLE as exc:
                    raise self._fail(f"undecodable frame: {exc}", messages) from None
                position = stop
        if position == end:
            buffer.clear()
            self._start = 0
        else:
            self._start = position
        return messages

    def _fail(self, reason: str, messages: list[Message]) -> ProtocolError:
        self._error = reason
        self._buffer = bytearray()
        self._start = 0
        return ProtocolError(reason, messages)


def _explain(body: memoryview, exc: msgspec.ValidationError) -> str:
    """Tell an unknown message type from a known one with bad contents."""
    try:
        tag = _head_decoder.decode(body).tag
    except (msgspec.ValidationError, *_UNDECODABLE):
        return f"undecodable frame: {exc}"
    name = _MESSAGE_TYPES.get(tag)
    if name is None:
        return f"unknown message tag {tag}"
    return f"malformed {name}: {exc}"
