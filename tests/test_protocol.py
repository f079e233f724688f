"""The connection state machine, driven byte by byte without any I/O."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core.envelope import Envelope
from trio_cluster.core.frames import (
    FrameDecoder,
    FrameTooLarge,
    Goodbye,
    Hello,
    Interrupt,
    Message,
    Notify,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    StreamChunk,
    StreamCredit,
    Welcome,
    encode,
    encode_many,
)
from trio_cluster.core.hashing import ShardId
from trio_cluster.core.protocol import (
    PRE_AUTH_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    ApplicationMessage,
    Closed,
    Event,
    Handshaken,
    InterruptReceived,
    LocalProtocolError,
    NotifyReceived,
    PeerConnection,
    PingReceived,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    State,
    StreamChunkReceived,
    StreamCreditReceived,
)

from .test_frames import envelopes, ints, split

ENVELOPE = Envelope(42, "Counter", "user-1", "default", 3, "increment", b"\x01")
CLIENT_NONCE = b"c" * 32
SERVER_NONCE = b"s" * 32


def client(secret: bytes | None = None, cluster: str = "prod") -> PeerConnection:
    return PeerConnection("runner-a", cluster, secret, "client", CLIENT_NONCE)


def server(secret: bytes | None = None, cluster: str = "prod") -> PeerConnection:
    return PeerConnection("runner-b", cluster, secret, "server", SERVER_NONCE)


def exchange(a: PeerConnection, b: PeerConnection) -> tuple[list[Event], list[Event]]:
    """Deliver queued bytes both ways until neither side has anything to say."""
    events_a: list[Event] = []
    events_b: list[Event] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return events_a, events_b
        events_b += b.receive_data(to_b)
        events_a += a.receive_data(to_a)


def connect(a: PeerConnection, b: PeerConnection) -> tuple[list[Event], list[Event]]:
    """The client's Hello goes out; then both answer whatever they receive."""
    hello_a, hello_b = a.initiate(), b.initiate()
    assert hello_b == b""  # the server waits for the client's Hello
    events_b = b.receive_data(hello_a)
    more_a, more_b = exchange(a, b)
    return more_a, events_b + more_b


def open_pair(secret: bytes | None = None) -> tuple[PeerConnection, PeerConnection]:
    a, b = client(secret), server(secret)
    assert connect(a, b) == ([Handshaken("runner-b")], [Handshaken("runner-a")])
    return a, b


# -- handshake --------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, b"correct horse battery staple"])
def test_handshake(secret: bytes | None) -> None:
    a, b = open_pair(secret)
    assert a.state is b.state is State.OPEN
    assert (a.peer_runner, b.peer_runner) == ("runner-b", "runner-a")


def test_the_server_says_nothing_until_a_valid_hello() -> None:
    a, b = client(b"k"), server(b"k")
    hello_a = a.initiate()
    assert b.initiate() == b""
    # Half a Hello, then the rest: nothing from the server until it is whole.
    assert b.receive_data(hello_a[:10]) == []
    assert b.data_to_send() == b""
    assert b.receive_data(hello_a[10:]) == []
    hello_b, welcome_b = FrameDecoder().feed(b.data_to_send())
    assert isinstance(hello_b, Hello)
    assert hello_b.runner == "runner-b"
    assert isinstance(welcome_b, Welcome)


def test_a_server_names_no_cluster_to_a_stranger() -> None:
    b = server(cluster="secret-cluster-name")
    b.initiate()
    b.receive_data(encode(Hello(PROTOCOL_VERSION, "guess", "scanner", CLIENT_NONCE)))
    assert b"secret-cluster-name" not in b.data_to_send()


def test_the_secret_never_crosses_the_wire() -> None:
    secret = b"s3cr3t-s3cr3t"
    a, b = client(secret), server(secret)
    hello_a = a.initiate()
    b.initiate()
    b.receive_data(hello_a)
    from_b = b.data_to_send()
    a.receive_data(from_b)
    welcome_a = a.data_to_send()
    assert secret not in hello_a + from_b + welcome_a
    (welcome,) = FrameDecoder().feed(welcome_a)
    assert isinstance(welcome, Welcome)
    assert len(welcome.proof) == 32  # HMAC-SHA256
    assert b.receive_data(welcome_a) == [Handshaken("runner-a")]


