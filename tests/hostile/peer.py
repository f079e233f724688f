"""The attacker: a peer that speaks the runners' wire format by hand.

Nothing here goes through the runner's own transport (``PeerLink``,
``PeerConnection``): frames are built with :func:`trio_cluster.core.frames.encode`
or as raw msgpack, the handshake is written out from its specification in
:mod:`trio_cluster.core.protocol` (done honestly, with the secret, when the
attack is by a cluster member; skipped or botched otherwise), and every byte
the target sends back is kept so that a test can say what it saw.

A :class:`Peer` is one connection. It reads either in the task that waits
(:meth:`Peer.wait_for` pumps the socket itself) or in a background task
(:meth:`Peer.read_forever`), so an attack can stop reading altogether: a
never-reading peer is one of the attacks. Every wait is bounded by the caller's
``timeout``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any, Final

import attrs
import msgspec
import trio

from trio_cluster import ClusterError
from trio_cluster.core import reply as replies
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.frames import (
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Reject,
    Reply,
    Request,
    Welcome,
    encode,
    encode_many,
)
from trio_cluster.core.protocol import PROTOCOL_VERSION

from .app import CLUSTER, SECRET, Mode, shard_of

PROOF_LABEL: Final = "trio_cluster handshake proof"
"""The first item of the proof transcript (see :mod:`trio_cluster.core.protocol`)."""
READ_SIZE: Final = 256 * 1024
LOST: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a send or receive raises once the target has dropped the connection."""
_HEADER: Final = struct.Struct(">I")
_proof_encoder = msgspec.msgpack.Encoder()
_any_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()
_attacker_numbers = count(1)


# -- credentials and connections -------------------------------------------------------


@attrs.frozen
class Credentials:
    """What an attacker knows: the secret (a member) and the CA (anyone can reach TLS)."""

    mode: Mode
    secret: bytes | None
    tls: ssl.SSLContext | None

    @classmethod
    def for_mode(cls, mode: Mode, certs: Path | None) -> Credentials:
        tls = None
        if mode == "tls":
            assert certs is not None, "the tls mode needs the target's CA"
            tls = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        return cls(mode, None if mode == "plain" else SECRET, tls)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def connect_tcp(address: str, *, receive_buffer: int | None = None) -> trio.SocketStream:
    """A plain TCP connection; ``receive_buffer`` shrinks our kernel buffer before connecting.

    A never-reading attacker sets it: otherwise Linux would let our receive
    buffer grow to many megabytes (tcp_rmem) and absorb what the target should
    be holding, or refusing to hold.
    """
    host, port = split_address(address)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect(
    address: str,
    credentials: Credentials,
    *,
    tls_handshake: bool = True,
    receive_buffer: int | None = None,
) -> trio.abc.Stream:
    """TCP, wrapped in TLS in the tls mode (``tls_handshake=False``: TCP only, no TLS at all)."""
    tcp = await connect_tcp(address, receive_buffer=receive_buffer)
    if credentials.tls is None or not tls_handshake:
        return tcp
    stream = trio.SSLStream(tcp, credentials.tls, server_hostname=split_address(address)[0])
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


# -- replies as the attacker sees them ---------------------------------------------------


@attrs.frozen
class Outcome:
    """A decoded reply: ``reason`` None for a success (``value``), else the error's reason."""

    reason: str | None
    value: Any = None
    message: str = ""

    def __str__(self) -> str:
        if self.reason is None:
            return f"success {self.value!r:.80}"
        return f"{self.reason}: {self.message:.200}"


def outcome(reply: bytes) -> Outcome:
    try:
        value = replies.decode(reply, _any_decoder, {})
    except ClusterError as error:
        return Outcome(error.reason, None, error.message)
    return Outcome(None, value)


# -- frames built by hand --------------------------------------------------------------


def envelope(
    request_id: int,
    rpc: str,
    entity_id: str,
    payload: object,
    *,
    shard_index: int | None = None,
    persisted: bool = False,
    deliver_at_ms: int | None = None,
    headers: dict[str, str] | None = None,
    entity_type: str = "Target",
    shard_group: str = "default",
    call_chain: tuple[str, ...] = (),
) -> Envelope:
    """An envelope as a legitimate caller would build it, unless told otherwise."""
    return Envelope(
        request_id=request_id,
        entity_type=entity_type,
        entity_id=entity_id,
        shard_group=shard_group,
        shard_index=shard_of(entity_id) if shard_index is None else shard_index,
        rpc=rpc,
        payload=msgspec.msgpack.encode(payload),
        persisted=persisted,
        deliver_at_ms=deliver_at_ms,
        headers=headers or {},
        call_chain=call_chain,
    )


