"""Schedule cursors in PostgreSQL: one row per schedule, written under its singleton's lease.

Each write is fenced as replies and states are: in the same statement, a
share lock on the lease's shard row whose epoch must still be the writer's,
so a holder whose lease moved on cannot move the schedule (see
:class:`~trio_cluster.storage.base.ScheduleStorage`).
"""

from __future__ import annotations

from typing import Any

from ..errors import EntityNotAssignedToRunner
from ..pgdriver.pool import Pool
from ..storage.base import Lease
from .boundary import translated


class PgScheduleStorage:
    def __init__(self, pool: Pool, prefix: str) -> None:
        self._pool = pool
        self._prefix = prefix

    def _lease(self) -> str:
        return (
            f"WITH lease AS (SELECT 1 FROM {self._prefix}shards WHERE shard_group = $1"
            " AND shard_index = $2 AND epoch = $3 FOR SHARE),"
        )

    async def schedule_cursor(self, lease: Lease, name: str, start: int) -> int:
        p = self._prefix
        with translated("read the cursor of schedule %s", name):
            row = await self._pool.fetchrow(
                f"{self._lease()} new AS (INSERT INTO {p}schedules (name, fired_ms, epoch)"
                " SELECT $4, $5, $3 FROM lease ON CONFLICT (name) DO NOTHING RETURNING fired_ms)"
                " SELECT (SELECT count(*) FROM lease), coalesce((SELECT fired_ms FROM new),"
                f" (SELECT fired_ms FROM {p}schedules WHERE name = $4))",
                [lease.shard.group, lease.shard.index, lease.epoch, name, start],
            )
        return int(_fenced(row, lease)[1])

    async def advance_schedule(self, lease: Lease, name: str, instant: int) -> bool:
        p = self._prefix
        with translated("record a firing of schedule %s", name):
            row = await self._pool.fetchrow(
                f"{self._lease()} moved AS (INSERT INTO {p}schedules (name, fired_ms, epoch)"
                " SELECT $4, $5, $3 FROM lease ON CONFLICT (name) DO UPDATE"
                " SET fired_ms = excluded.fired_ms, epoch = excluded.epoch, fired_at = now()"
                f" WHERE {p}schedules.fired_ms < excluded.fired_ms RETURNING 1)"
                " SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM moved)",
                [lease.shard.group, lease.shard.index, lease.epoch, name, instant],
            )
        return bool(_fenced(row, lease)[1])


def _fenced(row: tuple[Any, ...] | None, lease: Lease) -> tuple[Any, ...]:
    """The row, once it shows the lease was current (its first column counts the lease)."""
    if row is None or not row[0]:
        raise EntityNotAssignedToRunner(f"lease epoch {lease.epoch} of {lease.shard} is stale")
    return row
