"""What the runner program, the client program and the harness must agree on.

The shard layout, the lease timing, the entity and its RPCs, the traffic
entities and the runs table. Importing this module starts nothing.
"""

from __future__ import annotations

import msgspec

from trio_cluster import Entity, EntityOptions, ShardingConfig, TransportConfig
from trio_cluster.pgdriver import Connection
from trio_cluster.postgres.leases import LeaseTiming

SHARDS = 12

LEASE_TIMING = LeaseTiming(
    heartbeat_interval=0.5,
    liveness_timeout=1.0,
    keepalive_idle=1,
    keepalive_interval=1,
    keepalive_count=2,
    user_timeout_ms=3000,
    idle_session_timeout_ms=3000,
)
"""Quick leases, so that a SIGSTOP past the lease costs seconds, not minutes.

The runner gives a silent lock connection up after ``heartbeat_interval +
liveness_timeout`` (1.5 s); the server frees a silent holder's locks after
3 s (keepalives, user timeout, idle-session timeout), so the server's bound
stays the larger, as ``docs/operations.md`` asks.
"""

RUNNER_GIVES_UP_S = LEASE_TIMING.heartbeat_interval + LEASE_TIMING.liveness_timeout
SERVER_FREES_S = LEASE_TIMING.idle_session_timeout_ms / 1000

CONFIG = ShardingConfig(
    shards_per_group=SHARDS,
    send_timeout=10.0,
    entity_termination_timeout=3.0,
    entity_defaults=EntityOptions(keep_alive=True),
)
"""Shared by the runners and the client: they must agree on the shard layout."""


class Post(msgspec.Struct, frozen=True):
    key: str


class Outcome(msgspec.Struct, frozen=True):
    """What one handler run answered: its process and its run id (unique per run)."""

    pid: int
    run: str


class Echo(msgspec.Struct, frozen=True):
    text: str


class Echoed(msgspec.Struct, frozen=True):
    text: str
    entity_id: str
    pid: int


Worker = Entity("FaultWorker")
post = Worker.rpc("post", Post, Outcome, primary_key=lambda p: p.key, persisted=True)
"""Persisted and idempotent by ``key``; answers which run (and process) handled it."""
echo = Worker.rpc("echo", Echo, Echoed)
"""Volatile: travels runner to runner over TCP, never stored."""

ENTRY = "entry"
EXIT = "exit"


def traffic_entities(per_shard: int = 2) -> list[str]:
    """``per_shard`` entity ids in every shard, so every shard sees traffic."""
    buckets: list[list[str]] = [[] for _ in range(SHARDS)]
    number = 0
    while any(len(bucket) < per_shard for bucket in buckets):
        entity_id = f"e{number}"
        bucket = buckets[Worker.shard_of(entity_id, SHARDS).index]
        if len(bucket) < per_shard:
            bucket.append(entity_id)
        number += 1
    return [entity_id for bucket in buckets for entity_id in bucket]


ENTITIES = traffic_entities()


def transport(prefix: str) -> TransportConfig:
    return TransportConfig(host="127.0.0.1", cluster=prefix)


def runs_table(prefix: str) -> str:
    return f"{prefix}runs"


async def create_runs(conn: Connection, prefix: str) -> None:
    """One row per phase of a handler run, keyed by the run id so retried inserts dedup.

    ``at`` is the server's clock at insert time (``clock_timestamp()``).
    """
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {runs_table(prefix)} ("
        " run text NOT NULL, phase text NOT NULL, entity_id text NOT NULL,"
        " request_key text NOT NULL, pid int NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (run, phase))"
    )
