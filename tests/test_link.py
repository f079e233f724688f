"""One link on its own, over in-memory streams: the connection boundary and its bounds.

The peer is a sans-I/O PeerConnection driven by hand, so a test can send
what an honest runner never would. Time runs on Trio's mock clock.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import msgspec
import pytest
import trio
import trio.testing

from trio_cluster import (
    AlreadyProcessingMessage,
    MalformedMessage,
    RunnerUnavailable,
    SerializationError,
)
from trio_cluster.core import reply as replies
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.frames import Ping, Reply, Request, StreamChunk, StreamCredit, encode
from trio_cluster.core.lifecycle import LinkState
from trio_cluster.core.protocol import (
    ApplicationMessage,
    Handshaken,
    InterruptReceived,
    PeerConnection,
    ReplyReceived,
    RequestReceived,
    State,
    StreamCreditReceived,
)
from trio_cluster.runtime.delivery import Delivery
from trio_cluster.runtime.streams import StreamSlot
from trio_cluster.transport.link import LinkReply, LinkSettings, LinkStream, PeerLink

T = TypeVar("T")

SETTINGS = LinkSettings(
    our_address="server:1",
    cluster="c",
    secret=b"k",
    ping_interval=1.0,
    handshake_timeout=2.0,
    max_frame_size=64 * 1024,
    max_unsent=256 * 1024,
    max_requests=100,
)


def envelope(request_id: int) -> Envelope:
    return Envelope(request_id, "Counter", "a", "default", 0, "add", b"")


class Sink:
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def resolve(self, reply: bytes) -> None:
        self.replies.append(reply)


class Peer:
    """The far end of a link: a PeerConnection on a stream, driven by the test."""

    def __init__(self, stream: trio.abc.Stream, role: str = "client") -> None:
        self.stream = stream
        self.conn = PeerConnection(
            "peer:2", "c", b"k", "client" if role == "client" else "server", secrets.token_bytes(32)
        )
        self.events: list[object] = []

    async def handshake(self) -> None:
        await self.stream.send_all(self.conn.initiate())
        while not any(isinstance(e, Handshaken) for e in self.events):
            await self.pump()
        # Until the link under test has read our Welcome too.
        await trio.testing.wait_all_tasks_blocked()

    async def pump(self) -> None:
        """Read once, answer whatever the state machine queued."""
        data = await self.stream.receive_some(65536)
        self.events += self.conn.receive_data(bytes(data)) if data else self.conn.receive_eof()
        out = self.conn.data_to_send()
        if out:
            await self.stream.send_all(out)

    async def send(self, *messages: ApplicationMessage) -> None:
        for message in messages:
            self.conn.send(message)
        await self.stream.send_all(self.conn.data_to_send())

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.pump()


@attrs.define
class Served:
    link: PeerLink
    peer: Peer
    requests: list[tuple[LinkReply, Envelope]]
    ended: trio.Event


@asynccontextmanager
async def serving(
    settings: LinkSettings = SETTINGS,
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = trio.testing.memory_stream_pair,
    on_request: Callable[[LinkReply, Envelope], None] | None = None,
) -> AsyncIterator[Served]:
    """A server-side link under test, and a hand-driven peer that dialled it."""
    ours, theirs = pair()
    requests: list[tuple[LinkReply, Envelope]] = []
    link = PeerLink(
        ours,
        "server",
        settings,
        on_request=on_request or (lambda reply, env: requests.append((reply, env))),
    )
    ended = trio.Event()

    async def run() -> None:
        try:
            await link.run()
        except RunnerUnavailable:
            pass
        finally:
            ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield Served(link, Peer(theirs), requests, ended)
        nursery.cancel_scope.cancel()


async def test_the_server_says_nothing_before_the_peers_hello(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        with trio.move_on_after(1):
            assert await served.peer.stream.receive_some(1) is None  # pragma: no cover
        await served.peer.handshake()
        assert served.link.open and served.link.peer == "peer:2"


async def test_no_handshake_within_the_deadline_ends_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        start = trio.current_time()
        await served.ended.wait()
        assert trio.current_time() - start == pytest.approx(SETTINGS.handshake_timeout)
        assert "no handshake within" in served.link.close_reason


async def test_replies_resolve_only_requests_sent_on_the_link() -> None:
    async with serving() as served:
        await served.peer.handshake()
        mine = Sink()
        served.link.send_request(envelope(7), mine)
        await served.peer.until(
            lambda: any(isinstance(e, RequestReceived) for e in served.peer.events)
        )
        # Replies for ids never sent here, then the real one.
        await served.peer.send(Reply(8, b"forged"), Reply(7, b"real"), Reply(7, b"again"))
        await trio.testing.wait_all_tasks_blocked()
        assert mine.replies == [b"real"]
        assert served.link.ignored_replies == 2


async def test_a_reused_request_id_is_refused_and_the_original_keeps_its_route() -> None:
    async with serving() as served:
        await served.peer.handshake()
        await served.peer.send(Request(envelope(5)), Request(envelope(5)))
        await served.peer.until(
            lambda: any(isinstance(e, ReplyReceived) for e in served.peer.events)
        )
        (refusal,) = [e for e in served.peer.events if isinstance(e, ReplyReceived)]
        with pytest.raises(AlreadyProcessingMessage):
            replies.decode(refusal.reply, msgspec_any(), {})
        (route, _) = served.requests[0]
        assert len(served.requests) == 1
        route.resolve(replies.success(42))
        await served.peer.until(
            lambda: len([e for e in served.peer.events if isinstance(e, ReplyReceived)]) == 2
        )
        answer = [e for e in served.peer.events if isinstance(e, ReplyReceived)][-1]
        assert replies.decode(answer.reply, msgspec_any(), {}) == 42


async def test_a_reply_too_large_for_a_frame_becomes_a_serialization_error() -> None:
    async with serving() as served:
        await served.peer.handshake()
        await served.peer.send(Request(envelope(1)))
        await served.peer.until(lambda: bool(served.requests))
        route, _ = served.requests[0]
        route.resolve(b"x" * (SETTINGS.max_frame_size + 1))
        await served.peer.until(
            lambda: any(isinstance(e, ReplyReceived) for e in served.peer.events)
        )
        (answer,) = [e for e in served.peer.events if isinstance(e, ReplyReceived)]
        with pytest.raises(SerializationError, match="does not fit a frame"):
            replies.decode(answer.reply, msgspec_any(), {})
        assert served.link.open


async def test_a_peer_that_never_reads_loses_its_link_not_more() -> None:
    async with serving(pair=trio.testing.lockstep_stream_pair) as served:
        await served.peer.handshake()
        await served.peer.send(*(Request(envelope(n)) for n in range(50)))
        await served.peer.until(lambda: len(served.requests) == 50)
        big = replies.success(b"x" * 30_000)
        for route, _ in served.requests:  # the peer reads none of these
            route.resolve(big)
        with trio.fail_after(5):
            await served.ended.wait()
        assert "not reading" in served.link.close_reason
        assert served.link.state is LinkState.CLOSED


async def test_pings_that_are_never_read_close_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(pair=trio.testing.lockstep_stream_pair) as served:
        await served.peer.handshake()
        flood = encode(Ping(1)) * 40_000  # 40,000 Pongs owed: past max_unsent
        with trio.move_on_after(10):
            await served.peer.stream.send_all(flood)
        await served.ended.wait()
        assert "not reading" in served.link.close_reason


async def test_bytes_that_never_make_a_frame_do_not_keep_a_link_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as served:
        await served.peer.handshake()
        start = trio.current_time()

        async def trickle() -> None:
            await served.peer.stream.send_all((60_000).to_bytes(4, "big"))
            while True:
                await trio.sleep(0.25)
                await served.peer.stream.send_all(b"x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            await served.ended.wait()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start <= 3 * SETTINGS.ping_interval
        assert "no answer" in served.link.close_reason


async def test_a_failing_request_handler_ends_this_link_only() -> None:
    def broken(reply: LinkReply, envelope: Envelope) -> None:
        raise RuntimeError("a bug in the runner")

    async with serving(on_request=broken) as served:
        await served.peer.handshake()
        mine = Sink()
        served.link.send_request(envelope(3), mine)
        await served.peer.send(Request(envelope(9)))
        with trio.fail_after(5):
            await served.ended.wait()
        assert "internal error" in served.link.close_reason
        # What was in flight on it is answered, not left to time out.
        with pytest.raises(RunnerUnavailable):
            replies.decode(mine.replies[0], msgspec_any(), {})
    assert served.peer.conn.state in (State.OPEN, State.CLOSED)


def msgspec_any() -> msgspec.msgpack.Decoder[object]:
    return msgspec.msgpack.Decoder()


# -- streams ----------------------------------------------------------------------------


async def test_chunks_beyond_the_window_end_that_stream_and_interrupt_it() -> None:
    async with serving() as served:
        await served.peer.handshake()
        stream = StreamSlot(2)
        served.link.send_stream(envelope(7), stream)
        await served.peer.until(lambda: bool(received(served.peer, RequestReceived)))
        assert received(served.peer, RequestReceived)[0].stream_window == 2
        # For no stream here (ignored), then three chunks on a window of two.
        await served.peer.send(StreamChunk(8, b"\x01"), StreamChunk(7, b"\x02"))
        await served.peer.send(StreamChunk(7, b"\x03"), StreamChunk(7, b"\x04"))
        await served.peer.until(lambda: bool(received(served.peer, InterruptReceived)))
        assert [await stream.next(), await stream.next(), await stream.next()] == [
            b"\x02",
            b"\x03",
            None,
        ]
        assert stream.final is not None
        with pytest.raises(MalformedMessage, match="beyond the stream's window"):
            replies.decode(stream.final, msgspec_any(), {})
        assert served.link.ignored_stream_frames == 1
        assert served.link.open


async def test_credits_are_granted_back_as_chunks_are_consumed() -> None:
    async with serving() as served:
        await served.peer.handshake()
        stream = StreamSlot(2)
        served.link.send_stream(envelope(7), stream)
        await served.peer.send(StreamChunk(7, b"\x01"), StreamChunk(7, b"\x02"))
        assert await stream.next() == b"\x01"  # a half window: one credit back
        await served.peer.until(lambda: bool(received(served.peer, StreamCreditReceived)))
        assert received(served.peer, StreamCreditReceived) == [StreamCreditReceived(7, 1)]


async def test_a_peers_stream_waits_for_credit_and_ignores_credit_it_never_earned() -> None:
    async with serving() as served:
        await served.peer.handshake()
        await served.peer.send(Request(envelope(5), stream_window=1), StreamCredit(99, 5))
        await served.peer.until(lambda: bool(served.requests))
        (route, _) = served.requests[0]
        assert isinstance(route, LinkStream)
        await route.send_chunk(b"\x01")
        sent = trio.Event()

        async def second() -> None:
            await route.send_chunk(b"\x02")
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()  # no credit: it waits
            await served.peer.send(StreamCredit(5, 10**9))
            await sent.wait()
        assert served.link.ignored_stream_frames == 1


async def test_a_lost_link_interrupts_the_peers_streams_handled_here() -> None:
    async with serving() as served:
        await served.peer.handshake()
        await served.peer.send(Request(envelope(5), stream_window=1))
        await served.peer.until(lambda: bool(served.requests))
        (route, env) = served.requests[0]
        route.delivery = delivery = Delivery(env, route)
        await served.peer.stream.aclose()
        await served.ended.wait()
        assert delivery.interrupted


def received(peer: Peer, kind: type[T]) -> list[T]:
    return [event for event in peer.events if isinstance(event, kind)]
