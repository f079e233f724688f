"""The membership as PostgreSQL holds it: read it, and mark the dead so a death is told once.

A runner is live while its lock connection holds its machine-id lock: the
lock, not a timestamp (see ``leases``). A row whose lock session has ended
stays in ``{prefix}runners`` (operators see it as not alive), so that a
death is announced exactly once, whoever sees it first marks the row: its
``lock_pid`` is negated, and the same statement sends the membership
notice. Whoever sees it: the runner watching the dead one (see
``watcher``), or any membership read that finds a row whose lock is gone
(a death nobody was watching, say while the ring was changing). A marked
row is never read again, so reads are cheap and a death costs one notice.

Marking is fenced by the lock itself, in the statement that marks: a row
whose lock is held again (a re-registration) is left alone, and a
re-registration overwrites a marked row with its new ``lock_pid``.
"""

from __future__ import annotations

import attrs

from ..core.assignment import RunnerSpec
from ..pgdriver.connection import Connection

_HOLDS = (
    "(CASE WHEN pg_try_advisory_lock_shared($1, r.machine_id)"
    " THEN NOT pg_advisory_unlock_shared($1, r.machine_id) ELSE true END)"
)
"""Whether row ``r``'s machine-id lock is held ($1: the namespace), asked of the lock
itself: a shared try-lock fails while a runner holds it, and one that succeeds is let
go in the same expression (``CASE`` fixes the order). Not by reading ``pg_locks``:
that view copies every lock on the server, so a read cost 0.58 µs per lock held
anywhere (18 ms at 30,000 shards), against about a microsecond per row this way
(``benchmarks/projection.py``). A re-registration that took the id already counts as
live: its own notice follows at once."""

MEMBERSHIP_NOTICE = "m:"


@attrs.frozen
class Member:
    """One registered runner, as one membership read saw it."""

    machine_id: int
    lock_pid: int
    spec: RunnerSpec
    live: bool


async def read_members(conn: Connection, prefix: str, namespace: int) -> list[Member]:
    """Every registered runner not yet marked dead, and whether its lock is held now."""
    rows = await conn.fetch(
        f"SELECT r.machine_id, r.lock_pid, r.address, r.weight, r.groups, {_HOLDS}"
        f" FROM {prefix}runners AS r WHERE r.lock_pid > 0 ORDER BY r.machine_id",
        [namespace],
        prepare=True,
    )
    return [
        Member(
            int(machine_id),
            int(lock_pid),
            RunnerSpec(address, float(weight), frozenset(filter(None, groups.split(",")))),
            bool(live),
        )
        for machine_id, lock_pid, address, weight, groups, live in rows
    ]


async def mark_dead(
    conn: Connection, prefix: str, namespace: int, channel: str, machine_ids: list[int]
) -> bool:
    """Mark those of ``machine_ids`` whose lock session ended, announcing it; True if any."""
    marked = await conn.fetchval(
        f"WITH gone AS (UPDATE {prefix}runners AS r SET lock_pid = -r.lock_pid"
        " WHERE r.machine_id = ANY (string_to_array($2, ',')::int[]) AND r.lock_pid > 0"
        f" AND NOT {_HOLDS} RETURNING 1)"
        " SELECT count(*) FROM (SELECT pg_notify($3, $4) FROM gone LIMIT 1) AS sent",
        [namespace, ",".join(map(str, machine_ids)), channel, MEMBERSHIP_NOTICE],
    )
    return bool(marked)
