"""A schedule on three runner processes under faults: exactly one firing per instant.

The runners are ``tests.postgres.schedule_app`` processes, each declaring the
schedule ``tick`` (every 250 ms, firing a persisted tell to ``Clock/c``) and
hosting ``Clock``, whose every handler run writes a row (instant, request
id, pid, server clock) into a table of the test database, with nothing
unique in it. The faults, in turn, on one cluster:

1. SIGKILL of the runner holding the schedule's singleton, then a new
   runner in its place;
2. a rolling restart: each runner in turn gets SIGTERM (a graceful
   handoff) and is replaced by a new process;
3. an outage: every runner is SIGKILLed, then a new one starts; the
   instants that fell due meanwhile (as many as a process takes to start)
   are missed, and the first new holder catches up on them.

What is checked, from the table, over the instants from the first handled
one to the last:

- the schedule's missed-run policy is the default one (catch up on every
  instant missed for up to a minute, far longer than any outage here), so
  no instant may be skipped: the handled instants are consecutive, those
  missed in the outage included (fired late, oldest first);
- each instant was fired once: every row of one instant carries the same
  request id (a second firing of an instant is deduplicated by storage);
- each instant was handled once: a second handler run of one request is
  the at-least-once redelivery of persisted requests, allowed only when
  the earlier run was on the SIGKILLed process (it may have died after the
  handler's insert and before the reply was stored), and then it must be
  flagged ``redelivered``;
- no instant was handled before it fell due;
- after each fault, firings resume (a row is written) within the failover
  bound plus one interval, on the server's clock.

Nothing sleeps to synchronise: processes are waited for by their ``ready``
line or their exit, handler runs by the NOTIFY of their rows; which runner
holds the schedule's lease has no event, so it is polled from the server.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime

import attrs
import trio

from trio_cluster.core.reserved import SCHEDULE_PREFIX, singleton_shard
from trio_cluster.core.timetable import to_ms
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.schema import lock_namespace

from .announced import WAIT_S, Announced
from .schedule_app import EVERY_MS, NAME, create_ticks, ticks_table
from .test_cluster_processes import POLL_S, Cluster, Node

FAILOVER_S = 3.0
"""Firings resume within this after their holder dies (about 0.5 s here) or leaves."""
TICKS_BETWEEN_FAULTS = 2
"""Handled firings to see before the next fault: the schedule runs between faults."""


@attrs.frozen
class Seen:
    instant: int
    pid: int
    at_us: int


def parse_seen(payload: str) -> Seen:
    instant, pid, at_us = payload.split(":")
    return Seen(int(instant), int(pid), int(at_us))


class Ticks(Announced[Seen]):
    """The handler runs as their NOTIFYs announce them."""

    def __init__(self) -> None:
        super().__init__(parse_seen)

    async def wait_for_more(self, count: int = TICKS_BETWEEN_FAULTS) -> None:
        target = len(self.rows) + count
        await self.wait_until(lambda: len(self.rows) >= target)

    async def wait_resumed(self, after_us: int) -> int:
        """Until a handler run is written after ``after_us`` (server clock): how long after."""

        def resumed() -> bool:
            return any(seen.at_us > after_us for seen in self.rows)

        await self.wait_until(resumed, FAILOVER_S + EVERY_MS / 1000)
        return min(seen.at_us for seen in self.rows if seen.at_us > after_us) - after_us


async def server_now_us(conn: Connection) -> int:
    now = await conn.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    return int(now)


async def holder_address(conn: Connection, prefix: str) -> str:
    """The address of the runner whose lock session holds the schedule's lease (polled)."""
    shard = singleton_shard(SCHEDULE_PREFIX + NAME)
    namespace = await lock_namespace(conn, f"{prefix}:group:{shard.group}")
    with trio.fail_after(WAIT_S):
        while True:
            address = await conn.fetchval(
                f"SELECT r.address FROM pg_locks AS l JOIN {prefix}runners AS r"
                " ON r.lock_pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.objsubid = 2 AND l.classid = $1::int::oid AND l.objid = $2",
                [namespace, shard.index],
            )
            if address is not None:
                return str(address)
            await trio.sleep(POLL_S)