@pytest.mark.parametrize(
    ("secret_a", "secret_b", "reason_a", "reason_b"),
    [
        (b"one", b"two", "authentication failed", "authentication failed"),
        (b"one", None, "authentication failed", "authentication mismatch"),
        (None, b"two", "authentication mismatch", "authentication failed"),
    ],
)
def test_secrets_must_match(
    secret_a: bytes | None, secret_b: bytes | None, reason_a: str, reason_b: str
) -> None:
    a, b = client(secret_a), server(secret_b)
    events_a, events_b = connect(a, b)
    # Each side refuses the other's proof; the Reject that crosses its own is ignored.
    assert [type(e) for e in events_a] == [Closed]
    assert [type(e) for e in events_b] == [Closed]
    assert isinstance(events_a[0], Closed)
    assert isinstance(events_b[0], Closed)
    assert events_a[0].reason.startswith(reason_a)
    assert events_b[0].reason.startswith(reason_b)
    assert not events_a[0].by_peer
    assert a.state is b.state is State.CLOSED


def test_a_proof_reflected_back_is_refused() -> None:
    # An attacker without the secret opens two connections to the same runner and
    # hands each its own challenge: the server's proof is no client's proof.
    secret = b"k"
    target = server(secret)
    target.initiate()
    decoy = server(secret)  # same runner, a second connection
    decoy.initiate()
    attacker_hello = Hello(PROTOCOL_VERSION, "prod", "mallory", SERVER_NONCE)
    target.receive_data(encode(attacker_hello))
    challenge, _ = FrameDecoder().feed(target.data_to_send())
    assert isinstance(challenge, Hello)
    decoy.receive_data(encode(Hello(PROTOCOL_VERSION, "prod", "mallory", challenge.nonce)))
    _, reflected = FrameDecoder().feed(decoy.data_to_send())
    assert isinstance(reflected, Welcome)
    (closed,) = target.receive_data(encode(reflected))
    assert isinstance(closed, Closed)
    assert closed.reason.startswith("authentication failed")


def test_other_cluster_is_refused() -> None:
    a, b = client(cluster="prod"), server(cluster="staging")
    events_a, events_b = connect(a, b)
    # The server refuses the client's Hello without naming its own cluster.
    assert events_b == [Closed("cluster mismatch: peer is in 'prod'", False)]
    assert events_a == [Closed("peer rejected us: \"cluster mismatch: peer is in 'prod'\"", True)]


def test_other_protocol_version_is_refused_with_a_reject() -> None:
    b = server()
    b.initiate()
    hello = Hello(PROTOCOL_VERSION + 1, "prod", "runner-a", CLIENT_NONCE)
    reason = f"protocol version mismatch: we speak {PROTOCOL_VERSION}, peer speaks 2"
    assert b.receive_data(encode(hello)) == [Closed(reason, by_peer=False)]
    assert FrameDecoder().feed(b.data_to_send()) == [Reject(reason)]


def test_short_peer_nonce_is_refused() -> None:
    b = server()
    b.initiate()
    (closed,) = b.receive_data(encode(Hello(PROTOCOL_VERSION, "prod", "runner-a", b"0")))
    assert isinstance(closed, Closed)
    assert closed.reason == "peer nonce too short (1 bytes)"


@pytest.mark.parametrize(
    "message",
    [
        Request(ENVELOPE),
        Reply(1, b""),
        Ping(1),
        Pong(1),
        Notify("g", 1, []),
        Interrupt(1),
        StreamChunk(1, b""),
        StreamCredit(1, 1),
    ],
)
def test_application_message_before_handshake_is_refused(message: Message) -> None:
    b = server()
    b.initiate()
    reason = f"unexpected {type(message).__name__} before the handshake"
    assert b.receive_data(encode(message)) == [Closed(reason, by_peer=False)]
    assert FrameDecoder().feed(b.data_to_send()) == [Reject(reason)]


