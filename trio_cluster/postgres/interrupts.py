"""Marking a persisted request interrupted: one statement, apart from the message path.

The mark is a flag on the request's row, set only while the request has no
final reply, and announced to the shard's owner in the same statement
(``i:<origin>:<group>:<index>:<request_id>``). It is not fenced: it only
asks, and the owner answers (fenced, as any reply). A reply stored first
wins: the row is processed then, and the update matches nothing.
"""

from __future__ import annotations

from ..pgdriver.pool import Pool
from .boundary import translated


async def mark_interrupted(
    pool: Pool, prefix: str, channel: str, request_id: int, origin: int
) -> bool:
    """Whether the request was unprocessed and unmarked, and is marked now."""
    with translated("mark request %s interrupted", request_id):
        marked = await pool.fetchval(
            f"WITH hit AS (UPDATE {prefix}messages SET interrupted = true"
            " WHERE request_id = $1 AND NOT processed AND NOT interrupted"
            " RETURNING shard_group, shard_index)"
            " SELECT count(pg_notify($2, 'i:' || $3::text || ':' || shard_group || ':'"
            " || shard_index::text || ':' || $1::text)) FROM hit",
            [request_id, channel, origin],
            prepare=True,
        )
    return bool(marked)
