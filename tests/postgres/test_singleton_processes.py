"""A singleton on three runner processes under faults: never two runs at once, and failover.

The runners are ``tests.postgres.singleton_app`` processes, each declaring the
singleton ``reporter``, whose every run writes an entry row and an exit row
(with its epoch, its pid and the server's clock) into a table of the test
database. The faults, in turn, on one cluster:

1. SIGKILL of the holder: another runner runs it within the failover bound;
2. SIGSTOP of the holder for longer than its lease lasts on the server, then
   SIGCONT: another runner runs it (within the lease-loss bound), and the
   frozen one, once it runs again, learns that its lease is gone and is
   cancelled, recording nothing else under its old epoch;
3. a rolling restart: each runner in turn gets SIGTERM (a graceful handoff)
   and is replaced by a new process.

What counts as overlap. A run's *activity* is the time from its entry to its
end, where its end is its exit row, or, for a SIGKILLed process's run that
has none, the moment its process was known dead (the server's clock read
once the harness had reaped it). A frozen process does not execute: for the
SIGSTOPped holder, whose exit row is written after SIGCONT, the run ends at
the moment it was frozen provided that all it did after SIGCONT was exit
cancelled (its cleanup, under cancellation, bounded). Two runs overlap when
the later one's entry falls inside the earlier one's activity; entries must
also come in strictly increasing epochs (an entry under an old epoch after a
newer epoch's entry is a failure whatever the times).

Nothing sleeps to synchronise: processes are waited for by their ``ready``
line or their exit, runs by the NOTIFY of their rows; that a process is
frozen (SIGSTOP) is waited for with ``waitid``.
"""

from __future__ import annotations

import itertools
import os
import signal
import uuid
from datetime import datetime, timedelta

import attrs
import trio

from trio_cluster.pgdriver import Connection, open_connection

from .announced import WAIT_S, Announced
from .singleton_app import CANCELLED, ENTRY, EXIT, LEASE_LOSS_S, STOPPED, create_runs, runs_table
from .test_cluster_processes import Cluster, Node

FAILOVER_S = 3.0
"""A dead holder's singleton runs again on another runner within this (about 0.5 s here)."""


@attrs.frozen
class Row:
    phase: str
    epoch: int
    pid: int
    how: str


def parse_row(payload: str) -> Row:
    phase, epoch, pid, how = payload.split(":")
    return Row(phase, int(epoch), int(pid), how)


class Runs(Announced[Row]):
    """The singleton's entries and exits as their NOTIFYs announce them."""

    def __init__(self) -> None:
        super().__init__(parse_row)

    def running(self) -> Row | None:
        """The latest run if it has not exited."""
        entries = [row for row in self.rows if row.phase == ENTRY]
        if not entries:
            return None
        last = entries[-1]
        exited = any(r.phase == EXIT and r.epoch == last.epoch for r in self.rows)
        return None if exited else last

    async def wait_running(self, *, newer_than: int = -1, bound_s: float = WAIT_S) -> Row:
        def running_newer() -> bool:
            run = self.running()
            return run is not None and run.epoch > newer_than

        await self.wait_until(running_newer, bound_s)
        run = self.running()
        assert run is not None
        return run


@attrs.frozen
class Run:
    epoch: int
    pid: int
    entry: datetime
    exit: datetime | None
    how: str | None


async def load_runs(conn: Connection, prefix: str) -> list[Run]:
    """Every run in commit order of its entry, checked to enter in increasing epochs."""
    rows = await conn.fetch(
        f"SELECT epoch, pid, phase, how, at FROM {runs_table(prefix)} ORDER BY seq"
    )
    entries: list[tuple[int, int, datetime]] = []
    exits: dict[int, tuple[int, datetime, str]] = {}
    for epoch, pid, phase, how, at in rows:
        if phase == ENTRY:
            assert not entries or epoch > entries[-1][0], (
                f"an entry under epoch {epoch} after one under {entries[-1][0]}"
            )
            entries.append((int(epoch), int(pid), at))
        else:
            assert int(epoch) not in exits, f"two exits under epoch {epoch}"
            exits[int(epoch)] = (int(pid), at, how)
    runs = []
    for epoch, pid, entry in entries:
        exit_pid, exit_at, how = exits.pop(epoch, (pid, None, None))
        assert exit_pid == pid
        runs.append(Run(epoch, pid, entry, exit_at, how))
    assert not exits, f"exits without entries: {exits}"
    return runs


@attrs.frozen
class Freeze:
    pid: int
    stopped_at: datetime
    """The server's clock once the process was seen frozen: it executed nothing after."""
    continued_at: datetime
    """The server's clock just before SIGCONT: it executed nothing before."""


def overlaps(runs: list[Run], killed_at: dict[int, datetime], freezes: list[Freeze]) -> list[str]:
    """Runs whose activity overlaps a later run's entry (see the module docstring)."""
    violations = []
    for earlier, later in itertools.pairwise(runs):
        end = activity_end(earlier, later, killed_at, freezes)
        if end is None:
            violations.append(f"{earlier} never ended, yet {later} began")
        elif later.entry < end:
            violations.append(f"{later} began at {later.entry}, before {earlier} ended at {end}")
    return violations


