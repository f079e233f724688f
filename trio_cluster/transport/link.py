"""One TCP connection to another runner: the Trio I/O around a sans-I/O PeerConnection.

A link is a failure boundary. Whatever the peer sends or the network does
(garbage, floods, silence, a reset, a TLS error, a frame too large) ends at
most this link: its requests in flight fail with RunnerUnavailable, its
socket closes, and the runner carries on. :meth:`PeerLink.run` therefore
raises nothing but cancellation, except RunnerUnavailable for a handshake
that did not complete (which a dialler needs to hear of).

Request ids are scoped to the link. A reply is accepted only on the link its
request went out on, and only while that request is in flight there; a
peer's request id names nothing outside its own link, so one peer can
neither answer, steal nor interrupt another's requests, whatever ids it guesses.

An Interrupt frame withdraws one of the peer's requests in flight here: its
handler is cancelled (or skipped, if it has not started) and its reply is
not sent. An interrupt for an id not in flight (answered already, never
received) is ignored, so the bookkeeping is the in-flight set alone, which
``max_requests`` bounds.

A streaming request (see :mod:`trio_cluster.core.streaming`) is a request
whose handler sends StreamChunks before its Reply, each spending a credit
the caller granted; the caller grants more with StreamCredit frames as it
consumes them. Chunks and credits are taken only for a stream in flight
on this link: one for an id that is not (a race with an interrupt, or a
peer's guess) is ignored and counted, and a chunk beyond the window ends
that stream with MalformedMessage and interrupts its handler. When a link
ends, the peer's streams being handled here are interrupted: no caller is
left to grant them credit.

Three tasks per link, in the link's own nursery: a reader feeding bytes to
the state machine, a writer flushing whatever is queued in one ``send_all``
(a burst of messages costs one system call), and a pinger that closes a link
whose peer has sent no whole frame for two ping intervals.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ..core import reply as replies
from ..core.envelope import Envelope
from ..core.frames import (
    FrameTooLarge,
    Interrupt,
    Ping,
    Reply,
    Request,
    StreamChunk,
    StreamCredit,
)
from ..core.lifecycle import LINK_LIFECYCLE, Lifecycle, LinkEvent, LinkState
from ..core.protocol import (
    Closed,
    Event,
    Handshaken,
    InterruptReceived,
    PeerConnection,
    ReplyReceived,
    RequestReceived,
    Role,
    State,
    StreamChunkReceived,
    StreamCreditReceived,
)
from ..core.reply import ReplyTarget
from ..core.streaming import ChunkReceiver, ChunkSink, granted
from ..errors import (
    AlreadyProcessingMessage,
    ClusterError,
    MailboxFull,
    MalformedMessage,
    RunnerUnavailable,
    SerializationError,
)
from .identity import identity_problem

log = logging.getLogger("trio_cluster.transport")

READ_SIZE = 256 * 1024
PRE_AUTH_READ_SIZE = 4096
"""Reads before the handshake are small: an unauthenticated peer costs little memory."""

_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""How a connection ends from below: reset, closed, TLS failure (wrapped by Trio)."""


@attrs.frozen
class LinkSettings:
    """What every link of one runner shares (from its TransportConfig)."""

    our_address: str
    cluster: str
    secret: bytes | None
    ping_interval: float
    handshake_timeout: float
    max_frame_size: int
    max_unsent: int
    max_requests: int
    """Requests from the peer in flight at once on this link; more are refused."""
    mutual_tls: bool = False


class Interruptible(Protocol):
    """What the peer's Interrupt reaches: the request as the runtime holds it."""

    def interrupt(self) -> None: ...


class LinkReply:
    """Where a peer's request is answered: its own link, under its own id.

    ``ack``: the peer wants a Reply once the request is queued (or refused),
    not the handler's. ``delivery`` is set by whoever queues the request,
    for the peer's Interrupt to reach.
    """

    __slots__ = ("ack", "delivery", "link", "request_id")

    def __init__(self, link: PeerLink, request_id: int, *, ack: bool = False) -> None:
        self.link = link
        self.request_id = request_id
        self.ack = ack
        self.delivery: Interruptible | None = None

    def resolve(self, reply: bytes) -> None:
        self.link.send_reply(self.request_id, reply)

    def sink(self) -> ChunkSink | None:
        """Where the handler's chunks go: nowhere, but for a streaming request."""
        return None


