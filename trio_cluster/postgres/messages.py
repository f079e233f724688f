"""Persisted requests and their replies in PostgreSQL, with notices by LISTEN/NOTIFY.

Work is claimed through shard ownership alone: a runner reads the
unprocessed requests of shards whose lease it holds, and nothing is ever
claimed row by row (no ``SELECT ... FOR UPDATE`` polling, no claim window
that can strand a request). Completing a request is fenced: the reply is
written only while the shard's epoch is still the writer's, checked under
a share lock on the shard row so that a new owner's epoch bump and a stale
owner's reply are strictly ordered.

Every statement here runs once or more per persisted message, so each is
prepared on its connection (``prepare=True``): the server plans it once per
connection instead of once per call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from ..core.envelope import Envelope
from ..core.hashing import ShardId
from ..errors import EntityNotAssignedToRunner, PersistenceError
from ..pgdriver.connection import open_connection
from ..pgdriver.errors import PgError
from ..pgdriver.pool import Pool
from ..storage.base import (
    Gap,
    InterruptStored,
    Lease,
    MembershipChanged,
    Notice,
    Replied,
    Saved,
    StateWrite,
    Stored,
)
from ..storage.notices import open_follower
from .boundary import translated
from .interrupts import mark_interrupted
from .leases import RECONNECT
from .states import state_writes

log = logging.getLogger("trio_cluster.postgres.messages")

_COLUMNS = (
    "request_id, shard_group, shard_index, entity_type, entity_id, rpc, payload,"
    " primary_key, deliver_at_ms, meta"
)
_READ = f"{_COLUMNS}, interrupted"
"""What a read returns: the stored request and whether its caller withdrew it."""


class _Meta(msgspec.Struct, array_like=True):
    headers: dict[str, str] = {}
    call_chain: tuple[str, ...] = ()


_encode_meta = msgspec.msgpack.Encoder().encode
_decode_meta = msgspec.msgpack.Decoder(_Meta).decode


def _envelope(row: tuple[Any, ...]) -> Envelope:
    """Rebuild a stored request. Its payload stays bytes: the entity decodes it,
    so an undecodable payload fails that request alone, with MalformedMessage."""
    try:
        meta = _decode_meta(row[9])
    except msgspec.MsgspecError:
        log.warning("request %s has unreadable headers; delivering without them", row[0])
        meta = _Meta()
    return Envelope(
        request_id=int(row[0]),
        shard_group=row[1],
        shard_index=int(row[2]),
        entity_type=row[3],
        entity_id=row[4],
        rpc=row[5],
        payload=row[6],
        persisted=True,
        primary_key=row[7],
        deliver_at_ms=None if row[8] is None else int(row[8]),
        headers=meta.headers,
        call_chain=meta.call_chain,
        interrupted=bool(row[10]),
    )


def _parse_notice(payload: str) -> Notice | None:
    """``s:<origin>:<group>:<index>:<request_id>``, ``r:<origin>:<request_id>``,
    ``i:<origin>:<group>:<index>:<request_id>`` or ``m:``."""
    kind, _, rest = payload.partition(":")
    try:
        if kind == "m":
            return MembershipChanged()
        if kind == "r":
            origin, request_id = rest.split(":")
            return Replied(int(request_id), int(origin))
        if kind in ("s", "i"):
            origin, group, index, request_id = rest.split(":")
            notice = Stored if kind == "s" else InterruptStored
            return notice(ShardId(group, int(index)), int(request_id), int(origin))
    except ValueError:
        pass
    log.warning("ignoring unknown notification %r", payload)
    return None


class PgMessageStorage:
    def __init__(self, pool: Pool, dsn: str, prefix: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self._prefix = prefix
        self.channel = f"{prefix}events"

    async def save_request(self, envelope: Envelope, origin: int, *, announce: bool) -> Saved:
        p = self._prefix
        notice = f"s:{origin}:{envelope.shard_group}:{envelope.shard_index}:{envelope.request_id}"
        dedup_key = envelope.dedup_key
        with translated("store request"):
            inserted = await self._pool.fetchval(
                f"WITH ins AS (INSERT INTO {p}messages ({_COLUMNS}, dedup_key)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                " ON CONFLICT (dedup_key) DO NOTHING RETURNING request_id),"
                " sent AS (SELECT pg_notify($12, $13) FROM ins WHERE $14)"
                " SELECT (SELECT request_id FROM ins) FROM (SELECT count(*) FROM sent) AS s",
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
                    dedup_key,
                    self.channel,
                    notice,
                    announce,
                ],
                prepare=True,
            )
            if inserted is not None:
                return Saved(envelope.request_id)
            row = await self._pool.fetchrow(
                f"SELECT request_id, reply FROM {p}messages WHERE dedup_key = $1",
                [dedup_key],
                prepare=True,
            )
        if row is None:
            raise PersistenceError(f"request with key {dedup_key!r} vanished while storing")
        return Saved(int(row[0]), duplicate=True, reply=row[1])

    async def save_reply(
        self, request_id: int, reply: bytes, lease: Lease, state: StateWrite | None = None
    ) -> None:
        p = self._prefix
        params: list[Any] = [
            lease.shard.group,
            lease.shard.index,
            lease.epoch,
            request_id,
            reply,
            self.channel,
            lease.machine_id,
        ]
        # The entity's state, when it changed, rides in the reply's statement: one
        # transaction, and written only if the reply is (``done`` is not empty).
        state_ctes = ""
        if state is not None:
            state_ctes = state_writes(p, "done", 8) + ","
            params += [state.entity_type, state.entity_id, state.data]
        with translated("store reply to %s", request_id):
            row = await self._pool.fetchrow(
                f"WITH lease AS (SELECT 1 FROM {p}shards WHERE shard_group = $1"
                " AND shard_index = $2 AND epoch = $3 FOR SHARE),"
                f" done AS (UPDATE {p}messages SET processed = true, reply = $5,"
                " replied_at = now() WHERE request_id = $4 AND NOT processed"
                " AND EXISTS (SELECT 1 FROM lease) RETURNING request_id),"
                f"{state_ctes}"
                " sent AS (SELECT pg_notify($6, 'r:' || $7::text || ':' || request_id) FROM done)"
                " SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM sent)",
                params,
                prepare=True,
            )
        if row is None or not row[0]:
            raise EntityNotAssignedToRunner(
                f"lease epoch {lease.epoch} of shard {lease.shard} is stale",
                request_id=request_id,
            )

    async def purge(self, lease: Lease, window: float, limit: int) -> int:
        """Delete up to *limit* of the shard's processed requests replied over *window* s ago.

        Only the shard's owner calls this (see `trio_cluster.storage.retention`),
        and the window is measured on the server's clock, the one that stamped
        ``replied_at``.
        """
        p = self._prefix
        with translated("purge processed requests of %s", lease.shard):
            return await self._pool.execute(
                f"DELETE FROM {p}messages WHERE request_id IN (SELECT request_id"
                f" FROM {p}messages WHERE shard_group = $1 AND shard_index = $2 AND processed"
                " AND replied_at <= now() - make_interval(secs => $3) ORDER BY replied_at"
                " LIMIT $4)",
                [lease.shard.group, lease.shard.index, float(window), limit],
                prepare=True,
            )

    async def interrupt(self, request_id: int, origin: int) -> bool:
        return await mark_interrupted(self._pool, self._prefix, self.channel, request_id, origin)

    async def reply_for(self, request_id: int) -> bytes | None:
        with translated("read reply to %s", request_id):
            reply = await self._pool.fetchval(
                f"SELECT reply FROM {self._prefix}messages WHERE request_id = $1",
                [request_id],
                prepare=True,
            )
        return None if reply is None else bytes(reply)

    async def unprocessed(
        self,
        shard: ShardId,
        *,
        entity: tuple[str, str] | None = None,
        after: int = 0,
        due_by: int | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        sql = (
            f"SELECT {_READ} FROM {self._prefix}messages WHERE shard_group = $1"
            " AND shard_index = $2 AND NOT processed AND request_id > $3"
            " AND ($4::int8 IS NULL OR deliver_at_ms IS NULL OR deliver_at_ms <= $4::int8)"
        )
        params: list[Any] = [shard.group, shard.index, after, due_by]
        if entity is not None:
            sql += " AND entity_type = $6 AND entity_id = $7"
            params += [limit, *entity]
        else:
            params.append(limit)
        sql += " ORDER BY request_id LIMIT $5"
        return await self._read(sql, params, shard)

    async def fetch(self, shard: ShardId, request_ids: Sequence[int]) -> list[Envelope]:
        ids = "{" + ",".join(str(int(i)) for i in request_ids) + "}"
        return await self._read(
            f"SELECT {_READ} FROM {self._prefix}messages WHERE request_id = ANY($1::int8[])"
            " AND shard_group = $2 AND shard_index = $3 AND NOT processed ORDER BY request_id",
            [ids, shard.group, shard.index],
            shard,
        )

    async def _read(self, sql: str, params: Sequence[Any], shard: ShardId) -> list[Envelope]:
        with translated("read requests of %s", shard):
            rows = await self._pool.fetch(sql, params, prepare=True)
        return [_envelope(row) for row in rows]

    @asynccontextmanager
    async def notices(self) -> AsyncIterator[trio.MemoryReceiveChannel[Notice]]:
        """LISTEN on a connection of its own; after a reconnect, a Gap covers what was missed."""
        with open_follower() as (follower, receive):
            async with trio.open_nursery() as nursery:
                await nursery.start(self._listen, follower)
                yield receive
                nursery.cancel_scope.cancel()

    async def _listen(
        self,
        follower: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        delays = RECONNECT.delays()
        first = True
        while True:
            try:
                async with open_connection(
                    self._dsn, application_name="trio_cluster notices"
                ) as conn:
                    await conn.listen(self.channel)
                    if first:
                        task_status.started()
                        first = False
                    else:
                        follower.send(Gap())
                    delays = RECONNECT.delays()
                    while True:
                        notification = await conn.wait_notification()
                        notice = _parse_notice(notification.payload)
                        if notice is not None:
                            follower.send(notice)
            except (PgError, OSError) as error:
                if first:
                    raise PersistenceError(f"cannot listen for notices: {error}") from error
                log.warning("notice connection lost, reconnecting: %s", error)
            except Exception:
                # A bug, not the database: reconnect rather than end the runner.
                if first:
                    raise
                log.exception("following notices failed, reconnecting")
            await trio.sleep(next(delays))
