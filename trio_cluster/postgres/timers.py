"""Entity timers in PostgreSQL: persisted requests that carry their timer's name.

A timer is a row of the messages table like any persisted request (so it
is redelivered, moves with its shard and is purged like one), with its
name in the ``timer`` column. Arming and cancelling run in one transaction,
fenced by the shard's lease and serialised per (entity, name) by a
transaction-level advisory lock, so two arms of one name never leave two
timers. Timers are rare next to requests: these statements are not prepared.
"""

from __future__ import annotations

from ..core.envelope import Envelope
from ..errors import EntityNotAssignedToRunner
from ..pgdriver.connection import Connection
from ..pgdriver.pool import Pool
from ..storage.base import Lease
from .boundary import translated
from .messages import _COLUMNS, _encode_meta, _Meta


class PgTimerStorage:
    def __init__(self, pool: Pool, prefix: str) -> None:
        self._pool = pool
        self._prefix = prefix

    async def arm_timer(
        self, lease: Lease, name: str, envelope: Envelope, now_ms: int
    ) -> list[int]:
        entity = (envelope.entity_type, envelope.entity_id)
        with translated("arm timer %r of %s/%s", name, *entity):
            async with self._pool.connection() as conn, conn.transaction():
                replaced = await self._drop(conn, lease, entity, name, now_ms)
                await conn.execute(
                    f"INSERT INTO {self._prefix}messages ({_COLUMNS}, timer)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    [
                        envelope.request_id,
                        envelope.shard_group,
                        envelope.shard_index,
                        envelope.entity_type,
                        envelope.entity_id,
                        envelope.rpc,
                        envelope.payload,
                        envelope.primary_key,
                        envelope.deliver_at_ms,
                        _encode_meta(_Meta(envelope.headers, envelope.call_chain)),
                        name,
                    ],
                )
        return replaced

    async def cancel_timer(
        self, lease: Lease, entity: tuple[str, str], name: str, now_ms: int
    ) -> list[int]:
        with translated("cancel timer %r of %s/%s", name, *entity):
            async with self._pool.connection() as conn, conn.transaction():
                return await self._drop(conn, lease, entity, name, now_ms)

    async def _drop(
        self, conn: Connection, lease: Lease, entity: tuple[str, str], name: str, now_ms: int
    ) -> list[int]:
        """Take the lease (shared) and the name's lock, and delete the timer not yet due."""
        p = self._prefix
        held = await conn.fetch(
            f"WITH lease AS (SELECT 1 FROM {p}shards WHERE shard_group = $1"
            " AND shard_index = $2 AND epoch = $3 FOR SHARE)"
            " SELECT pg_advisory_xact_lock(hashtext($4)) FROM lease",
            [
                lease.shard.group,
                lease.shard.index,
                lease.epoch,
                f"{p}timer/{entity[0]}/{entity[1]}/{name}",
            ],
        )
        if not held:
            raise EntityNotAssignedToRunner(
                f"lease epoch {lease.epoch} of shard {lease.shard} is stale", entity_id=entity[1]
            )
        rows = await conn.fetch(
            f"DELETE FROM {p}messages WHERE entity_type = $1 AND entity_id = $2 AND timer = $3"
            " AND NOT processed AND deliver_at_ms > $4 RETURNING request_id",
            [*entity, name, now_ms],
        )
        return [int(row[0]) for row in rows]