def activity_end(
    run: Run, later: Run, killed_at: dict[int, datetime], freezes: list[Freeze]
) -> datetime | None:
    if run.exit is None:
        return killed_at.get(run.pid)
    for freeze in freezes:
        frozen_through_later = freeze.stopped_at <= later.entry < freeze.continued_at
        if (
            freeze.pid == run.pid
            and run.entry < freeze.stopped_at
            and frozen_through_later
            and run.exit > freeze.continued_at
            and run.how == CANCELLED
        ):
            return freeze.stopped_at  # all it did after SIGCONT was to be cancelled
    return run.exit


async def wait_frozen(pid: int) -> None:
    """Until the process is stopped by a signal: ``waitid`` reports it without reaping it."""
    flags = os.WSTOPPED | os.WNOWAIT
    with trio.fail_after(WAIT_S):
        await trio.to_thread.run_sync(os.waitid, os.P_PID, pid, flags, abandon_on_cancel=True)


async def server_now(conn: Connection) -> datetime:
    now = await conn.fetchval("SELECT clock_timestamp()")
    assert isinstance(now, datetime)
    return now


@attrs.define
class Scenario:
    """Three runner processes and the faults played on them; records what the check needs."""

    conn: Connection
    cluster: Cluster
    runs: Runs
    nodes: dict[int, Node] = attrs.Factory(dict)
    killed_at: dict[int, datetime] = attrs.Factory(dict)
    freezes: list[Freeze] = attrs.Factory(list)
    failovers: list[tuple[int, datetime]] = attrs.Factory(list)
    """(epoch of the run that took over, when its predecessor died or froze)."""

    async def start(self, count: int = 1) -> None:
        for node in await self.cluster.start_many(count):
            self.nodes[node.pid] = node

    async def kill_holder(self) -> int:
        """SIGKILL the holder; returns its pid."""
        current = await self.runs.wait_running()
        holder = self.nodes.pop(current.pid)
        await self.cluster.kill(holder)
        self.killed_at[holder.pid] = died = await server_now(self.conn)
        began = trio.current_time()
        after = await self.runs.wait_running(newer_than=current.epoch, bound_s=FAILOVER_S)
        print(f"failover after SIGKILL: {trio.current_time() - began:.3f} s")
        assert after.pid in self.nodes
        self.failovers.append((after.epoch, died))
        return holder.pid

    async def freeze_holder(self) -> None:
        """SIGSTOP the holder until another runner runs the singleton, then SIGCONT."""
        current = await self.runs.wait_running()
        frozen = self.nodes[current.pid]
        frozen.process.send_signal(signal.SIGSTOP)
        await wait_frozen(frozen.pid)
        stopped_at = await server_now(self.conn)
        began = trio.current_time()
        after = await self.runs.wait_running(
            newer_than=current.epoch, bound_s=LEASE_LOSS_S + FAILOVER_S
        )
        print(f"failover after SIGSTOP: {trio.current_time() - began:.3f} s")
        assert after.pid != frozen.pid
        self.failovers.append((after.epoch, stopped_at))
        continued_at = await server_now(self.conn)
        frozen.process.send_signal(signal.SIGCONT)
        self.freezes.append(Freeze(frozen.pid, stopped_at, continued_at))
        # Running again, it learns its lease is gone and is cancelled.
        cancelled = Row(EXIT, current.epoch, frozen.pid, CANCELLED)
        await self.runs.wait_until(lambda: cancelled in self.runs.rows, bound_s=FAILOVER_S)

    async def rolling_restart(self) -> None:
        for pid in list(self.nodes):
            await self.runs.wait_running()
            await self.cluster.stop(self.nodes.pop(pid))
            await self.start()
        await self.runs.wait_running()

    async def stop_all(self) -> None:
        for node in self.nodes.values():
            await self.cluster.stop(node)


async def test_singleton_survives_sigkill_sigstop_and_a_rolling_restart(pg_dsn: str) -> None:
    prefix = f"single_{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(pg_dsn, prefix, app="tests.postgres.singleton_app")
    try:
        async with open_connection(pg_dsn) as conn, open_connection(pg_dsn) as listener:
            await create_runs(conn, prefix)
            scenario = Scenario(conn, cluster, Runs())
            async with trio.open_nursery() as nursery:
                await nursery.start(scenario.runs.follow, listener, runs_table(prefix))
                await scenario.start(3)
                killed = await scenario.kill_holder()
                await scenario.start()
                await scenario.freeze_holder()
                await scenario.rolling_restart()
                await scenario.stop_all()
                nursery.cancel_scope.cancel()
            recorded = await load_runs(conn, prefix)
    finally:
        await cluster.cleanup()

    assert overlaps(recorded, scenario.killed_at, scenario.freezes) == []
    assert [run.pid for run in recorded if run.exit is None] == [killed]  # it never exited
    assert any(run.how == STOPPED for run in recorded[:-1])  # a graceful handoff happened
    assert recorded[-1].how == STOPPED
    # Failover bounds, on the server's clock.
    entries = {run.epoch: run.entry for run in recorded}
    bounds = [FAILOVER_S, LEASE_LOSS_S + FAILOVER_S]
    for (epoch, lost_at), bound in zip(scenario.failovers, bounds, strict=True):
        assert entries[epoch] - lost_at < timedelta(seconds=bound)
