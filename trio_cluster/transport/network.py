"""A runner's links to its peers: one dialled connection per peer, and a listener.

Requests go out on the connection this runner dialled to the owner, and
their replies come back on it; requests from a peer arrive on the
connection that peer dialled. Each pair of runners thus has at most one
connection per direction, and no race over who dials whom.

Accepting is bounded: at most ``max_inbound_connections`` accepted links at
once, of which at most ``max_handshakes`` not yet authenticated; a
connection over either bound is closed as soon as it is accepted, before a
byte is read or written.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..core.envelope import Envelope
from ..core.reply import ReplyTarget
from ..core.streaming import ChunkReceiver
from ..errors import RunnerUnavailable
from .config import TransportConfig
from .link import LinkReply, LinkSettings, PeerLink

__all__ = ["Network", "TransportConfig", "open_listeners"]

log = logging.getLogger("trio_cluster.transport")


class Network:
    def __init__(
        self,
        config: TransportConfig,
        address: str,
        nursery: trio.Nursery,
        *,
        on_request: Callable[[LinkReply, Envelope], None],
        on_peer_lost: Callable[[str], None],
    ) -> None:
        self.config = config
        self.address = address
        self._nursery = nursery
        self._on_request = on_request
        self._on_peer_lost = on_peer_lost
        self._settings = LinkSettings(
            our_address=address,
            cluster=config.cluster,
            secret=config.secret,
            ping_interval=config.ping_interval,
            handshake_timeout=config.handshake_timeout,
            max_frame_size=config.max_frame_size,
            max_unsent=config.max_unsent,
            max_requests=config.max_requests_per_link,
            mutual_tls=config.mutual_tls,
        )
        self._links: dict[str, PeerLink] = {}
        self._dialling: dict[str, trio.Event] = {}
        self._inbound: set[PeerLink] = set()
        self.refused_connections = 0

    @property
    def handshaking(self) -> int:
        return sum(1 for link in self._inbound if not link.open)

    async def send_request(
        self, peer: str, envelope: Envelope, target: ReplyTarget, *, ack: bool = False
    ) -> PeerLink:
        """Queue a request on the link to ``peer`` (dialling it first if needed); return the link.

        The reply, or the link's failure, goes to ``target`` (with ``ack``, as
        soon as the peer queued or refused it); the caller withdraws the
        request from the returned link if it stops waiting.
        """
        link = await self.link_to(peer)
        link.send_request(envelope, target, ack=ack)
        return link

    async def send_stream(self, peer: str, envelope: Envelope, receiver: ChunkReceiver) -> PeerLink:
        """Queue a streaming request on the link to ``peer``, as ``send_request`` does."""
        link = await self.link_to(peer)
        link.send_stream(envelope, receiver)
        return link

    def connected(self, peer: str) -> bool:
        """Whether a request to ``peer`` goes out at once, with no dialling first."""
        link = self._links.get(peer)
        return link is not None and link.open

    async def link_to(self, peer: str) -> PeerLink:
        """The open link to ``peer``, dialled first if there is none."""
        link = self._links.get(peer)
        if link is None or not link.open:
            link = await self._dial(peer)
        return link

    async def _dial(self, peer: str) -> PeerLink:
        pending = self._dialling.get(peer)
        if pending is not None:
            await pending.wait()
            link = self._links.get(peer)
            if link is None or not link.open:
                raise RunnerUnavailable(f"cannot reach {peer}")
            return link
        self._dialling[peer] = done = trio.Event()
        try:
            host, _, port = peer.rpartition(":")
            with trio.fail_after(self.config.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, int(port))
            if self.config.tls_client is not None:
                stream = trio.SSLStream(stream, self.config.tls_client, server_hostname=host)
            link = PeerLink(
                stream,
                "client",
                self._settings,
                on_request=self._on_request,
                expected_peer=peer,
            )
            await self._nursery.start(self._keep, peer, link)
        except (OSError, ValueError, trio.TooSlowError) as error:
            raise RunnerUnavailable(f"cannot reach {peer}: {error!r}") from error
        else:
            self._links[peer] = link
            return link
        finally:
            del self._dialling[peer]
            done.set()

    async def _keep(self, peer: str, link: PeerLink, *, task_status: trio.TaskStatus[None]) -> None:
        """Run a dialled link; when it ends, tell the runner the peer may be gone."""
        try:
            await link.run(task_status=task_status)
        finally:
            if self._links.get(peer) is link:
                del self._links[peer]
                self._on_peer_lost(peer)

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.serve_listeners(
            self._accepted, listeners, handler_nursery=self._nursery, task_status=task_status
        )

    async def _accepted(self, socket_stream: trio.SocketStream) -> None:
        """One accepted connection, to its end; never raises (a failure ends this link only)."""
        config = self.config
        if (
            len(self._inbound) >= config.max_inbound_connections
            or self.handshaking >= config.max_handshakes
        ):
            self.refused_connections += 1
            await trio.aclose_forcefully(socket_stream)
            return
        stream: trio.abc.Stream = socket_stream
        if config.tls_server is not None:
            stream = trio.SSLStream(stream, config.tls_server, server_side=True)
        link = PeerLink(stream, "server", self._settings, on_request=self._on_request)
        self._inbound.add(link)
        try:
            await link.run()
        except RunnerUnavailable as error:
            log.info("refused a connection: %s", error)
        finally:
            self._inbound.discard(link)

    async def aclose(self, reason: str, grace: float) -> None:
        """Send what is queued (replies above all), then Goodbye, on every link.

        Replies to requests that ran during the drain would otherwise be
        cut off with the connection, and their callers told the runner
        was unavailable although it answered.
        """
        links = [*self._links.values(), *self._inbound]
        for link in links:
            link.close(reason)
        with trio.move_on_after(grace):
            for link in links:
                await link.finished()


@asynccontextmanager
async def open_listeners(
    config: TransportConfig,
) -> AsyncIterator[tuple[list[trio.SocketListener], str]]:
    """Bind before registering, so the address peers are told is one that answers."""
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    try:
        port = listeners[0].socket.getsockname()[1]
        yield listeners, f"{config.advertise or config.host}:{port}"
    finally:
        for listener in listeners:
            await listener.aclose()