class LinkStream(LinkReply, ChunkSink):
    """A peer's streaming request: its chunks go out on the link as its credit allows."""

    __slots__ = ("_credit", "_granted", "_window")

    def __init__(self, link: PeerLink, request_id: int, window: int) -> None:
        super().__init__(link, request_id)
        self._window = window
        self._credit = window
        self._granted = trio.Event()

    def sink(self) -> ChunkSink:
        return self

    def grant(self, credits: int) -> None:
        self._credit = granted(self._credit, credits, self._window)
        self._granted.set()
        self._granted = trio.Event()

    async def send_chunk(self, chunk: bytes) -> None:
        while self._credit == 0:
            # Interrupted (withdrawn, or the link ended): the handler is cancelled here.
            await self._granted.wait()
        self._credit -= 1
        self.link.send_chunk(self.request_id, chunk)


class PeerLink:
    """A connection, opening or open, to one peer runner."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: Role,
        settings: LinkSettings,
        *,
        on_request: Callable[[LinkReply, Envelope], None],
        expected_peer: str | None = None,
    ) -> None:
        self._stream = stream
        self._settings = settings
        self._conn = PeerConnection(
            settings.our_address,
            settings.cluster,
            settings.secret,
            role,
            secrets.token_bytes(32),
            max_frame_size=settings.max_frame_size,
            max_unsent=settings.max_unsent,
        )
        self._on_request = on_request
        self._expected_peer = expected_peer
        self._life = Lifecycle("link", LINK_LIFECYCLE, LinkState.HANDSHAKING)
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._finished = trio.Event()
        self._sending = trio.Lock()
        self._wake_writer = trio.Event()
        # Requests we sent and not yet answered, by our request id: failed at once
        # if the link drops. Replies for any other id are ignored.
        self._outbound: dict[int, ReplyTarget] = {}
        # Our streaming requests among them, whose chunks are taken.
        self._streams: dict[int, ChunkReceiver] = {}
        # The peer's requests being handled here, by the peer's request id.
        self._inbound: dict[int, LinkReply] = {}
        self.ignored_replies = 0
        self.ignored_stream_frames = 0
        """Chunks and credits for no stream in flight here (late, or a peer's guess)."""
        self.peer: str | None = None
        self.close_reason = ""

    @property
    def state(self) -> LinkState:
        return self._life.state

    @property
    def open(self) -> bool:
        # The state machine may close (a Goodbye, a bad frame) a moment before the
        # link hears of it: nothing may be queued from then on.
        return self._life.state is LinkState.OPEN and self._conn.state is State.OPEN

    @property
    def in_flight(self) -> int:
        """Requests sent on this link that await their reply."""
        return len(self._outbound)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handshake within the deadline, then carry messages until either side closes.

        ``task_status.started()`` fires once the peer proved itself. A
        handshake that does not complete raises RunnerUnavailable (from
        ``start``, for a dialled link); after it, nothing but cancellation.
        """
        started = False
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self._settings.handshake_timeout):
                    await self._handshake(nursery)
                if self.open:
                    task_status.started()
                    started = True
                    nursery.start_soon(self._ping)
                    await self._closed.wait()
                elif not self.close_reason:
                    self._close(f"no handshake within {self._settings.handshake_timeout} s")
                # Best effort: the last replies, a Goodbye or a Reject, then the socket.
                with trio.move_on_after(self._settings.ping_interval):
                    await self._flush()
                nursery.cancel_scope.cancel()
        except* _LOST as lost:
            self._lost(f"connection lost: {lost.exceptions[0]!r}")
        except* Exception as bug:
            # Our own code failed on something the peer sent: that is a bug to
            # fix, but it ends this link, not the runner.
            log.exception("link to %s failed", self.peer, exc_info=bug)
            self._lost(f"internal error: {bug.exceptions[0]!r}")
        finally:
            self._end()
            self._fail_in_flight()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            self._finished.set()
        if not started:
            raise RunnerUnavailable(f"handshake failed: {self.close_reason}")

    async def _handshake(self, nursery: trio.Nursery) -> None:
        if isinstance(self._stream, trio.SSLStream):
            # Explicitly, so that the TLS handshake is under the deadline too.
            await self._stream.do_handshake()
        nursery.start_soon(self._read)
        nursery.start_soon(self._write)
        hello = self._conn.initiate()
        if hello:
            await self._stream.send_all(hello)
        await self._ready.wait()

    async def finished(self) -> None:
        """Wait until the link is over and its socket closed."""
        await self._finished.wait()

    def send_request(self, envelope: Envelope, target: ReplyTarget, *, ack: bool = False) -> None:
        """Queue a request; its reply (or the link's failure) goes to ``target``.

        With ``ack`` the reply says only that the peer queued it, or why not.

        Raises RunnerUnavailable when the link is not open or the peer has
        stopped reading (the link then closes), SerializationError when the
        request does not fit a frame; nothing is in flight then.
        """
        self._send_request(envelope, target, Request(envelope, ack))

    def send_stream(self, envelope: Envelope, receiver: ChunkReceiver) -> None:
        """Queue a streaming request granting ``receiver.window`` credits: its chunks go to
        ``receiver``, which grants more through this link; refused as ``send_request``."""
        self._send_request(envelope, receiver, Request(envelope, stream_window=receiver.window))
        request_id = envelope.request_id
        self._streams[request_id] = receiver
        receiver.grant_with(lambda credits: self._send_credit(request_id, credits))

    def _send_request(self, envelope: Envelope, target: ReplyTarget, request: Request) -> None:
        if not self.open:
            raise RunnerUnavailable(f"link to {self.peer} is closed: {self.close_reason}")
        try:
            queued = self._conn.send(request)
        except FrameTooLarge as error:
            raise SerializationError(
                f"request to {self.peer} does not fit a frame: {error}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            ) from None
        if not queued:
            self._close(self._conn.close_reason or "peer is not reading")
            raise RunnerUnavailable(f"{self.peer} is not reading: {self.close_reason}")
        self._outbound[envelope.request_id] = target
        self._wake_writer.set()

    def withdraw(self, request_id: int, *, interrupt: bool = False) -> None:
        """The caller stopped waiting: a late reply to ``request_id`` is ignored.

        With ``interrupt``, and the request still unanswered, the peer is told
        to cancel its handler (at most one Interrupt frame per request).
        """
        self._streams.pop(request_id, None)
        if self._outbound.pop(request_id, None) is None or not interrupt or not self.open:
            return
        self._send_control(Interrupt(request_id))

    def _send_credit(self, request_id: int, credits: int) -> None:
        if request_id in self._streams and self.open:
            self._send_control(StreamCredit(request_id, credits))

    def _send_control(self, message: Interrupt | StreamCredit) -> None:
        if not self._conn.send(message):
            self._close(self._conn.close_reason or "peer is not reading")
        self._wake_writer.set()

    def send_chunk(self, request_id: int, chunk: bytes) -> None:
        """Send a chunk of the peer's streaming request ``request_id``.

        Raises RunnerUnavailable when the request is no longer in flight here
        (withdrawn, or the link closed), SerializationError for a chunk too
        large for a frame.
        """
        if request_id not in self._inbound or not self.open:
            raise RunnerUnavailable(f"the caller of request {request_id} is gone")
        try:
            queued = self._conn.send(StreamChunk(request_id, chunk))
        except FrameTooLarge as error:
            raise SerializationError(
                f"a chunk does not fit a frame: {error}", request_id=request_id
            ) from None
        if not queued:
            self._close(self._conn.close_reason or "peer is not reading")
            raise RunnerUnavailable(f"{self.peer} is not reading: {self.close_reason}")
        self._wake_writer.set()

    def send_reply(self, request_id: int, reply: bytes) -> None:
        """Answer the peer's request ``request_id``; never raises.

        A reply to a request this link did not receive, or already answered,
        is dropped. A reply too large for a frame is replaced by a
        SerializationError for that request alone; a peer too slow to take it
        loses its link.
        """
        if self._inbound.pop(request_id, None) is None:
            return
        self._reply(request_id, reply)

    def close(self, reason: str) -> None:
        """Say Goodbye once what is queued has gone out."""
        self._conn.close(reason)
        self._close(reason)

    def _reply(self, request_id: int, reply: bytes) -> None:
        if not self.open:
            return
        try:
            queued = self._conn.send(Reply(request_id, reply))
        except FrameTooLarge as error:
            refusal = SerializationError(f"the reply does not fit a frame: {error}")
            queued = self._conn.send(Reply(request_id, replies.failure(refusal, request_id)))
        if not queued:
            self._close(self._conn.close_reason or "peer is not reading")
        self._wake_writer.set()

    async def _read(self) -> None:
        while True:
            size = READ_SIZE if self.open else PRE_AUTH_READ_SIZE
            data = await self._stream.receive_some(size)
            events = self._conn.receive_data(bytes(data)) if data else self._conn.receive_eof()
            for event in events:
                self._dispatch(event)
            # A Welcome, a Pong or a Reject may now be queued.
            self._wake_writer.set()
            if self._conn.state is State.CLOSED:
                self._close(self._conn.close_reason or "closed")
                return

    def _dispatch(self, event: Event) -> None:
        match event:
            case RequestReceived(envelope, ack, stream_window):
                self._received(envelope, ack, stream_window)
            case ReplyReceived(request_id, reply):
                target = self._outbound.pop(request_id, None)
                self._streams.pop(request_id, None)
                if target is None:
                    self.ignored_replies += 1
                else:
                    target.resolve(reply)
            case StreamChunkReceived(request_id, chunk):
                self._chunk(request_id, chunk)
            case StreamCreditReceived(request_id, credits):
                inbound = self._inbound.get(request_id)
                if isinstance(inbound, LinkStream):
                    inbound.grant(credits)
                else:
                    self.ignored_stream_frames += 1
            case InterruptReceived(request_id):
                # Popped: the handler's reply, if it comes, is not sent.
                interrupted = self._inbound.pop(request_id, None)
                if interrupted is not None and interrupted.delivery is not None:
                    interrupted.delivery.interrupt()
            case Handshaken(peer_runner):
                self._handshaken(peer_runner)
            case Closed(reason, _):
                log.info("link to %s closed: %s", self.peer, reason)
                self._close(reason)
            case _:
                # Pings are answered by the state machine; notify frames are
                # not acted on in this version.
                pass

    def _chunk(self, request_id: int, chunk: bytes) -> None:
        receiver = self._streams.get(request_id)
        if receiver is None:
            self.ignored_stream_frames += 1
        elif not receiver.receive_chunk(chunk):
            log.warning("%s overran the window of stream %s: ending it", self.peer, request_id)
            self.withdraw(request_id, interrupt=True)
            overrun = MalformedMessage(f"{self.peer} sent a chunk beyond the stream's window")
            receiver.resolve(replies.failure(overrun, request_id))

    def _handshaken(self, peer_runner: str) -> None:
        problem = None
        if self._expected_peer is not None and peer_runner != self._expected_peer:
            problem = f"dialled {self._expected_peer}, but the peer says it is {peer_runner}"
        elif self._settings.mutual_tls and isinstance(self._stream, trio.SSLStream):
            problem = identity_problem(self._stream.getpeercert(), peer_runner)
        if problem is not None:
            log.warning("refusing a peer: %s", problem)
            self._conn.close(problem)
            self._close(problem)
            return
        self.peer = peer_runner
        self._life.fire(LinkEvent.HANDSHAKEN)
        self._ready.set()

    def _received(self, envelope: Envelope, ack: bool, stream_window: int) -> None:
        request_id = envelope.request_id
        if request_id in self._inbound:
            # The original keeps its place; only this copy is refused.
            refusal: ClusterError = AlreadyProcessingMessage(
                f"request {request_id} is already in flight on this link",
                entity_id=envelope.entity_id,
            )
            self._reply(request_id, replies.failure(refusal, request_id))
            return
        if len(self._inbound) >= self._settings.max_requests:
            refusal = MailboxFull(
                f"{self._settings.max_requests} requests from this peer are in flight",
                entity_id=envelope.entity_id,
            )
            self._reply(request_id, replies.failure(refusal, request_id))
            return
        reply = (
            LinkStream(self, request_id, stream_window)
            if stream_window > 0
            else LinkReply(self, request_id, ack=ack)
        )
        self._inbound[request_id] = reply
        self._on_request(reply, envelope)

    async def _write(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            await self._flush()

    async def _flush(self) -> None:
        # The writer and the final flush may both want the socket; Trio
        # allows one sender at a time.
        async with self._sending:
            data = self._conn.data_to_send()
            if data:
                await self._stream.send_all(data)

    async def _ping(self) -> None:
        """Close a link whose peer sent no whole frame for two intervals despite a Ping."""
        interval = self._settings.ping_interval
        nonce = 0
        while True:
            heard = self._conn.frames_received
            await trio.sleep(interval)
            if self._conn.frames_received != heard:
                continue
            nonce += 1
            if not self._conn.send(Ping(nonce)):
                self._close(self._conn.close_reason or "peer is not reading")
                return
            self._wake_writer.set()
            await trio.sleep(interval)
            if self._conn.frames_received == heard:
                self.close(f"no answer for {2 * interval} s")
                return

    def _close(self, reason: str) -> None:
        """No more sending; the run loop flushes what is queued and ends."""
        if not self.close_reason:
            self.close_reason = reason
        self._life.fire(LinkEvent.CLOSE)
        self._ready.set()
        self._closed.set()

    def _lost(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self._life.fire(LinkEvent.LOST)
        self._ready.set()
        self._closed.set()

    def _end(self) -> None:
        if not self.close_reason:
            self.close_reason = "link ended"
        closing = self._life.state is LinkState.CLOSING
        self._life.fire(LinkEvent.FINISHED if closing else LinkEvent.LOST)
        self._ready.set()
        self._closed.set()

    def _fail_in_flight(self) -> None:
        """A volatile request whose link dropped may or may not have run: say so now."""
        outbound, self._outbound = self._outbound, {}
        inbound, self._inbound = self._inbound, {}
        self._streams.clear()
        for handled in inbound.values():
            # A stream here would wait for ever for credit from a caller that is gone.
            if isinstance(handled, LinkStream) and handled.delivery is not None:
                handled.delivery.interrupt()
        for request_id, target in outbound.items():
            error = RunnerUnavailable(f"connection to {self.peer} lost: {self.close_reason}")
            target.resolve(replies.failure(error, request_id))
