"""The frame format: lossless, indifferent to how the stream is split, and hostile-input safe."""

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core.envelope import Envelope
from trio_cluster.core.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    FrameTooLarge,
    Goodbye,
    Hello,
    Interrupt,
    Message,
    Notify,
    Ping,
    Pong,
    ProtocolError,
    Reject,
    Reply,
    Request,
    StreamChunk,
    StreamCredit,
    Welcome,
    encode,
    encode_into,
    encode_many,
)

# Every int msgpack can carry: msgspec refuses to encode anything outside.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(max_size=30)  # hypothesis leaves out lone surrogates, which UTF-8 cannot hold
blobs = st.binary(max_size=64)

envelopes = st.builds(
    Envelope,
    request_id=ints,
    entity_type=texts,
    entity_id=texts,
    shard_group=texts,
    shard_index=ints,
    rpc=texts,
    payload=blobs,
    persisted=st.booleans(),
    primary_key=st.none() | texts,
    deliver_at_ms=st.none() | ints,
    headers=st.dictionaries(texts, texts, max_size=3),
    call_chain=st.lists(texts, max_size=3).map(tuple),
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, ints, texts, texts, blobs),
    st.builds(Welcome, blobs),
    st.builds(Reject, texts),
    st.builds(Goodbye, texts),
    st.builds(Request, envelopes, st.booleans(), ints),
    st.builds(Reply, ints, blobs),
    st.builds(StreamChunk, ints, blobs),
    st.builds(StreamCredit, ints, ints),
    st.builds(Interrupt, ints),
    st.builds(Notify, texts, ints, st.lists(ints, max_size=5)),
    st.builds(Ping, ints),
    st.builds(Pong, ints),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates make empty chunks)."""
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds)]


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Message]:
    return [message for chunk in chunks for message in decoder.feed(chunk)]


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    assert FrameDecoder().feed(encode(message)) == [message]


@given(st.lists(messages, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_the_stream_decodes_the_same(sequence: list[Message], cuts: list[int]) -> None:
    data = encode_many(sequence)
    decoder = FrameDecoder()
    assert feed_all(decoder, split(data, cuts)) == sequence
    assert decoder.pending == 0


@given(st.lists(messages, max_size=8))
def test_encode_many_is_the_concatenation_of_encodes(sequence: list[Message]) -> None:
    assert encode_many(sequence) == b"".join(encode(message) for message in sequence)


def test_wire_bytes_are_pinned() -> None:
    # Tags and layout are the protocol: a change here breaks mixed-version clusters.
    assert encode(Ping(1)) == b"\x00\x00\x00\x03\x92\x09\x01"
    assert encode(Hello(1, "c", "r", b"n")) == b"\x00\x00\x00\x0a\x95\x01\x01\xa1c\xa1r\xc4\x01n"
    assert encode(Interrupt(5))[4:] == msgspec.msgpack.encode([7, 5])
    assert encode(StreamChunk(5, b"c"))[4:] == msgspec.msgpack.encode([11, 5, b"c"])
    assert encode(StreamCredit(5, 8))[4:] == msgspec.msgpack.encode([12, 5, 8])


def test_trailing_fields_from_a_newer_build_are_ignored() -> None:
    body = msgspec.msgpack.encode([9, 42, "a field added later"])
    assert FrameDecoder().feed(len(body).to_bytes(4, "big") + body) == [Ping(42)]


# -- hostile input -------------------------------------------------------------

# Random bytes mostly trip the length check; framed random bodies and mutated valid
# frames reach the msgpack decoder and the tag dispatch.
framed_garbage = st.binary(max_size=100).map(lambda body: len(body).to_bytes(4, "big") + body)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_many(draw(st.lists(messages, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        data[draw(st.integers(min_value=0, max_value=len(data) - 1))] = draw(
            st.integers(min_value=0, max_value=255)
        )
    return bytes(data)


@given(
    st.one_of(st.binary(max_size=200), framed_garbage, mutated_frames()),
    st.lists(st.integers(min_value=0), max_size=5),
)
def test_arbitrary_bytes_raise_nothing_but_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    try:
        feed_all(decoder, split(data, cuts))
    except ProtocolError as exc:
        assert exc.reason
        # The error is final: the stream cannot be resynchronised.
        with pytest.raises(ProtocolError) as again:
            decoder.feed(encode(Ping(1)))
        assert again.value.reason == exc.reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "undecodable frame"),
        (b"\xc1", "undecodable frame"),  # a reserved msgpack opcode
        (msgspec.msgpack.encode([99, 1]), "unknown message tag 99"),
        (msgspec.msgpack.encode(["Ping", 1]), "undecodable frame"),
        (msgspec.msgpack.encode([5, "not an envelope"]), "malformed Request"),
        (msgspec.msgpack.encode([9]), "malformed Ping"),
        (msgspec.msgpack.encode({"tag": 9}), "undecodable frame"),
        (b"\x92\x03\xa1\x80", "undecodable frame"),  # a string that is not UTF-8
        # msgspec guards its recursion: deep nesting must not escape as RecursionError.
        (b"\x92\x09" + b"\x91" * 100_000 + b"\x01", "undecodable frame"),
        (b"\x93\x09\x01" + b"\x91" * 100_000 + b"\x01", "undecodable frame"),
    ],
)
def test_bad_bodies_are_explained(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def test_oversized_frame_is_refused_from_its_length_alone() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    assert decoder.feed((100).to_bytes(4, "big")) == []  # at the limit: waits for the body
    decoder = FrameDecoder(max_frame_size=100)
    # No byte of the body has arrived: the header is enough to refuse it.
    with pytest.raises(ProtocolError, match="frame of 101 bytes exceeds the 100-byte limit"):
        decoder.feed((101).to_bytes(4, "big"))
    assert decoder.pending == 0  # nothing kept


def test_default_limit_refuses_a_4_gib_length() -> None:
    with pytest.raises(ProtocolError, match=f"{DEFAULT_MAX_FRAME_SIZE}-byte limit"):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


@pytest.mark.parametrize("size", [0, -1, 2**32])
def test_decoder_limit_must_fit_the_length_prefix(size: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=size)


def test_messages_before_a_bad_frame_come_with_the_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(encode_many([Ping(1), Goodbye("bye")]) + b"\x00\x00\x00\x01\xc1")
    assert info.value.messages == [Ping(1), Goodbye("bye")]
    with pytest.raises(ProtocolError) as info:
        decoder.feed(encode(Ping(2)))
    assert info.value.messages == []


def test_a_large_frame_in_small_reads() -> None:
    message = Reply(1, bytes(range(256)) * 4096)  # 1 MiB
    data = encode_many([Ping(1), message, Pong(2)])
    decoder = FrameDecoder()
    received = feed_all(decoder, [data[i : i + 4096] for i in range(0, len(data), 4096)])
    assert received == [Ping(1), message, Pong(2)]
    assert decoder.pending == 0


def test_consumed_bytes_are_released() -> None:
    decoder = FrameDecoder()
    frame = encode(Ping(7))
    decoder.feed(frame[:3])
    for _ in range(1000):
        # Always one partial frame left over, so the buffer is never simply cleared.
        assert decoder.feed(frame[3:] + frame[:3]) == [Ping(7)]
    assert decoder.pending == 3
    assert len(decoder._buffer) < 4 * len(frame)


# -- encoding --------------------------------------------------------------------


def test_frame_too_large_leaves_the_buffer_intact() -> None:
    buffer = bytearray(encode(Ping(1)))
    with pytest.raises(FrameTooLarge) as info:
        encode_into(Reply(1, b"x" * 200), buffer, max_frame_size=100)
    assert info.value.limit == 100
    assert info.value.size > 200
    assert buffer == encode(Ping(1))


@pytest.mark.parametrize(
    ("message", "error"),
    [(Ping(2**64), OverflowError), (Goodbye("\ud800"), UnicodeEncodeError)],
)
def test_unencodable_message_leaves_the_buffer_intact(
    message: Message, error: type[Exception]
) -> None:
    buffer = bytearray(encode(Ping(1)))
    with pytest.raises(error):
        encode_into(message, buffer)
    assert buffer == encode(Ping(1))
