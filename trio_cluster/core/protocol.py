"""One connection between two runners, as a state machine without I/O.

Like h11, :class:`PeerConnection` never touches a socket: the Trio layer feeds it
the bytes it read (:meth:`~PeerConnection.receive_data`), acts on the events it
returns, and writes whatever :meth:`~PeerConnection.data_to_send` hands back.
Every rule of the protocol therefore lives here, where it can be tested byte for
byte and for every way the network might split the stream.

The dialling side (the client) speaks first: it sends its :class:`~.frames.Hello`
at once. The accepting side (the server) says nothing until it has received a
Hello of the right protocol version and cluster, so a scanner learns nothing
of the runner, not even its name, by connecting. Each side answers the peer's
Hello with a :class:`~.frames.Welcome` (the server sends its own Hello just
before), whose proof is

    HMAC-SHA256(secret, [label, version, cluster, prover's role,
                         client runner, client nonce, server runner, server nonce])

so each side proves it holds the secret without sending it, over the peer's fresh
nonce (no replay of an old handshake).  The prover's role is in the MAC so that a
proof cannot be reflected: an attacker who opens a second connection and hands us
our own challenge gets a *server's* proof, which no *client* check accepts.  The
MAC also covers both Hellos, so a man in the middle cannot swap a runner name.
This authenticates membership of the cluster; it does not encrypt or protect the
messages that follow, which needs TLS or a private network.  Without a secret
the proof is empty, and a peer that sends a proof anyway is refused: the two
sides disagree about the cluster's configuration.

States go AWAITING_HELLO -> AWAITING_WELCOME -> OPEN -> CLOSED and never back.
Once CLOSED the connection accepts nothing and returns no events; the only bytes
left to send are the Reject or Goodbye that closed it.

Two bounds protect the runner from its peer. Until the handshake is done, a
frame may announce at most :data:`PRE_AUTH_MAX_FRAME_SIZE` bytes (a Hello is
well under 1 KiB), so an unauthenticated connection can never make the runner
buffer more than that; afterwards the configured frame size applies. And the
bytes queued for the peer, Pongs and Welcomes included, are bounded by
``max_unsent``: a peer that does not read closes its own connection, with
nothing more queued (see :meth:`PeerConnection.send`).
"""

from __future__ import annotations

import enum
import hmac
from typing import Final, Literal, TypeAlias

import msgspec

from .envelope import Envelope
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
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
)
from .hashing import ShardId

__all__ = [
    "DEFAULT_MAX_UNSENT",
    "MIN_NONCE_SIZE",
    "PRE_AUTH_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "ApplicationMessage",
    "Closed",
    "Event",
    "Handshaken",
    "InterruptReceived",
    "LocalProtocolError",
    "NotifyReceived",
    "PeerConnection",
    "PingReceived",
    "PongReceived",
    "ReplyReceived",
    "RequestReceived",
    "Role",
    "State",
    "StreamChunkReceived",
    "StreamCreditReceived",
]

PROTOCOL_VERSION: Final = 1
"""Both sides must send the same; a change to any message but Hello bumps it."""

MIN_NONCE_SIZE: Final = 16
"""128 random bits: a nonce that repeats would let an old Welcome be replayed."""

PRE_AUTH_MAX_FRAME_SIZE: Final = 4096
"""Largest frame body accepted before the handshake completes."""

DEFAULT_MAX_UNSENT: Final = 64 * 1024 * 1024
"""Bytes queued for a peer that is not reading, beyond which its connection closes."""

_PROOF_LABEL: Final = "trio_cluster handshake proof"
_MAX_QUOTED: Final = 100
"""Peer-supplied text quoted in a reason is cut to this, so a Reject always fits a frame."""
_proof_encoder = msgspec.msgpack.Encoder()

Role: TypeAlias = Literal["client", "server"]


class State(enum.Enum):
    AWAITING_HELLO = "awaiting hello"
    AWAITING_WELCOME = "awaiting welcome"
    OPEN = "open"
    CLOSED = "closed"


