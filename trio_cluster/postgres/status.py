"""The status view's reads from PostgreSQL: plain SELECTs, no lock taken, nothing written.

Liveness and ownership are decided as the runtime decides them, by the
session advisory locks themselves (read from ``pg_locks``), never by a
timestamp: a runner is alive while its lock connection holds its
machine-id lock (as in ``PostgresStorage.live_runners``), and a shard is
owned while some lock connection holds its lock. A shard's row in
``{prefix}shards`` only says who took its latest lease, and under which
epoch; it outlives a killed owner.

The lock namespaces are looked up, never created (``lock_namespace``
would insert one): a namespace nobody created holds no lock. The reads
run in one read-only repeatable-read transaction, so the tables agree
with each other; ``pg_locks`` is read live.
"""

from __future__ import annotations

from typing import Any

from ..core.hashing import ShardId
from ..errors import PersistenceError
from ..pgdriver.connection import Connection
from ..storage.status import ClusterStatus, RunnerStatus, shard_map
from .schema import NAMESPACES_TABLE


def _held(lock: str, namespace: str) -> str:
    """SQL: ``lock`` is a granted two-key advisory lock (``pg_try_advisory_lock(int, int)``)
    in ``namespace``."""
    return (
        f"{lock}.locktype = 'advisory' AND {lock}.granted AND {lock}.objsubid = 2"
        f" AND {lock}.classid = {namespace}.id::oid"
    )


async def read_status(
    conn: Connection, prefix: str, *, shards_per_group: int | None = None
) -> ClusterStatus:
    """The cluster under ``prefix`` as ``conn``'s server sees it now.

    Raises PersistenceError when the database holds no cluster under
    ``prefix`` (its schema was never created), rather than an SQL error.
    """
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        read_at, exists = await _fetchrow(
            conn,
            "SELECT now(), to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            [f"{prefix}runners", NAMESPACES_TABLE],
        )
        if not exists:
            raise PersistenceError(f"no cluster with table prefix {prefix!r} in this database")
        runners = await _runners(conn, prefix)
        owners = await _owners(conn, prefix)
        epochs = {
            ShardId(group, int(index)): int(epoch)
            for group, index, epoch in await conn.fetch(
                f"SELECT shard_group, shard_index, epoch FROM {prefix}shards"
            )
        }
        backlog = {
            ShardId(group, int(index)): (int(count), float(age))
            for group, index, count, age in await conn.fetch(
                "SELECT shard_group, shard_index, count(*),"
                " extract(epoch FROM now() - min(stored_at))::float8"
                f" FROM {prefix}messages WHERE NOT processed GROUP BY shard_group, shard_index"
            )
        }
    groups = shard_map(
        groups=(group for runner in runners for group in runner.groups),
        shards_per_group=shards_per_group,
        owners=owners,
        epochs=epochs,
        backlog=backlog,
    )
    return ClusterStatus(
        read_at=read_at, shards_per_group=shards_per_group, runners=runners, groups=groups
    )


async def _fetchrow(conn: Connection, sql: str, params: list[Any]) -> tuple[Any, ...]:
    row = await conn.fetchrow(sql, params)
    assert row is not None, "a SELECT without FROM returns one row"
    return row


async def _runners(conn: Connection, prefix: str) -> tuple[RunnerStatus, ...]:
    """Every registered runner; alive while its lock connection holds its machine-id lock.

    Heartbeats write nothing, so a live runner's last heartbeat is when its lock
    connection's backend last changed state (``pg_stat_activity``); a dead one's
    row says when it registered.
    """
    rows = await conn.fetch(
        "SELECT machine_id, address, weight, groups, registered_at, CASE WHEN alive THEN"
        " coalesce((SELECT a.state_change FROM pg_stat_activity AS a WHERE a.pid = lock_pid),"
        " heartbeat_at) ELSE heartbeat_at END, alive FROM ("
        " SELECT r.*,"
        f" EXISTS (SELECT 1 FROM pg_locks AS l JOIN {NAMESPACES_TABLE} AS n ON n.name = $1"
        f" WHERE {_held('l', 'n')} AND l.objid = r.machine_id::oid AND l.pid = r.lock_pid)"
        f" AS alive FROM {prefix}runners AS r) AS r ORDER BY machine_id",
        [f"{prefix}:runners"],
    )
    return tuple(
        RunnerStatus(
            machine_id=int(machine_id),
            address=address,
            alive=alive,
            weight=float(weight),
            groups=tuple(sorted(filter(None, groups.split(",")))),
            registered_at=registered_at,
            heartbeat_at=heartbeat_at,
        )
        for machine_id, address, weight, groups, registered_at, heartbeat_at, alive in rows
    )


async def _owners(conn: Connection, prefix: str) -> dict[ShardId, int]:
    """Each shard whose lock is held, and the machine id holding it.

    The holder is the machine whose id is locked by the same lock
    connection: that lock lasts the whole session, even after the runner
    has left the runners table to hand its shards off. Should it be
    missing, the shard's row names the holder.
    """
    groups = f"{prefix}:group:"
    rows = await conn.fetch(
        "SELECT substr(n.name, $2), l.objid::int8, coalesce(m.machine_id, s.machine_id)"
        f" FROM pg_locks AS l JOIN {NAMESPACES_TABLE} AS n ON starts_with(n.name, $1)"
        " LEFT JOIN (SELECT ml.pid, ml.objid::int8 AS machine_id FROM pg_locks AS ml"
        f" JOIN {NAMESPACES_TABLE} AS mn ON mn.name = $3 WHERE {_held('ml', 'mn')}) AS m"
        " ON m.pid = l.pid"
        f" LEFT JOIN {prefix}shards AS s ON s.shard_group = substr(n.name, $2)"
        " AND s.shard_index = l.objid::int8"
        f" WHERE {_held('l', 'n')}",
        [groups, len(groups) + 1, f"{prefix}:runners"],
    )
    return {
        ShardId(group, int(index)): int(machine_id)
        for group, index, machine_id in rows
        if machine_id is not None
    }
