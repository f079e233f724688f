"""Persisted streams in PostgreSQL: each stream's chunks, and how far its caller consumed them.

A chunk row is written with its notice in one statement, fenced as a reply
is (``FOR SHARE`` on the shard's row at the lease's epoch); a chunk index
written twice keeps its first row, and its notice then carries no chunk, so
the caller reads the stored one. The ack row only moves forward, and
notifies the owner when it does. Both reference their request, so
retention deletes them with it.

Notices: ``c:`` then the base64 of a msgpack array ``[origin, request_id,
seq, chunk or nil]`` (nil: too large to carry, or stored before), and
``a:origin:request_id:acked`` (see ``messages._parse_notice``).
"""

from __future__ import annotations

import base64

import msgspec

from ..errors import EntityNotAssignedToRunner
from ..pgdriver.pool import Pool
from ..storage.base import ChunksAcked, ChunkStored, Lease
from .batching import fits
from .boundary import translated

CHUNK = "c:"
ACKED = "a:"

_encode = msgspec.msgpack.Encoder().encode
_decode_chunk = msgspec.msgpack.Decoder(tuple[int, int, int, bytes | None]).decode


def chunk_note(origin: int, request_id: int, seq: int, chunk: bytes | None) -> str:
    """The notice of a stored chunk, carrying it when the payload fits."""
    note = CHUNK + base64.b64encode(_encode((origin, request_id, seq, chunk))).decode()
    if chunk is None or fits(note, 0):
        return note
    return chunk_note(origin, request_id, seq, None)


def parse_chunk(rest: str) -> ChunkStored:
    origin, request_id, seq, chunk = _decode_chunk(base64.b64decode(rest))
    return ChunkStored(request_id, seq, origin, chunk)


def parse_acked(rest: str) -> ChunksAcked:
    origin_text, request_text, acked_text = rest.split(":")
    return ChunksAcked(int(request_text), int(acked_text), int(origin_text))


class PgStreamStorage:
    def __init__(self, pool: Pool, prefix: str, channel: str) -> None:
        self._pool = pool
        self._prefix = prefix
        self._channel = channel

    async def save_chunk(self, request_id: int, seq: int, chunk: bytes, lease: Lease) -> None:
        p = self._prefix
        with translated("store chunk %s of stream %s", seq, request_id):
            row = await self._pool.fetchrow(
                f"WITH lease AS (SELECT 1 FROM {p}shards WHERE shard_group = $1"
                " AND shard_index = $2 AND epoch = $3 FOR SHARE),"
                f" saved AS (INSERT INTO {p}stream_chunks (request_id, seq, chunk)"
                " SELECT $4, $5, $6 FROM lease ON CONFLICT (request_id, seq) DO NOTHING"
                " RETURNING 1),"
                " sent AS (SELECT pg_notify($7, CASE WHEN EXISTS (SELECT 1 FROM saved)"
                " THEN $8 ELSE $9 END) FROM lease)"
                " SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM sent)",
                [
                    lease.shard.group,
                    lease.shard.index,
                    lease.epoch,
                    request_id,
                    seq,
                    chunk,
                    self._channel,
                    chunk_note(lease.machine_id, request_id, seq, chunk),
                    chunk_note(lease.machine_id, request_id, seq, None),
                ],
                prepare=True,
            )
        if row is None or not row[0]:
            raise EntityNotAssignedToRunner(
                f"lease epoch {lease.epoch} of shard {lease.shard} is stale",
                request_id=request_id,
            )

    async def chunks(self, request_id: int, start: int, limit: int) -> list[tuple[int, bytes]]:
        with translated("read chunks of stream %s", request_id):
            rows = await self._pool.fetch(
                f"SELECT seq, chunk FROM {self._prefix}stream_chunks"
                " WHERE request_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                [request_id, start, limit],
                prepare=True,
            )
        return [(int(row[0]), bytes(row[1])) for row in rows]

    async def ack(self, request_id: int, acked: int, origin: int) -> None:
        p = self._prefix
        with translated("acknowledge chunks of stream %s", request_id):
            await self._pool.fetchval(
                f"WITH moved AS (INSERT INTO {p}stream_acks (request_id, acked)"
                f" SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM {p}messages WHERE request_id = $1)"
                " ON CONFLICT (request_id) DO UPDATE SET acked = excluded.acked"
                f" WHERE {p}stream_acks.acked < excluded.acked RETURNING 1),"
                " sent AS (SELECT pg_notify($3, $4 || $5::text || ':' || $1::text || ':'"
                " || $2::text) FROM moved)"
                " SELECT count(*) FROM sent",
                [request_id, acked, self._channel, ACKED, origin],
                prepare=True,
            )

    async def acked(self, request_id: int) -> int:
        with translated("read the ack of stream %s", request_id):
            acked = await self._pool.fetchval(
                f"SELECT acked FROM {self._prefix}stream_acks WHERE request_id = $1",
                [request_id],
                prepare=True,
            )
        return 0 if acked is None else int(acked)
