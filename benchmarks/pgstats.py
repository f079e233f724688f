"""PostgreSQL's own counters around a benchmark run, divided by its messages.

What a persisted message costs the server is what decides persisted
throughput, so the cross-runner benchmark reports it beside latency: the
statements run and planned (``pg_stat_statements``, loaded by the
throwaway server), the transactions committed (``pg_stat_database``), the
WAL flushes (``pg_stat_wal.wal_sync``) and the server's CPU (``/proc``,
read at once: it has no delay, and the wait below would add idle work).

The cumulative statistics of PostgreSQL 15 reach shared memory late: a
backend flushes its pending counts at most once a second while busy, and
an idle backend up to ten seconds after its last statement. So a snapshot
is taken only after `SETTLE_S` without load, or it would miss the end of
the run (or count the tail of the run before).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Final

from trio_cluster.pgdriver import Connection, PgError
from trio_cluster.pgdriver.server import ThrowawayPostgres

SETTLE_S: Final = 11.0
"""PostgreSQL 15's idle flush interval of pending statistics (10 s), plus a margin."""

SERVER_SETTINGS: Final = {
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track_planning": "on",
}
"""What the benchmark's server needs for these counters."""


@dataclass(frozen=True)
class Counters:
    """Cumulative server counters at one moment; None where the server cannot say."""

    statements: int | None
    plans: int | None
    transactions: int
    wal_flushes: int

    def per_message(self, earlier: Counters, messages: int) -> dict[str, float]:
        """Each counter's growth since *earlier*, per message."""
        rates: dict[str, float] = {}
        for item in fields(self):
            now, then = getattr(self, item.name), getattr(earlier, item.name)
            if now is not None and then is not None and messages > 0:
                rates[item.name] = (now - then) / messages
        return rates


async def enable_statements(conn: Connection) -> bool:
    """Create the pg_stat_statements view; False if the server did not load the library."""
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    except PgError:
        return False
    return True


async def snapshot(conn: Connection, *, statements: bool) -> Counters:
    """The server's counters now (see the module docstring on when to call it)."""
    row = await conn.fetchrow(
        "SELECT (SELECT sum(xact_commit) FROM pg_stat_database), (SELECT wal_sync FROM pg_stat_wal)"
    )
    assert row is not None
    calls = plans = None
    if statements:
        # The benchmark's own statements (these) are left out by their text.
        sums = await conn.fetchrow(
            "SELECT coalesce(sum(calls), 0), coalesce(sum(plans), 0) FROM pg_stat_statements"
            " WHERE query NOT LIKE '%pg_stat%'"
        )
        assert sums is not None
        calls, plans = int(sums[0]), int(sums[1])
    return Counters(calls, plans, int(row[0]), int(row[1]))


def server_cpu(server: ThrowawayPostgres) -> float | None:
    """CPU seconds used so far by the server's postmaster and its live children (Linux)."""
    if server.directory is None:
        return None
    try:
        postmaster = int((server.directory / "data" / "postmaster.pid").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    stat_fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # stat_fields[1] is the ppid; utime and stime are fields 14 and 15 of stat.
            if int(entry.name) == postmaster or int(stat_fields[1]) == postmaster:
                total += int(stat_fields[11]) + int(stat_fields[12])
    except (OSError, ValueError, IndexError):
        return None
    return total / ticks
