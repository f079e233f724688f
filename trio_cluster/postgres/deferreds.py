"""Deferreds in PostgreSQL: what suspended requests wait on, one row per (request, name).

A row with no ``result`` is a request waiting; a row with one is a
completed deferred. Suspending and completing both write the deferred's
row first (an insert, or an update of the waiting row), so the two are
ordered by its lock: a completion waits for a suspension being stored,
then wakes it; a suspension after a completion finds the result and does
not park. Waking updates the request's row whatever its ``processed``
flag in the completer's snapshot, so a suspension committed meanwhile is
still seen (PostgreSQL re-reads a row updated concurrently).

The wake-up is a ``Stored`` notice from no runner (origin -1, see
``trio_cluster.postgres.messages._parse_notice`` for its format), sent in
the completion's own statement: committed exactly when the request is
unprocessed again.
"""

from __future__ import annotations

from ..errors import DeferredAlreadyCompleted, EntityNotAssignedToRunner, MalformedMessage
from ..pgdriver.pool import Pool
from ..storage.base import NO_ORIGIN, Lease
from .boundary import translated


class PgDeferredStorage:
    def __init__(self, pool: Pool, prefix: str, channel: str) -> None:
        self._pool = pool
        self._prefix = prefix
        self._channel = channel

    async def suspend(self, request_id: int, name: str, lease: Lease) -> bool:
        p = self._prefix
        with translated("suspend request %s", request_id):
            row = await self._pool.fetchrow(
                f"WITH lease AS (SELECT 1 FROM {p}shards WHERE shard_group = $1"
                " AND shard_index = $2 AND epoch = $3 FOR SHARE),"
                f" waits AS (INSERT INTO {p}deferreds (request_id, name) SELECT $4, $5 FROM lease"
                f" ON CONFLICT (request_id, name) DO UPDATE SET name = excluded.name"
                f" WHERE {p}deferreds.result IS NULL RETURNING 1),"
                f" parked AS (UPDATE {p}messages SET processed = true WHERE request_id = $4"
                " AND NOT processed AND EXISTS (SELECT 1 FROM waits) RETURNING 1)"
                " SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM waits),"
                " (SELECT count(*) FROM parked)",
                [lease.shard.group, lease.shard.index, lease.epoch, request_id, name],
                prepare=True,
            )
        if row is None or not row[0]:
            raise EntityNotAssignedToRunner(
                f"lease epoch {lease.epoch} of shard {lease.shard} is stale",
                request_id=request_id,
            )
        return bool(row[1])

    async def complete_deferred(self, request_id: int, name: str, result: bytes) -> None:
        p = self._prefix
        with translated("complete deferred %r of request %s", name, request_id):
            row = await self._pool.fetchrow(
                f"WITH known AS (SELECT 1 FROM {p}messages WHERE request_id = $1),"
                f" done AS (INSERT INTO {p}deferreds (request_id, name, result, completed_at)"
                " SELECT $1, $2, $3, now() FROM known ON CONFLICT (request_id, name) DO UPDATE"
                " SET result = excluded.result, completed_at = now()"
                f" WHERE {p}deferreds.result IS NULL RETURNING 1),"
                f" woke AS (UPDATE {p}messages SET processed = false WHERE request_id = $1"
                " AND reply IS NULL AND EXISTS (SELECT 1 FROM done)"
                " RETURNING shard_group, shard_index),"
                " sent AS (SELECT pg_notify($4, 's:' || $5::text || ':' || shard_group || ':'"
                " || shard_index || ':' || $1::text) FROM woke)"
                " SELECT (SELECT count(*) FROM known), (SELECT count(*) FROM done),"
                " (SELECT count(*) FROM sent)",
                [request_id, name, result, self._channel, NO_ORIGIN],
                prepare=True,
            )
        if row is None or not row[0]:
            raise MalformedMessage(f"no stored request {request_id} has deferreds")
        if not row[1]:
            raise DeferredAlreadyCompleted(
                f"deferred {name!r} of request {request_id} is already completed",
                request_id=request_id,
            )

    async def deferred_result(self, request_id: int, name: str) -> bytes | None:
        with translated("read deferred %r of request %s", name, request_id):
            result = await self._pool.fetchval(
                f"SELECT result FROM {self._prefix}deferreds WHERE request_id = $1 AND name = $2",
                [request_id, name],
                prepare=True,
            )
        return None if result is None else bytes(result)