def request(request_id: int, rpc: str, entity_id: str, payload: object, **kwargs: Any) -> Request:
    return Request(envelope(request_id, rpc, entity_id, payload, **kwargs))


def raw_frame(body: object) -> bytes:
    """One frame around any msgpack value (``msgspec.Raw`` for bytes msgpack cannot make)."""
    encoded = msgspec.msgpack.encode(body)
    return _HEADER.pack(len(encoded)) + encoded


def header(size: int) -> bytes:
    """A frame header announcing ``size`` body bytes."""
    return _HEADER.pack(size)


def proof(secret: bytes | None, prover: str, client: Hello, server: Hello) -> bytes:
    """The Welcome proof, as the protocol module specifies it (empty without a secret)."""
    if secret is None:
        return b""
    transcript = _proof_encoder.encode(
        (
            PROOF_LABEL,
            PROTOCOL_VERSION,
            client.cluster,
            prover,
            client.runner,
            client.nonce,
            server.runner,
            server.nonce,
        )
    )
    return hmac.digest(secret, transcript, "sha256")


def our_hello(*, cluster: str = CLUSTER, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(
        version,
        cluster,
        f"attacker-{os.getpid()}-{next(_attacker_numbers)}",
        secrets.token_bytes(32),
    )


class HandshakeFailed(AssertionError):
    """The target did not let an honest member in: the attack could not even start."""


# -- one connection ------------------------------------------------------------------------


class Peer:
    """One connection to the target, and everything the target sent on it."""

    def __init__(self, stream: trio.abc.Stream, *, answer_pings: bool = True) -> None:
        self.stream = stream
        self.answer_pings = answer_pings
        self.messages: list[Message] = []
        self.received_bytes = 0
        self.closed = False
        """The target ended the connection (EOF, reset, a TLS error)."""
        self.undecodable: str | None = None
        """Set when the target sent bytes that are not frames: an observation, not our error."""
        self.peer_hello: Hello | None = None
        self.reply_count = 0
        self._replies: dict[int, list[bytes]] = {}
        """Replies by request id, in arrival order: floods make a scan of ``messages`` slow."""
        self._decoder = FrameDecoder(2**32 - 1)
        self._changed = trio.Event()
        self._sending = trio.Lock()
        self._reading_in_background = False
        self._nonces = count(1)

    # -- sending --

    async def send(self, data: bytes) -> bool:
        """Send raw bytes; False when the target has closed the connection."""
        if self.closed:
            return False
        try:
            async with self._sending:
                await self.stream.send_all(data)
        except LOST:
            self._lost()
            return False
        return True

    async def send_frames(self, *messages: Message) -> bool:
        return await self.send(encode_many(messages, max_frame_size=2**32 - 1))

    # -- receiving --

    async def read_some(self) -> None:
        """One read from the socket (in this task), handled like any other."""
        await self._receive_once()

    async def _receive_once(self) -> None:
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except LOST:
            data = b""
        if not data:
            self._lost()
            return
        self.received_bytes += len(data)
        if self.undecodable is None:
            try:
                messages = self._decoder.feed(bytes(data))
            except ProtocolError as error:
                messages = error.messages
                self.undecodable = error.reason
            for message in messages:
                await self._note(message)
        self._changed.set()
        self._changed = trio.Event()

    async def _note(self, message: Message) -> None:
        self.messages.append(message)
        if isinstance(message, Reply):
            self._replies.setdefault(message.request_id, []).append(message.reply)
            self.reply_count += 1
        if isinstance(message, Hello) and self.peer_hello is None:
            self.peer_hello = message
        if isinstance(message, Ping) and self.answer_pings:
            await self.send_frames(Pong(message.nonce))

    def _lost(self) -> None:
        self.closed = True
        self._changed.set()
        self._changed = trio.Event()

    async def read_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read in the background until the target closes (``await nursery.start(...)`` it)."""
        self._reading_in_background = True
        task_status.started()
        try:
            while not self.closed:
                await self._receive_once()
        finally:
            self._reading_in_background = False

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        """Until ``condition()`` or the connection closes; returns ``condition()``."""
        with trio.fail_after(timeout):
            while not condition() and not self.closed:
                if self._reading_in_background:
                    await self._changed.wait()
                else:
                    await self._receive_once()
        return condition()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109
        """Until the target drops us (reading, and discarding, whatever it sends first)."""
        await self.wait_for(lambda: False, timeout)

    async def roundtrip(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Ping and wait for its Pong: True if the link is still up and caught up.

        The target handles a connection's frames in order, so once the Pong is
        back every frame sent before the Ping has been acted on (or refused).
        """
        nonce = next(self._nonces) + 2**40
        if not await self.send_frames(Ping(nonce)):
            return False
        return await self.wait_for(
            lambda: any(isinstance(m, Pong) and m.nonce == nonce for m in self.messages), timeout
        )

    # -- what came back --

    def replies_to(self, request_id: int) -> list[Outcome]:
        return [outcome(reply) for reply in self._replies.get(request_id, ())]

    def reply_ids(self) -> list[int]:
        """Every request id answered at least once."""
        return list(self._replies)

    def count(self, kind: type[Message]) -> int:
        return sum(isinstance(m, kind) for m in self.messages)

    def rejected(self) -> str | None:
        for m in self.messages:
            if isinstance(m, Reject):
                return m.reason
        return None

    async def handshake(
        self,
        credentials: Credentials,
        timeout: float,  # noqa: ASYNC109
        *,
        hello: Hello | None = None,
    ) -> None:
        """The client side of the handshake, done honestly: Hello, then our proof.

        We send our Hello first and say nothing more until the target's Hello and
        Welcome are in: that works whether the target speaks first (as it once did) or
        waits for our Hello (the rewritten library).
        """
        ours = hello or our_hello()
        await self.send_frames(ours)
        await self.wait_for(
            lambda: self.peer_hello is not None and self.count(Welcome) > 0, timeout
        )
        if self.peer_hello is None or not self.count(Welcome):
            raise HandshakeFailed(
                f"no Hello and Welcome from the target (closed={self.closed},"
                f" rejected={self.rejected()!r}, got {self.messages[:4]!r})"
            )
        theirs = self.peer_hello
        welcome = next(m for m in self.messages if isinstance(m, Welcome))
        expected = proof(credentials.secret, "server", ours, theirs)
        if not hmac.compare_digest(welcome.proof, expected):
            raise HandshakeFailed("the target's proof does not check out")
        await self.send_frames(Welcome(proof(credentials.secret, "client", ours, theirs)))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def open_peer(
    address: str,
    credentials: Credentials,
    *,
    handshake: bool = True,
    background: bool = True,
    answer_pings: bool = True,
    receive_buffer: int | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> AsyncIterator[Peer]:
    """A connection to ``address``; handshaken as a member, and read in the background, by default.

    ``background=False`` leaves reading to :meth:`Peer.wait_for`, so a test can
    stop reading (never-reading peers); the handshake itself always reads.
    """
    with trio.fail_after(timeout):
        stream = await connect(address, credentials, receive_buffer=receive_buffer)
    peer = Peer(stream, answer_pings=answer_pings)
    try:
        if handshake:
            await peer.handshake(credentials, timeout)
        async with trio.open_nursery() as nursery:
            if background:
                await nursery.start(peer.read_forever)
            yield peer
            nursery.cancel_scope.cancel()
    finally:
        await peer.aclose()


def pings(count_: int, nonce: int = 2**64 - 1) -> bytes:
    """``count_`` Ping frames in one buffer: the largest nonce makes each Pong the largest."""
    return encode(Ping(nonce)) * count_


def many_frames(messages: Iterable[Message]) -> bytes:
    return encode_many(messages, max_frame_size=2**32 - 1)


HUGE_FRAME: Final = 16 * 2**20
"""The frame the pre-authentication memory attack announces: the default frame limit."""
BODY_CHUNK: Final = 64 * 1024


async def start_of_huge_frame(
    address: str,
    credentials: Credentials,
    stop: Callable[[], bool],
    *,
    sent: Callable[[int], None] = lambda _: None,
    opened: Callable[[bool], None] = lambda _: None,
) -> Peer | None:
    """One unauthenticated connection sending (the start of) a 16 MiB frame.

    It sends the 4-byte header, then the body in 64 KiB chunks until the frame
    is complete, the target drops the connection, or ``stop()``; ``sent`` is
    told every chunk that went out. Returns the connection, still open on our
    side, for the caller to watch and close; None when it was refused outright.
    ``opened`` is told, once, whether the header got out. Shared by the
    regression test and ``benchmarks/hostile.py``.
    """
    try:
        stream = await connect(address, credentials)
    except LOST:
        opened(False)
        return None  # refused at once (maybe mid-TLS): as good as closed
    peer = Peer(stream)
    header_sent = await peer.send(header(HUGE_FRAME))
    opened(header_sent)
    if not header_sent:
        return peer
    body = b"\0" * BODY_CHUNK
    for _ in range(HUGE_FRAME // BODY_CHUNK):
        if stop() or not await peer.send(body):
            break
        sent(BODY_CHUNK)
    return peer
