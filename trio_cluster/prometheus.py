"""Prometheus metrics of a runner (the ``prometheus`` extra): an instrument.

Give ``PrometheusMetrics()`` to ``open_runner(instruments=[...])``, or let
the health server make one (``HealthConfig(metrics=True)``, the default):
``/metrics`` then serves it. Each instance has its own registry unless you
pass one, so runners sharing a process do not add into each other's figures.

Figures are kept from the runner's events (gauges move when entities
activate, shards are taken, runners join), except two sampled when scraped:
the mailbox depth (read from the runner, free) and the persisted backlog
per shard (one status read of the storage, at most every
``backlog_interval`` seconds, so frequent scrapes cost the database
nothing more). Labels are bounded: entity type, RPC, outcome, error
reason, storage operation, schedule, the name of a singleton declared here;
never an entity id, nor a timer's or a deferred's name. An RPC name reaches
a label only once a handler ran it or this runner's own code sent it, so a
hostile peer cannot mint label values. See docs/operations.md for every name.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import trio

try:
    import prometheus_client as prom
except ImportError as error:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "trio_cluster.prometheus needs the prometheus extra: pip install 'trio-cluster[prometheus]'"
    ) from error

from .errors import ClusterError
from .instrument import Instrument, Outcome

if TYPE_CHECKING:
    from .core.hashing import ShardId
    from .runtime.calls import Call, Handling
    from .runtime.context import EntityAddress
    from .runtime.runner import Runner

__all__ = ["LATENCY_BUCKETS", "PrometheusMetrics"]

log = logging.getLogger("trio_cluster.prometheus")

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

    def __init__(
        self, registry: prom.CollectorRegistry | None = None, *, backlog_interval: float = 10.0
    ) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._runner: Runner | None = None
        self._backlog_interval = backlog_interval
        self._backlog_read_at = -math.inf
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
        self.mailbox_depth = prom.Gauge(
            "trio_cluster_mailbox_depth",
            "Requests waiting in the mailboxes of the entities resident here.",
            registry=r,
        )
        self.backlog = prom.Gauge(
            "trio_cluster_backlog",
            "Persisted requests without a final reply, per shard served here.",
            ["group", "shard"],
            registry=r,
        )
        self.backlog_age = prom.Gauge(
            "trio_cluster_backlog_oldest_seconds",
            "Age of the oldest persisted request waiting, per shard served here.",
            ["group", "shard"],
            registry=r,
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
        self.timers = prom.Counter(
            "trio_cluster_timers",
            "Entity timers armed (re-arming counts again), fired (once per delivery) or"
            " cancelled before they were due, here.",
            ["entity_type", "how"],
            registry=r,
        )
        self.deferred_suspensions = prom.Counter(
            "trio_cluster_deferred_suspensions",
            "Runs of persisted requests that ended suspended on a deferred here.",
            ["entity_type"],
            registry=r,
        )
        self.deferred_completions = prom.Counter(
            "trio_cluster_deferred_completions",
            "Deferreds completed with a value, or failed, through this runner's client.",
            ["how"],
            registry=r,
        )
        self.schedules = prom.Gauge(
            "trio_cluster_schedules",
            "Schedules driven by this runner (their singleton's lease held here).",
            registry=r,
        )
        self.schedule_firings = prom.Counter(
            "trio_cluster_schedule_firings",
            "Scheduled instants whose firing was recorded here.",
            ["schedule"],
            registry=r,
        )
        self.schedule_lateness = prom.Histogram(
            "trio_cluster_schedule_lateness_seconds",
            "How late after falling due (jitter included) each scheduled instant fired.",
            ["schedule"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.schedule_skips = prom.Counter(
            "trio_cluster_schedule_skips",
            "Times the missed-run policy passed over missed instants.",
            ["schedule"],
            registry=r,
        )
        self.schedule_failures = prom.Counter(
            "trio_cluster_schedule_failures",
            "Firings that failed: a scheduled function raised, or telling the entity did.",
            ["schedule"],
            registry=r,
        )
        self.singletons = prom.Gauge(
            "trio_cluster_singletons",
            "1 while this runner holds the singleton's lease (running or restarting), else 0.",
            ["singleton"],
            registry=r,
        )
        self.singleton_starts = prom.Counter(
            "trio_cluster_singleton_starts",
            "Singleton leases taken by this runner (start, handoff, failover).",
            ["singleton"],
            registry=r,
        )
        self.singleton_stops = prom.Counter(
            "trio_cluster_singleton_stops",
            "Singletons this runner stopped running: released (handed off) or lost.",
            ["singleton", "how"],
            registry=r,
        )
        self.singleton_failures = prom.Counter(
            "trio_cluster_singleton_failures",
            "Times a singleton's function raised here (it runs again after a backoff).",
            ["singleton"],
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

    async def scrape(self) -> bytes:
        """The exposition, with the backlog read again if it is older than its interval."""
        await self.refresh_backlog()
        return self.exposition()

    async def refresh_backlog(self) -> None:
        """Read the backlog of the runner's shards (see ``backlog_interval``). A storage
        that cannot be read leaves the last figures, and a warning in the log."""
        runner, now = self._runner, trio.current_time()
        if runner is None or now - self._backlog_read_at < self._backlog_interval:
            return
        self._backlog_read_at = now
        try:
            shards = await runner.backlog()
        except ClusterError as error:
            log.warning("cannot read the backlog for the metrics: %s", error)
            return
        self.backlog.clear()
        self.backlog_age.clear()
        for shard_id, shard in shards.items():
            labels = (shard_id.group, str(shard_id.index))
            self.backlog.labels(*labels).set(shard.backlog)
            if shard.oldest_age is not None:
                self.backlog_age.labels(*labels).set(shard.oldest_age)

    # -- events -------------------------------------------------------------------

    def runner_opened(self, runner: Runner) -> None:
        self._runner = runner
        self.mailbox_depth.set_function(runner.mailbox_depth)
        self.schedules.set_function(lambda: len(runner.schedules))

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
        if outcome == "suspended":
            self.deferred_suspensions.labels(entity_type).inc()

    def defect(self, handling: Handling, error: Exception) -> None:
        self.defects.labels(handling.address.entity_type, handling.rpc).inc()

    def request_refused(self, entity_type: str, rpc: str, reason: str) -> None:
        self.refused.labels(reason).inc()

    def storage_written(self, operation: str, seconds: float, outcome: Outcome) -> None:
        self.storage.labels(operation, outcome).observe(seconds)

    def timer_changed(self, address: EntityAddress, name: str, how: str) -> None:
        self.timers.labels(address.entity_type, how).inc()

    def deferred_completed(self, request_id: int, name: str, failed: bool) -> None:
        self.deferred_completions.labels("failed" if failed else "completed").inc()

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

    def schedule_fired(self, name: str, instant: int, late: float) -> None:
        self.schedule_firings.labels(name).inc()
        self.schedule_lateness.labels(name).observe(late)

    def schedule_skipped(self, name: str) -> None:
        self.schedule_skips.labels(name).inc()

    def schedule_failed(self, name: str, error: BaseException) -> None:
        self.schedule_failures.labels(name).inc()

    def singleton_started(self, name: str, epoch: int) -> None:
        self.singletons.labels(name).set(1)
        self.singleton_starts.labels(name).inc()

    def singleton_stopped(self, name: str, how: str) -> None:
        self.singletons.labels(name).set(0)
        self.singleton_stops.labels(name, how).inc()

    def singleton_failed(self, name: str, error: BaseException) -> None:
        self.singleton_failures.labels(name).inc()

    def contained_failure(self, where: str, error: BaseException) -> None:
        self.contained.labels(where).inc()


def _elapsed(started: float) -> float:
    return time.perf_counter() - started