def test_welcome_before_hello_is_refused() -> None:
    b = server(b"k")
    b.initiate()
    (closed,) = b.receive_data(encode(Welcome(b"forged")))
    assert closed == Closed("unexpected Welcome before the handshake", by_peer=False)


def test_handshake_messages_after_open_are_refused() -> None:
    _, b = open_pair()
    (closed,) = b.receive_data(encode(Hello(PROTOCOL_VERSION, "prod", "again", CLIENT_NONCE)))
    assert closed == Closed("unexpected Hello after the handshake", by_peer=False)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\xff\xff\xff\xff", "frame of 4294967295 bytes exceeds"),
        (b"\x00\x00\x00\x01\xc1", "undecodable frame"),
        (b"\x00\x00\x00\x03\x92\x63\x01", "unknown message tag 99"),
        (b"GET / HTTP/1.1\r\n\r\n", "frame of 1195725856 bytes exceeds"),
    ],
)
def test_garbage_closes_the_connection(garbage: bytes, reason: str) -> None:
    _, b = open_pair()
    (closed,) = b.receive_data(garbage)
    assert isinstance(closed, Closed)
    assert closed.reason.startswith(reason)
    assert not closed.by_peer
    (reject,) = FrameDecoder().feed(b.data_to_send())
    assert reject == Reject(closed.reason)


# -- application traffic ---------------------------------------------------------------


def test_requests_replies_and_the_rest_flow_both_ways() -> None:
    a, b = open_pair(b"k")
    a.send(Request(ENVELOPE))
    a.send(Notify("default", 3, [42, 43]))
    a.send(Interrupt(42))
    a.send(Request(ENVELOPE, stream_window=4))
    a.send(StreamCredit(42, 2))
    events_a, events_b = exchange(a, b)
    assert events_a == []
    assert events_b == [
        RequestReceived(ENVELOPE),
        NotifyReceived(ShardId("default", 3), [42, 43]),
        InterruptReceived(42),
        RequestReceived(ENVELOPE, stream_window=4),
        StreamCreditReceived(42, 2),
    ]
    b.send(StreamChunk(42, b"chunk"))
    b.send(Reply(42, b"reply"))
    assert exchange(a, b) == (
        [StreamChunkReceived(42, b"chunk"), ReplyReceived(42, b"reply")],
        [],
    )


def test_ping_is_answered_by_the_connection_itself() -> None:
    a, b = open_pair()
    a.send(Ping(7))
    assert exchange(a, b) == ([PongReceived(7)], [PingReceived(7)])


def test_sends_are_coalesced_into_one_write() -> None:
    a, _ = open_pair()
    sent: list[ApplicationMessage] = [Request(ENVELOPE), Ping(1), Reply(9, b"x")]
    for message in sent:
        a.send(message)
    assert a.bytes_to_send == len(encode_many(sent))
    assert a.data_to_send() == encode_many(sent)
    assert a.data_to_send() == b""
    assert a.bytes_to_send == 0


def test_a_message_too_large_for_the_peer_fails_alone() -> None:
    a = PeerConnection("runner-a", "prod", None, "client", CLIENT_NONCE, max_frame_size=1000)
    b = PeerConnection("runner-b", "prod", None, "server", SERVER_NONCE, max_frame_size=1000)
    connect(a, b)
    with pytest.raises(FrameTooLarge):
        a.send(Reply(1, b"x" * 1000))
    a.send(Reply(2, b"fits"))
    assert exchange(a, b) == ([], [ReplyReceived(2, b"fits")])


# -- bounds ---------------------------------------------------------------------------


def test_before_the_handshake_only_small_frames_are_accepted() -> None:
    b = server()
    b.initiate()
    header = (PRE_AUTH_MAX_FRAME_SIZE + 1).to_bytes(4, "big")
    # Refused on the announced length alone: the body is never waited for.
    (closed,) = b.receive_data(header)
    assert isinstance(closed, Closed)
    assert "exceeds the 4096-byte limit" in closed.reason