class LocalProtocolError(RuntimeError):
    """Our own code broke the protocol (sent before the handshake, say): a bug here."""


# Events are msgspec Structs, not attrs classes: one is built for every message
# received, and a Struct is several times cheaper to create.


class Handshaken(msgspec.Struct, frozen=True, gc=False):
    """The peer proved itself; application messages may flow both ways."""

    peer_runner: str


class RequestReceived(msgspec.Struct, frozen=True, gc=False):
    envelope: Envelope
    ack: bool = False
    """Reply once queued or refused, not after the handler (see :class:`~.frames.Request`)."""
    stream_window: int = 0
    """A stream: chunks the handler may send before any credit comes back."""


class ReplyReceived(msgspec.Struct, frozen=True, gc=False):
    request_id: int
    reply: bytes


class InterruptReceived(msgspec.Struct, frozen=True, gc=False):
    request_id: int


class StreamChunkReceived(msgspec.Struct, frozen=True, gc=False):
    request_id: int
    chunk: bytes


class StreamCreditReceived(msgspec.Struct, frozen=True, gc=False):
    request_id: int
    credits: int


class NotifyReceived(msgspec.Struct, frozen=True, gc=False):
    shard: ShardId
    request_ids: list[int]


class PingReceived(msgspec.Struct, frozen=True, gc=False):
    """Informational: the Pong is already queued in :meth:`PeerConnection.data_to_send`."""

    nonce: int


class PongReceived(msgspec.Struct, frozen=True, gc=False):
    nonce: int


class Closed(msgspec.Struct, frozen=True, gc=False):
    """The connection is over: drop it once :meth:`PeerConnection.data_to_send` is sent.

    ``by_peer`` is True when the peer ended it (Goodbye, Reject, end of stream) and
    False when we did, because of something it sent (then a Reject with the same
    reason is queued for it).
    """

    reason: str
    by_peer: bool


Event: TypeAlias = (
    Handshaken
    | RequestReceived
    | ReplyReceived
    | InterruptReceived
    | StreamChunkReceived
    | StreamCreditReceived
    | NotifyReceived
    | PingReceived
    | PongReceived
    | Closed
)

ApplicationMessage: TypeAlias = (
    Request | Reply | Interrupt | Notify | Ping | StreamChunk | StreamCredit
)
"""What :meth:`PeerConnection.send` takes; the state machine sends the rest itself."""

_APPLICATION_TYPES: Final = (Request, Reply, Interrupt, Notify, Ping, StreamChunk, StreamCredit)


