"""Kubernetes probes: what a runner's health server answers, decided without I/O.

``open_runner(health=HealthConfig(port=8080))`` serves, for as long as the
runner runs (its handoff included):

- ``/livez``: 200 whenever the event loop answers at all. A runner that
  cannot answer it is wedged; restarting it is right.
- ``/readyz``: 200 once the runner serves every shard assigned to it, 503
  while it starts, while it is missing shards (its lock session is down, a
  lease was lost and is being retaken) and from the moment it begins to
  leave (SIGTERM): so the runner is taken out of service before it drains.
- ``/metrics``: the Prometheus text format, when ``metrics`` is on (the
  ``prometheus`` extra).

The server itself (``trio_cluster.runtime.probes``, on h11: the ``health``
extra) is one failure boundary per connection, with a bound on connections
and on the time and bytes of each request.
"""

from __future__ import annotations

import attrs

from .core.validation import number

__all__ = [
    "METRICS_CONTENT_TYPE",
    "HealthConfig",
    "Readiness",
    "Response",
    "respond",
    "wants_metrics",
]


@attrs.frozen
class HealthConfig:
    """Where the health server listens, and its limits."""

    host: str = "0.0.0.0"  # probes come from the kubelet, off-host
    port: int = attrs.field(default=8080, validator=number(minimum=0, maximum=65535, integer=True))
    """0 lets the system pick one (read it from ``Runner.health_address``)."""
    metrics: bool = True
    """Serve ``/metrics`` (needs the ``prometheus`` extra)."""
    max_connections: int = attrs.field(default=32, validator=number(minimum=1, integer=True))
    """Connections served at once; more are closed as they arrive."""
    request_timeout: float = attrs.field(default=5.0, validator=number(minimum=0, inclusive=False))
    """Time a connection has to send its request and take the response."""


@attrs.frozen
class Readiness:
    ready: bool
    reason: str


@attrs.frozen
class Response:
    status: int
    content_type: str
    body: bytes


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"


def respond(
    method: str, target: str, readiness: Readiness, metrics: bytes | None = None
) -> Response:
    """The answer to one request. ``metrics`` is the exposition, None when not served
    (computed by the caller only for ``/metrics``: see :func:`wants_metrics`)."""
    if method not in ("GET", "HEAD"):
        return Response(405, _TEXT, b"method not allowed\n")
    path = target.split("?", 1)[0]
    if path in ("/livez", "/healthz"):
        return Response(200, _TEXT, b"ok\n")
    if path == "/readyz":
        status = 200 if readiness.ready else 503
        return Response(status, _TEXT, readiness.reason.encode() + b"\n")
    if path == "/metrics" and metrics is not None:
        return Response(200, METRICS_CONTENT_TYPE, metrics)
    return Response(404, _TEXT, b"not found\n")


def wants_metrics(target: str) -> bool:
    return target.split("?", 1)[0] == "/metrics"