def test_after_the_handshake_the_configured_frame_size_applies() -> None:
    a, b = open_pair()
    big = Reply(1, b"x" * (PRE_AUTH_MAX_FRAME_SIZE * 4))
    a.send(big)
    assert exchange(a, b) == ([], [ReplyReceived(1, big.reply)])


def test_a_large_frame_right_behind_the_welcome_is_judged_by_the_new_limit() -> None:
    a, b = client(b"k"), server(b"k")
    b.initiate()
    b.receive_data(a.initiate())
    a.receive_data(b.data_to_send())
    big = Request(msgspec.structs.replace(ENVELOPE, payload=b"x" * (PRE_AUTH_MAX_FRAME_SIZE * 3)))
    a.send(big)
    # The Welcome and the large Request arrive in one read.
    events = b.receive_data(a.data_to_send())
    assert events == [Handshaken("runner-a"), RequestReceived(big.envelope)]


def test_a_peer_that_does_not_read_closes_its_own_connection() -> None:
    a = PeerConnection("runner-a", "prod", None, "client", CLIENT_NONCE, max_unsent=10_000)
    b = PeerConnection("runner-b", "prod", None, "server", SERVER_NONCE, max_unsent=10_000)
    connect(a, b)
    assert a.send(Reply(1, b"x" * 5000))
    assert not a.send(Reply(2, b"x" * 5000))
    assert a.state is State.CLOSED
    assert a.close_reason is not None and "not reading" in a.close_reason
    assert a.data_to_send() == b""  # the queue is dropped, not sent


def test_pongs_count_against_the_unsent_bound() -> None:
    b = PeerConnection("runner-b", "prod", None, "server", SERVER_NONCE, max_unsent=1000)
    a = client()
    connect(a, b)
    pings = encode_many([Ping(n) for n in range(1000)])
    events = b.receive_data(pings)
    assert isinstance(events[-1], Closed)
    assert "not reading" in events[-1].reason
    assert b.state is State.CLOSED
    assert b.data_to_send() == b""


def test_only_whole_frames_count_as_hearing_from_the_peer() -> None:
    _, b = open_pair()
    before = b.frames_received
    ping = encode(Ping(1))
    b.receive_data(ping[:-1])
    assert b.frames_received == before
    b.receive_data(ping[-1:])
    assert b.frames_received == before + 1


# -- closing ------------------------------------------------------------------------


def test_goodbye_closes_both_sides() -> None:
    a, b = open_pair()
    a.send(Reply(1, b"last words"))
    a.close("shutting down")
    assert a.state is State.CLOSED
    assert a.close_reason == "shutting down"
    assert exchange(a, b) == (
        [],
        [ReplyReceived(1, b"last words"), Closed("peer said goodbye: 'shutting down'", True)],
    )
    assert b.state is State.CLOSED
    a.close("again")  # a no-op
    assert a.data_to_send() == b""


def test_close_before_initiate_sends_nothing() -> None:
    a = client()
    a.close("never mind")
    assert a.state is State.CLOSED
    assert a.data_to_send() == b""


def test_end_of_stream() -> None:
    a, b = open_pair()
    assert b.receive_eof() == [Closed("connection lost", by_peer=True)]
    assert b.receive_eof() == []
    b.receive_data(b"")
    assert a.receive_data(encode(Ping(1))[:3]) == []
    assert a.receive_eof() == [Closed("connection lost in the middle of a frame", by_peer=True)]


def test_closed_accepts_nothing() -> None:
    a, b = open_pair()
    (closed,) = b.receive_data(b"\x00\x00\x00\x01\xc1")
    assert isinstance(closed, Closed)
    assert b.state is State.CLOSED
    assert b.receive_data(encode(Request(ENVELOPE))) == []
    assert b.receive_data(b"more garbage") == []
    assert b.receive_eof() == []
    with pytest.raises(LocalProtocolError, match="connection is closed"):
        b.send(Ping(1))
    b.close("too late")  # a no-op
    # All that is left to send is the Reject, which closes the peer in turn.
    events_a, events_b = exchange(a, b)
    assert events_a == [Closed(f"peer rejected us: {closed.reason!r}", by_peer=True)]
    assert events_b == []
    assert a.state is State.CLOSED