class PeerConnection:
    """Our end of one connection to another runner of the cluster.

    ``nonce`` must be fresh random bytes (``secrets.token_bytes(32)``) for every
    connection; it is a parameter only so that this class stays free of I/O and
    tests are reproducible.  ``role`` says who dialled: the client did.
    """

    def __init__(
        self,
        our_runner: str,
        cluster: str,
        secret: bytes | None,
        role: Role,
        nonce: bytes,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_unsent: int = DEFAULT_MAX_UNSENT,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server' (got {role!r})")
        if len(nonce) < MIN_NONCE_SIZE:
            raise ValueError(f"nonce must be at least {MIN_NONCE_SIZE} bytes (got {len(nonce)})")
        if secret == b"":
            # An empty key would "authenticate" with a MAC anyone can compute.
            raise ValueError("secret must be None (no authentication) or non-empty")
        self.our_runner = our_runner
        self.cluster = cluster
        self.role: Role = role
        self.peer_runner: str | None = None
        """Who the peer says it is (proven only once the state is OPEN)."""
        self.close_reason: str | None = None
        self._secret = secret
        self._hello = Hello(PROTOCOL_VERSION, cluster, our_runner, nonce)
        self._peer_hello: Hello | None = None
        self._initiated = False
        self._state = State.AWAITING_HELLO
        self._max_frame_size = max_frame_size
        self._max_unsent = max_unsent
        self._decoder = FrameDecoder(min(max_frame_size, PRE_AUTH_MAX_FRAME_SIZE))
        self._outgoing = bytearray()
        self.frames_received = 0
        """Whole frames decoded so far: what liveness counts (bytes of a frame never
        finished prove nothing)."""

    @property
    def state(self) -> State:
        return self._state

    @property
    def bytes_to_send(self) -> int:
        """How much :meth:`data_to_send` would return: for backpressure on a slow peer."""
        return len(self._outgoing)

    def initiate(self) -> bytes:
        """Return what to send before anything else (our Hello, for a client; nothing,
        for a server, which waits for the client's); call it exactly once."""
        if self._initiated:
            raise LocalProtocolError("initiate() was already called")
        self._initiated = True
        if self.role == "server":
            return b""
        return encode(self._hello, max_frame_size=self._max_frame_size)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the events they complete, in order.

        Frames after the one that closed the connection are ignored, whatever they
        hold, so how the stream was split never changes the events.
        """
        if not self._initiated:
            raise LocalProtocolError("call initiate() and send our Hello first")
        if self._state is State.CLOSED:
            return []
        events: list[Event] = []
        while True:
            # Until the handshake is done, one frame at a time: the frame limit
            # rises with the message that completes it, before the next is judged.
            handshaking = self._state is not State.OPEN
            try:
                messages = self._decoder.feed(data, at_most=1 if handshaking else None)
                error = None
            except ProtocolError as exc:
                messages, error = exc.messages, exc.reason
            data = b""
            for message in messages:
                self.frames_received += 1
                event = self._handle(message)
                if event is not None:
                    events.append(event)
                # The property, not _state: mypy would keep the narrowing from above.
                if self.state is State.CLOSED:
                    return events  # whatever followed, even a bad frame, is ignored
            if error is not None:
                events.append(self._fail(error))
                return events
            if not (handshaking and messages):
                return events

    def receive_eof(self) -> list[Event]:
        """The peer closed its end of the stream (without a Goodbye, if still open)."""
        if self._state is State.CLOSED:
            return []
        truncated = " in the middle of a frame" if self._decoder.pending else ""
        return [self._close(f"connection lost{truncated}", by_peer=True)]

    def send(self, message: ApplicationMessage) -> bool:
        """Queue ``message``; :meth:`data_to_send` coalesces everything queued.

        Returns False when queueing it took the unsent bytes over ``max_unsent``:
        the peer is not reading, so the connection is now CLOSED, with its
        queue dropped. Raises LocalProtocolError unless the connection is OPEN,
        and FrameTooLarge (queueing nothing) for a message the peer would refuse.
        """
        if not isinstance(message, _APPLICATION_TYPES):
            raise LocalProtocolError(
                f"{type(message).__name__} is not an application message: the"
                " connection sends handshake and closing messages itself"
            )
        if self._state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__}: the connection is {self._state.value}"
            )
        return self._queue(message)

    def close(self, reason: str) -> None:
        """Say Goodbye and close; a no-op when already closed."""
        if self._state is State.CLOSED:
            return
        if self._initiated:
            self._queue(Goodbye(reason))
        self._close(reason, by_peer=False)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, to be written in one go."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _handle(self, message: Message) -> Event | None:
        state = self._state
        if state is State.OPEN:
            match message:
                case Request(envelope, ack, stream_window):
                    return RequestReceived(envelope, ack, stream_window)
                case Reply(request_id, reply):
                    return ReplyReceived(request_id, reply)
                case Interrupt(request_id):
                    return InterruptReceived(request_id)
                case StreamChunk(request_id, chunk):
                    return StreamChunkReceived(request_id, chunk)
                case StreamCredit(request_id, credits):
                    return StreamCreditReceived(request_id, credits)
                case Notify(shard_group, shard_index, request_ids):
                    return NotifyReceived(ShardId(shard_group, shard_index), request_ids)
                case Ping(nonce):
                    if not self._queue(Pong(nonce)):
                        return Closed(self.close_reason or "", by_peer=False)
                    return PingReceived(nonce)
                case Pong(nonce):
                    return PongReceived(nonce)
        match message:
            case Goodbye(reason):
                return self._close(f"peer said goodbye: {_quote(reason)}", by_peer=True)
            case Reject(reason):
                return self._close(f"peer rejected us: {_quote(reason)}", by_peer=True)
            case Hello() if state is State.AWAITING_HELLO:
                return self._on_hello(message)
            case Welcome(proof) if state is State.AWAITING_WELCOME:
                return self._on_welcome(proof)
        where = "after" if state is State.OPEN else "before"
        return self._fail(f"unexpected {type(message).__name__} {where} the handshake")

    def _on_hello(self, hello: Hello) -> Event | None:
        if hello.protocol_version != PROTOCOL_VERSION:
            return self._fail(
                f"protocol version mismatch: we speak {PROTOCOL_VERSION},"
                f" peer speaks {hello.protocol_version}"
            )
        if hello.cluster != self.cluster:
            # A server names no cluster of its own to a peer that has proved nothing.
            ours = "" if self.role == "server" else f"we are in {_quote(self.cluster)}, "
            return self._fail(f"cluster mismatch: {ours}peer is in {_quote(hello.cluster)}")
        if len(hello.nonce) < MIN_NONCE_SIZE:
            return self._fail(f"peer nonce too short ({len(hello.nonce)} bytes)")
        self._peer_hello = hello
        self.peer_runner = hello.runner
        self._state = State.AWAITING_WELCOME
        if self.role == "server" and not self._queue(self._hello):
            return Closed(self.close_reason or "", by_peer=False)
        if not self._queue(Welcome(self._proof(prover=self.role))):
            return Closed(self.close_reason or "", by_peer=False)
        return None

    def _on_welcome(self, proof: bytes) -> Event:
        if self._secret is None and proof:
            return self._fail("authentication mismatch: peer uses a secret, we have none")
        peer_role: Role = "server" if self.role == "client" else "client"
        if not hmac.compare_digest(proof, self._proof(prover=peer_role)):
            return self._fail("authentication failed: bad proof")
        self._state = State.OPEN
        self._decoder.max_frame_size = self._max_frame_size
        assert self.peer_runner is not None  # set with the Hello, which came first
        return Handshaken(self.peer_runner)

    def _proof(self, prover: Role) -> bytes:
        if self._secret is None:
            return b""
        assert self._peer_hello is not None  # both Hellos are in the transcript
        client, server = (
            (self._hello, self._peer_hello)
            if self.role == "client"
            else (self._peer_hello, self._hello)
        )
        transcript = _proof_encoder.encode(
            (
                _PROOF_LABEL,
                PROTOCOL_VERSION,
                self.cluster,
                prover,
                client.runner,
                client.nonce,
                server.runner,
                server.nonce,
            )
        )
        return hmac.digest(self._secret, transcript, "sha256")

    def _fail(self, reason: str) -> Closed:
        """Close because of what the peer sent, telling it why."""
        self._queue(Reject(reason))
        return self._close(reason, by_peer=False)

    def _close(self, reason: str, *, by_peer: bool) -> Closed:
        self._state = State.CLOSED
        self.close_reason = reason
        return Closed(reason, by_peer)

    def _queue(self, message: Message) -> bool:
        """Queue a frame; False (and CLOSED) when that leaves too much unsent."""
        encode_into(message, self._outgoing, max_frame_size=self._max_frame_size)
        if len(self._outgoing) <= self._max_unsent:
            return True
        unsent = len(self._outgoing)
        self._outgoing = bytearray()
        self._close(f"peer is not reading: {unsent} bytes unsent", by_peer=False)
        return False


def _quote(text: str) -> str:
    if len(text) > _MAX_QUOTED:
        return repr(text[:_MAX_QUOTED]) + "..."
    return repr(text)
