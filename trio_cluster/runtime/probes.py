"""The health server: HTTP/1.1 on h11 (the ``health`` extra), one request per connection.

Each connection is its own failure boundary: whatever a client sends (or
fails to send) ends that connection only. Connections beyond
``max_connections`` are closed as they arrive, and each has
``request_timeout`` seconds in all, so a slow or idle client holds nothing
for long. What to answer is decided by :func:`trio_cluster.health.respond`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

try:
    import h11
except ImportError as error:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "the health server needs the health extra: pip install 'trio-cluster[health]'"
    ) from error

from ..health import HealthConfig, Readiness, Response, respond, wants_metrics

log = logging.getLogger("trio_cluster.health")

MAX_REQUEST_HEAD = 8 * 1024
"""A probe's request is a line and a few headers; anything larger is refused."""


class HealthServer:
    """Serves the probes of one runner; ``address`` is set once it listens."""

    def __init__(
        self, config: HealthConfig, metrics: Callable[[], Awaitable[bytes]] | None
    ) -> None:
        self._config = config
        self._metrics = metrics
        self.readiness: Callable[[], Readiness] = _starting
        """Asked at each probe; the runner sets its own once it exists."""
        self._limiter = trio.CapacityLimiter(config.max_connections)
        self.address: tuple[str, int] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then answer probes until cancelled."""
        listeners = await trio.open_tcp_listeners(self._config.port, host=self._config.host)
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = (host, port)
        log.info("health server on http://%s:%d", host, port)
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.move_on_after(self._config.request_timeout):
                await self._exchange(stream)
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client's problem, and its connection's alone
        except Exception:
            log.exception("health server failed on a connection")
        finally:
            self._limiter.release()
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request = await _read_request(stream, conn)
        if request is None:
            return
        target = request.target.decode("ascii", "replace")
        scrape = self._metrics if wants_metrics(target) else None
        exposition = None if scrape is None else await scrape()
        answer = respond(
            request.method.decode("ascii", "replace"), target, self.readiness(), exposition
        )
        head_only = request.method == b"HEAD"
        await _send(stream, conn, answer, head_only)


def _starting() -> Readiness:
    return Readiness(False, "starting")


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)  # b"" marks the end of the stream
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # the client closed without a request


async def _send(
    stream: trio.SocketStream, conn: h11.Connection, answer: Response, head_only: bool
) -> None:
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    data = conn.send(h11.Response(status_code=answer.status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=answer.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