def test_frames_after_a_goodbye_are_ignored() -> None:
    _, b = open_pair()
    tail = encode(Ping(1)) + b"garbage that would otherwise fail the stream"
    events = b.receive_data(encode(Goodbye("bye")) + tail)
    assert events == [Closed("peer said goodbye: 'bye'", True)]
    assert b.data_to_send() == b""  # no Pong, no Reject


# -- local misuse ------------------------------------------------------------------


def test_send_before_open_is_a_local_error() -> None:
    a = client()
    a.initiate()
    with pytest.raises(LocalProtocolError, match="cannot send Request: the connection is"):
        a.send(Request(ENVELOPE))


@pytest.mark.parametrize("message", [Hello(1, "prod", "x", CLIENT_NONCE), Welcome(b""), Pong(1)])
def test_handshake_and_automatic_messages_cannot_be_sent(message: Message) -> None:
    a, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="not an application message"):
        a.send(message)  # type: ignore[arg-type]


def test_initiate_comes_first_and_once() -> None:
    a = client()
    with pytest.raises(LocalProtocolError, match="initiate"):
        a.receive_data(b"")
    a.initiate()
    with pytest.raises(LocalProtocolError, match="already"):
        a.initiate()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nonce": b"short"}, "nonce must be at least 16 bytes"),
        ({"secret": b""}, "secret must be None"),
        ({"role": "peer"}, "role must be"),
    ],
)
def test_constructor_refuses_unsafe_settings(kwargs: dict[str, object], match: str) -> None:
    settings: dict[str, object] = {
        "our_runner": "a",
        "cluster": "prod",
        "secret": None,
        "role": "client",
        "nonce": CLIENT_NONCE,
    }
    with pytest.raises(ValueError, match=match):
        PeerConnection(**{**settings, **kwargs})  # type: ignore[arg-type]


# -- the stream may be split anywhere ---------------------------------------------------

application_messages: st.SearchStrategy[ApplicationMessage] = st.one_of(
    st.builds(Request, envelopes),
    st.builds(Reply, ints, st.binary(max_size=32)),
    st.builds(Interrupt, ints),
    st.builds(StreamChunk, ints, st.binary(max_size=32)),
    st.builds(StreamCredit, ints, ints),
    st.builds(Notify, st.text(max_size=10), ints, st.lists(ints, max_size=4)),
    st.builds(Ping, ints),
)
endings = st.sampled_from(
    [
        b"",
        encode(Goodbye("done")) + encode(Ping(1)),
        b"\x00\x00\x00\x01\xc1" + encode(Ping(2)),
        encode(Welcome(b"late")) + encode(Ping(3)),
    ]
)


@given(
    st.sampled_from([None, b"secret"]),
    st.lists(application_messages, max_size=6),
    endings,
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_any_split_of_the_stream_gives_the_same_events(
    secret: bytes | None, sent: list[ApplicationMessage], ending: bytes, cuts: list[int]
) -> None:
    # Record everything the client sends, from its Hello to the ending...
    a, b = client(secret), server(secret)
    stream = a.initiate()
    hello_b = b.initiate()
    b.receive_data(stream)
    a.receive_data(hello_b + b.data_to_send())
    for message in sent:
        a.send(message)
    stream += a.data_to_send() + ending
    # ...then replay it into fresh servers, whole and in pieces.
    whole = server(secret)
    whole.initiate()
    expected = whole.receive_data(stream)
    pieces = server(secret)
    pieces.initiate()
    events = [event for chunk in split(stream, cuts) for event in pieces.receive_data(chunk)]
    assert events == expected
    assert expected[0] == Handshaken("runner-a")
    assert len(expected) == 1 + len(sent) + (ending != b"")
    assert pieces.data_to_send() == whole.data_to_send()
