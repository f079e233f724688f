"""One TCP connection to another runner: the Trio I/O around a sans-I/O PeerConnection.

Three tasks per link, all in the link's own nursery: a reader feeding bytes
to the state machine, a writer flushing whatever it has queued in one
``send_all`` (so a burst of messages costs one system call, not one per
message), and a pinger that closes a link the peer has stopped answering.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import trio

from ..core.envelope import Envelope
from ..core.frames import Ping, Reply, Request
from ..core.protocol import (
    Closed,
    Event,
    Handshaken,
    PeerConnection,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    Role,
    State,
)
from ..errors import ClusterError, RunnerUnavailable

log = logging.getLogger("trio_cluster.transport")

READ_SIZE = 256 * 1024
MAX_UNSENT = 64 * 1024 * 1024
"""Bytes queued for a peer that is not reading, before sends to it fail fast."""


class PeerLink:
    """A connection, open or opening, to one peer runner."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        our_address: str,
        cluster: str,
        secret: bytes | None,
        role: Role,
        on_request: Callable[[PeerLink, Envelope], None],
        on_reply: Callable[[int, bytes], None],
        on_failure: Callable[[int, ClusterError], None],
        ping_interval: float,
    ) -> None:
        self._stream = stream
        self._conn = PeerConnection(our_address, cluster, secret, role, secrets.token_bytes(32))
        self._on_request = on_request
        self._on_reply = on_reply
        self._on_failure = on_failure
        self._ping_interval = ping_interval
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._finished = trio.Event()
        self._sending = trio.Lock()
        self._wake_writer = trio.Event()
        self._heard_from_peer = True
        # Requests sent and not yet answered: failed at once if the link drops.
        self.in_flight: set[int] = set()
        self.peer: str | None = None
        self.close_reason = ""

    @property
    def open(self) -> bool:
        # A reset connection closes the link before the state machine
        # hears of it: nothing may be queued on it from then on.
        return self._conn.state is State.OPEN and not self._closed.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handshake, then carry messages until either side closes.

        ``task_status.started()`` fires once the peer proved itself; a
        handshake that fails raises RunnerUnavailable (from ``start``, for
        a dialled link). A lost connection after that is a normal end.
        """
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                nursery.start_soon(self._write)
                await self._stream.send_all(self._conn.initiate())
                with trio.move_on_after(self._ping_interval * 3):
                    await self._ready.wait()
                if self.open:
                    task_status.started()
                    started = True
                    nursery.start_soon(self._ping)
                    await self._closed.wait()
                # Best effort: a Goodbye or Reject is queued for the peer.
                with trio.move_on_after(self._ping_interval):
                    await self._flush()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as lost:
            self._close(f"connection lost: {lost.exceptions[0]}")
        finally:
            self._close("link ended")
            self._fail_in_flight()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            self._finished.set()
        if not started:
            raise RunnerUnavailable(f"handshake failed: {self.close_reason or 'timed out'}")

    async def finished(self) -> None:
        """Wait until the link is over and its socket closed."""
        await self._finished.wait()

    def send_request(self, envelope: Envelope) -> None:
        self._send(Request(envelope))
        self.in_flight.add(envelope.request_id)

    def send_reply(self, request_id: int, reply: bytes) -> None:
        if self.open:
            self._send(Reply(request_id, reply))

    def close(self, reason: str) -> None:
        """Say Goodbye once what is queued has gone out."""
        self._conn.close(reason)
        self._close(reason)

    def _send(self, message: Request | Reply | Ping) -> None:
        if not self.open:
            raise RunnerUnavailable(f"link to {self.peer} is closed: {self.close_reason}")
        if len(self._conn._outgoing) > MAX_UNSENT:
            raise RunnerUnavailable(f"{self.peer} is not reading: {MAX_UNSENT} bytes queued")
        self._conn.send(message)
        self._wake_writer.set()

    async def _read(self) -> None:
        while True:
            data = await self._stream.receive_some(READ_SIZE)
            self._heard_from_peer = True
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
            case RequestReceived(envelope):
                self._on_request(self, envelope)
            case ReplyReceived(request_id, reply):
                self.in_flight.discard(request_id)
                self._on_reply(request_id, reply)
            case Handshaken(peer_runner):
                self.peer = peer_runner
                self._ready.set()
            case Closed(reason, _):
                log.info("link to %s closed: %s", self.peer, reason)
                self._close(reason)
            case PongReceived():
                pass

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
        """Close a link whose peer has been silent for two intervals despite a Ping."""
        nonce = 0
        while True:
            self._heard_from_peer = False
            await trio.sleep(self._ping_interval)
            if self._heard_from_peer:
                continue
            nonce += 1
            self._send(Ping(nonce))
            await trio.sleep(self._ping_interval)
            if not self._heard_from_peer:
                self.close(f"no answer for {2 * self._ping_interval} s")
                return

    def _close(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self._ready.set()
        self._closed.set()

    def _fail_in_flight(self) -> None:
        """A volatile request whose link dropped may or may not have run: say so now."""
        for request_id in self.in_flight:
            self._on_failure(
                request_id,
                RunnerUnavailable(f"connection to {self.peer} lost: {self.close_reason}"),
            )
        self.in_flight.clear()
