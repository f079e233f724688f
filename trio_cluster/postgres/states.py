"""Entity state in PostgreSQL: one row per entity with state, written under its shard's lease.

A state row is written in two ways, both fenced by the lease of the shard
the entity lives in, exactly as replies are (a share lock on the shard row
whose epoch must still be the writer's): with the final reply of a
persisted request, in the reply's own statement (see ``messages``), or on
its own, for what volatile requests changed. A stale owner's write is
refused either way.
"""

from __future__ import annotations

from ..errors import EntityNotAssignedToRunner
from ..pgdriver.pool import Pool
from ..storage.base import Lease, StateWrite
from .boundary import translated


def state_writes(prefix: str, guard: str, first: int) -> str:
    """CTEs writing (or deleting) one state row when ``guard`` (a CTE) has a row.

    Parameters ``$first`` to ``$first + 2`` are the entity type, the entity
    id and the data (NULL: delete); the shard comes from ``$1`` and ``$2``.
    """
    t, i, d = f"${first}", f"${first + 1}", f"${first + 2}::bytea"
    return (
        f" state_up AS (INSERT INTO {prefix}states"
        " (entity_type, entity_id, shard_group, shard_index, data)"
        f" SELECT {t}, {i}, $1, $2, {d} FROM {guard} WHERE {d} IS NOT NULL"
        f" ON CONFLICT (entity_type, entity_id) DO UPDATE SET data = excluded.data,"
        f" version = {prefix}states.version + 1, saved_at = now() RETURNING 1),"
        f" state_del AS (DELETE FROM {prefix}states WHERE entity_type = {t}"
        f" AND entity_id = {i} AND {d} IS NULL AND EXISTS (SELECT 1 FROM {guard})"
        " RETURNING 1)"
    )


class PgStateStorage:
    def __init__(self, pool: Pool, prefix: str) -> None:
        self._pool = pool
        self._prefix = prefix

    async def load_state(self, entity_type: str, entity_id: str) -> bytes | None:
        with translated("load the state of %s/%s", entity_type, entity_id):
            data = await self._pool.fetchval(
                f"SELECT data FROM {self._prefix}states WHERE entity_type = $1 AND entity_id = $2",
                [entity_type, entity_id],
            )
        return None if data is None else bytes(data)

    async def save_state(self, lease: Lease, state: StateWrite) -> None:
        p = self._prefix
        with translated("save the state of %s/%s", state.entity_type, state.entity_id):
            row = await self._pool.fetchrow(
                f"WITH lease AS (SELECT 1 FROM {p}shards WHERE shard_group = $1"
                " AND shard_index = $2 AND epoch = $3 FOR SHARE),"
                f"{state_writes(p, 'lease', 4)}"
                " SELECT (SELECT count(*) FROM lease)",
                [
                    lease.shard.group,
                    lease.shard.index,
                    lease.epoch,
                    state.entity_type,
                    state.entity_id,
                    state.data,
                ],
            )
        if row is None or not row[0]:
            raise EntityNotAssignedToRunner(
                f"lease epoch {lease.epoch} of shard {lease.shard} is stale",
                entity_id=state.entity_id,
            )

    async def state_ids(self, entity_type: str, *, after: str = "", limit: int = 1000) -> list[str]:
        with translated("list the entities of %s with state", entity_type):
            rows = await self._pool.fetch(
                f"SELECT entity_id FROM {self._prefix}states WHERE entity_type = $1"
                " AND entity_id > $2 ORDER BY entity_id LIMIT $3",
                [entity_type, after, limit],
            )
        return [str(row[0]) for row in rows]