@attrs.define
class Scenario:
    """Three runner processes and the faults played on them; records what the check needs."""

    conn: Connection
    cluster: Cluster
    prefix: str
    ticks: Ticks
    nodes: list[Node] = attrs.Factory(list)
    killed: set[int] = attrs.Factory(set)
    resumed_after_us: list[int] = attrs.Factory(list)

    async def start(self, count: int = 1) -> None:
        self.nodes += await self.cluster.start_many(count)

    async def kill_holder(self) -> None:
        await self.ticks.wait_for_more()
        address = await holder_address(self.conn, self.prefix)
        [holder] = [node for node in self.nodes if node.address == address]
        self.nodes.remove(holder)
        await self.cluster.kill(holder)
        self.killed.add(holder.pid)
        self.resumed_after_us.append(await self.ticks.wait_resumed(await server_now_us(self.conn)))
        assert await holder_address(self.conn, self.prefix) != address  # taken again

    async def rolling_restart(self) -> None:
        for node in list(self.nodes):
            await self.ticks.wait_for_more()
            self.nodes.remove(node)
            await self.cluster.stop(node)
            self.resumed_after_us.append(
                await self.ticks.wait_resumed(await server_now_us(self.conn))
            )
            await self.start()
        await self.ticks.wait_for_more()

    async def outage(self) -> None:
        """SIGKILL every runner, then start a new one."""
        await self.ticks.wait_for_more()
        for node in self.nodes:
            await self.cluster.kill(node)
            self.killed.add(node.pid)
        self.nodes.clear()
        # The fault itself, not a synchronisation: the outage lasts three intervals,
        # so instants fall due with no runner up, however fast a new one starts.
        await trio.sleep(3 * EVERY_MS / 1000)
        await self.start()
        await self.ticks.wait_for_more()

    async def stop_all(self) -> None:
        for node in self.nodes:
            await self.cluster.stop(node)


@attrs.frozen
class Row:
    instant: int
    request_id: int
    redelivered: bool
    pid: int
    at: datetime


async def load_rows(conn: Connection, prefix: str) -> list[Row]:
    rows = await conn.fetch(
        f"SELECT instant, request_id, redelivered, pid, at FROM {ticks_table(prefix)} ORDER BY seq"
    )
    return [Row(int(i), int(r), bool(d), int(p), at) for i, r, d, p, at in rows]


def violations(rows: list[Row], killed: set[int]) -> list[str]:
    """What breaks "one firing, handled once, per instant, with no gap" (module docstring)."""
    found = []
    by_instant: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        by_instant[row.instant].append(row)
        if to_ms(row.at) < row.instant:
            found.append(f"handled before it fell due: {row}")
    instants = sorted(by_instant)
    expected = list(range(instants[0], instants[-1] + EVERY_MS, EVERY_MS))
    if instants != expected:
        found.append(f"instants skipped: {sorted(set(expected) - set(instants))}")
    for instant, runs in by_instant.items():
        if len({run.request_id for run in runs}) != 1:
            found.append(f"instant {instant} fired as several requests: {runs}")
        if any(run.pid not in killed for run in runs[:-1]):
            found.append(f"instant {instant} handled again after a run that was not killed: {runs}")
        if not all(run.redelivered for run in runs[1:]):
            found.append(f"instant {instant} handled again without a redelivery: {runs}")
    return found


async def test_a_schedule_fires_each_instant_once_across_sigkill_and_a_rolling_restart(
    pg_dsn: str,
) -> None:
    prefix = f"sched_{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(pg_dsn, prefix, app="tests.postgres.schedule_app")
    try:
        async with open_connection(pg_dsn) as conn, open_connection(pg_dsn) as listener:
            await create_ticks(conn, prefix)
            scenario = Scenario(conn, cluster, prefix, Ticks())
            async with trio.open_nursery() as nursery:
                await nursery.start(scenario.ticks.follow, listener, ticks_table(prefix))
                await scenario.start(3)
                await scenario.kill_holder()
                await scenario.start()
                await scenario.rolling_restart()
                await scenario.outage()
                await scenario.stop_all()
                nursery.cancel_scope.cancel()
            rows = await load_rows(conn, prefix)
    finally:
        await cluster.cleanup()

    print(f"{len(rows)} handler runs; firings resumed after (µs): {scenario.resumed_after_us}")
    assert violations(rows, scenario.killed) == []
    assert len(scenario.resumed_after_us) == 4  # the SIGKILL and three graceful stops
    assert max(to_ms(row.at) - row.instant for row in rows) > EVERY_MS  # the outage was caught up
