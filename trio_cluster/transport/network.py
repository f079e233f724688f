"""A runner's links to its peers: one dialled connection per peer, and a listener.

Requests go out on the connection this runner dialled to the owner, and
their replies come back on it; requests from a peer arrive on the
connection that peer dialled. Each pair of runners thus has at most one
connection per direction, and no race over who dials whom.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from ..core.envelope import Envelope
from ..errors import ClusterError, RunnerUnavailable
from .link import PeerLink

log = logging.getLogger("trio_cluster.transport")


@attrs.frozen
class TransportConfig:
    """How runners reach each other.

    ``host`` and ``port`` are where this runner listens (port 0: any free
    one); ``advertise`` is the host peers should dial, when it differs.
    ``secret`` authenticates peers as members of ``cluster``. With
    ``tls_server`` (for accepted connections) and ``tls_client`` (for
    dialled ones, checked against the dialled host) links run over TLS,
    which also encrypts and protects what follows the handshake.
    """

    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None
    cluster: str = "trio_cluster"
    secret: bytes | None = None
    connect_timeout: float = 2.0
    ping_interval: float = 1.0
    tls_server: ssl.SSLContext | None = None
    tls_client: ssl.SSLContext | None = None

    def __attrs_post_init__(self) -> None:
        if (self.tls_server is None) != (self.tls_client is None):
            raise ValueError("TLS needs both tls_server and tls_client: a runner accepts and dials")


class Network:
    def __init__(
        self,
        config: TransportConfig,
        address: str,
        nursery: trio.Nursery,
        *,
        on_request: Callable[[PeerLink, Envelope], None],
        on_reply: Callable[[int, bytes], None],
        on_failure: Callable[[int, ClusterError], None],
        on_peer_lost: Callable[[str], None],
    ) -> None:
        self.config = config
        self.address = address
        self._nursery = nursery
        self._on_request = on_request
        self._on_reply = on_reply
        self._on_failure = on_failure
        self._on_peer_lost = on_peer_lost
        self._links: dict[str, PeerLink] = {}
        self._dialling: dict[str, trio.Event] = {}
        self._inbound: set[PeerLink] = set()

    def _link(self, stream: trio.abc.Stream, role: str) -> PeerLink:
        config = self.config
        return PeerLink(
            stream,
            our_address=self.address,
            cluster=config.cluster,
            secret=config.secret,
            role="client" if role == "client" else "server",
            on_request=self._on_request,
            on_reply=self._on_reply,
            on_failure=self._on_failure,
            ping_interval=config.ping_interval,
        )

    async def send_request(self, peer: str, envelope: Envelope) -> None:
        """Queue a request on the link to ``peer``, dialling it first if needed."""
        link = self._links.get(peer)
        if link is None or not link.open:
            link = await self._dial(peer)
        link.send_request(envelope)

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
                link = self._link(stream, "client")
                await self._nursery.start(self._keep, peer, link)
        except (OSError, ValueError, trio.TooSlowError) as error:
            raise RunnerUnavailable(f"cannot reach {peer}: {error}") from error
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
        except ClusterError as error:
            log.info("link to %s failed: %s", peer, error)
            raise
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
        stream: trio.abc.Stream = socket_stream
        if self.config.tls_server is not None:
            stream = trio.SSLStream(stream, self.config.tls_server, server_side=True)
        link = self._link(stream, "server")
        self._inbound.add(link)
        try:
            await link.run()
        except ClusterError as error:
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
