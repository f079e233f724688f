"""Prometheus metrics of a runner (the ``prometheus`` extra): an instrument.

Give ``PrometheusMetrics()`` to ``open_runner(instruments=[...])``, or let
the health server make one (``HealthConfig(metrics=True)``, the default):
``/metrics`` then serves it. Each instance has its own registry unless you
pass one, so runners sharing a process do not add into each other's figures.

Every figure is kept from the runner's events, none is polled: gauges move
when entities activate, shards are taken, runners join. Labels are bounded:
entity type, RPC, outcome, error reason, storage operation; never an entity
id. An RPC name reaches a label only once a handler ran it or this runner's
own code sent it, so a hostile peer cannot mint label values. See
docs/operations.md for every name.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

try:
    import prometheus_client as prom
except ImportError as error:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "trio_cluster.prometheus needs the prometheus extra: pip install 'trio-cluster[prometheus]'"
    ) from error

from .instrument import Instrument, Outcome

if TYPE_CHECKING:
    from .core.hashing import ShardId
    from .runtime.calls import Call, Handling
    from .runtime.context import EntityAddress

__all__ = ["LATENCY_BUCKETS", "PrometheusMetrics"]

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Seconds, from a volatile local ask (about 100 µs) to a send timeout."""

_NOT_ERRORS = frozenset({"success", "error", "cancelled"})


class PrometheusMetrics(Instrument):
    """The seeds' metrics and latency histograms, as a Prometheus registry."""

    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        self.entities = prom.Gauge(
            "trio_cluster_entities",
            "Entities resident on this runner.",
            ["entity_type"],
            registry=r,
        )
        self.shards = prom.Gauge(
            "trio_cluster_shards", "Shards this runner serves.", ["group"], registry=r
        )
        self.runners = prom.Gauge(
            "trio_cluster_runners",
            "Runners in the membership (registered, lock session alive), as seen here.",
            registry=r,
        )
        self.waiting_callers = prom.Gauge(
            "trio_cluster_waiting_callers", "Asks made here waiting for their reply.", registry=r
        )
        self.requests = prom.Histogram(
            "trio_cluster_request_seconds",
            "From ask/tell to its answer (ask) or acceptance (tell), on the caller.",
            ["entity_type", "rpc", "kind", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handling = prom.Histogram(
            "trio_cluster_handling_seconds",
            "From a request leaving the mailbox to its final reply (stored, if persisted).",
            ["entity_type", "rpc", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.storage = prom.Histogram(
            "trio_cluster_storage_write_seconds",
            "Storage writes for requests: the request, its reply, an entity's state.",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = prom.Counter(
            "trio_cluster_errors",
            "ClusterErrors raised to callers on this runner.",
            ["reason"],
            registry=r,
        )
        self.refused = prom.Counter(
            "trio_cluster_refused",
            "Requests turned away before a handler (full mailbox, not owned, malformed).",
            ["reason"],
            registry=r,
        )
        self.redeliveries = prom.Counter(
            "trio_cluster_redeliveries",
            "Persisted requests handled after being read back by a redelivery scan.",
            ["entity_type"],
            registry=r,
        )
        self.defects = prom.Counter(
            "trio_cluster_defects",
            "Undeclared exceptions raised by handlers (each attempt counts).",
            ["entity_type", "rpc"],
            registry=r,
        )
        self.activations = prom.Counter(
            "trio_cluster_activations", "Entities made resident.", ["entity_type"], registry=r
        )
        self.passivations = prom.Counter(
            "trio_cluster_passivations", "Entities let go.", ["entity_type"], registry=r
        )
        self.shards_acquired = prom.Counter(
            "trio_cluster_shard_acquisitions",
            "Shard leases taken by this runner (start, rebalance, failover).",
            ["group"],
            registry=r,
        )
        self.shards_stopped = prom.Counter(
            "trio_cluster_shard_stops",
            "Shards this runner stopped serving: released, lost (lease loss) or failed.",
            ["group", "how"],
            registry=r,
        )
        self.contained = prom.Counter(
            "trio_cluster_contained_failures",
            "Bugs of the runtime caught at a failure boundary (each also logged).",
            ["where"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, for a ``/metrics`` response."""
        return prom.generate_latest(self.registry)

    # -- events -------------------------------------------------------------------

    def request_sent(self, call: Call) -> None:
        if call.kind == "ask":
            self.waiting_callers.inc()

    def request_finished(self, call: Call, outcome: Outcome) -> None:
        if call.kind == "ask":
            self.waiting_callers.dec()
        elapsed = _elapsed(call.started)
        self.requests.labels(call.entity_type, call.rpc, call.kind, outcome).observe(elapsed)
        if outcome not in _NOT_ERRORS:
            self.errors.labels(outcome).inc()

    def handling_started(self, handling: Handling) -> None:
        if handling.redelivered:
            self.redeliveries.labels(handling.address.entity_type).inc()

    def handling_finished(self, handling: Handling, outcome: Outcome) -> None:
        entity_type = handling.address.entity_type
        elapsed = _elapsed(handling.started)
        self.handling.labels(entity_type, handling.rpc, outcome).observe(elapsed)

    def defect(self, handling: Handling, error: Exception) -> None:
        self.defects.labels(handling.address.entity_type, handling.rpc).inc()

    def request_refused(self, entity_type: str, rpc: str, reason: str) -> None:
        self.refused.labels(reason).inc()

    def storage_written(self, operation: str, seconds: float, outcome: Outcome) -> None:
        self.storage.labels(operation, outcome).observe(seconds)

    def entity_activated(self, address: EntityAddress) -> None:
        self.entities.labels(address.entity_type).inc()
        self.activations.labels(address.entity_type).inc()

    def entity_passivated(self, address: EntityAddress) -> None:
        self.entities.labels(address.entity_type).dec()
        self.passivations.labels(address.entity_type).inc()

    def shard_acquired(self, shard: ShardId, epoch: int) -> None:
        self.shards.labels(shard.group).inc()
        self.shards_acquired.labels(shard.group).inc()

    def shard_stopped(self, shard: ShardId, how: str) -> None:
        self.shards.labels(shard.group).dec()
        self.shards_stopped.labels(shard.group, how).inc()

    def runner_joined(self, address: str) -> None:
        self.runners.inc()

    def runner_left(self, address: str) -> None:
        self.runners.dec()

    def contained_failure(self, where: str, error: BaseException) -> None:
        self.contained.labels(where).inc()


def _elapsed(started: float) -> float:
    return time.perf_counter() - started
