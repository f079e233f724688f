"""Scale harness: N runner processes on one PostgreSQL, S shards, observed from outside.

Run from the repository root::

    python -m benchmarks.scale --runners N --shards S [--repeats R] [--idle SECONDS]
                               [--gc-threshold 700,10,100] [--json PATH] [--markdown PATH]

It starts a throwaway PostgreSQL server with stock durability and
pg_stat_statements loaded, then in every repeat (3 by default), on fresh
tables (a new prefix):

* **settle**: starts N runner processes (``benchmarks/bench_node.py``) at
  once and times until every shard is owned and the assignment is stable:
  every shard's advisory lock is held by a live runner's lock connection
  (``pg_locks``), every runner says it serves exactly what its own
  assignment gives it, with all N runners in that assignment (its
  ``settled`` command), and each holds as many locks as it is assigned
  shards (none still draining in a handoff). Timed from the first spawn (Python start-up on a
  small machine included) and, on the server's clock, from the last
  runner's registration (``registered_at``): the second is the protocol's
  own cost. The statements run meanwhile are counted (pg_stat_statements,
  whose counters are current at once).
* **idle load**: after the server's lagging cumulative statistics have
  caught up with the settling burst (``pgstats.SETTLE_S``), a window of
  ``--idle`` seconds without requests: statements per second per runner,
  WAL writes (``pg_stat_wal.wal_write``) and WAL bytes per second, the
  server's CPU (every process of it, from ``/proc``) and each runner's
  (``time.process_time()``, asked over its stdin) as a percentage of one
  core, the server backends per runner (``pg_stat_activity``), and the
  runners' resident memory. The costliest statements of the window are
  kept in the JSON report: they are the per-operation costs a projection
  to more runners starts from.
* **join**: one more runner; the shards whose lock changed hands against the
  ideal share (``ceil(S / (N + 1))``), the time from its registration until
  settled again, and the statements run.
* **failover**: SIGKILL of one of the first N runners; then when the server
  ended its lock session (a shared lock on its machine id, queued before the
  kill and granted at the session's end, as the runners' watchers see it),
  and, reading ``pg_locks`` every ``OBSERVER_PAUSE_S`` (10 ms) plus the
  read's own time (that figure's resolution), when every one of its shards
  is locked by a survivor again (and when the whole cluster says it is
  settled).

Nothing here asserts on a time. Harness statements carry a ``scale-harness``
comment so that the counts leave them out; the ``pg_locks`` polls do load
the server during settling and failover (about 1 ms per 1,000 locks), but
not during the idle window, when the harness sends nothing.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import trio

from trio_cluster.demo.orchestrate import Children, python_module
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.schema import lock_namespace, migrate

from .cluster import Node, durability_label, environment, server_version
from .common import (
    MEASUREMENT_ALIGNMENT,
    MEASUREMENT_COLUMNS,
    Values,
    bench_parser,
    log,
    markdown_table,
    measurement_cells,
    series_summary,
    write_json,
)
from .pgstats import SERVER_SETTINGS, SETTLE_S, enable_statements, server_cpu

ROOT: Final = Path(__file__).resolve().parent.parent
TAG: Final = "/* scale-harness */"
"""Marks the harness's own statements, which the statement counts leave out."""
SETTLE_POLL: Final = 0.05
"""Seconds between looks at the locks while waiting for a settled cluster."""
SETTLE_TIMEOUT: Final = 600.0
STARTUP_TIMEOUT: Final = 300.0


# -- what the server says -------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """A live runner: registered, and its machine-id lock held by its lock connection."""

    address: str
    pid: int
    registered_at: float
    """Server clock, Unix seconds."""


@dataclass(frozen=True)
class Look:
    """One look at the cluster from the server: live runners and who locks each shard."""

    at: float
    """Server clock (``clock_timestamp()``), Unix seconds."""
    live: dict[int, Live]
    """By lock-connection pid."""
    locks: dict[int, int]
    """Shard index to the pid of the backend holding its lock."""

    def owned_by_live(self, shards: int) -> bool:
        return len(self.locks) == shards and all(pid in self.live for pid in self.locks.values())


OBSERVER_PAUSE_S = 0.01
"""Between two reads of ``pg_locks`` while a failover is timed (its resolution, with the
read itself)."""


class Observer:
    """Reads membership and shard locks of one cluster prefix (group ``default``)."""

    def __init__(self, conn: Connection, prefix: str) -> None:
        self.conn = conn
        self.prefix = prefix
        self._runners_ns = 0
        self._shards_ns = 0

    async def prepare(self) -> None:
        """Make the schema (as a runner would) and learn the lock namespaces' numbers."""
        await migrate(self.conn, self.prefix)
        self._runners_ns = await lock_namespace(self.conn, f"{self.prefix}:runners")
        self._shards_ns = await lock_namespace(self.conn, f"{self.prefix}:group:default")

    async def locks(self) -> dict[int, int]:
        rows = await self.conn.fetch(
            f"SELECT {TAG} objid::int, pid FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND objsubid = 2 AND classid = $1::int::oid",
            [self._shards_ns],
        )
        return {int(index): int(pid) for index, pid in rows}

    async def machine_of(self, lock_pid: int) -> int:
        return int(
            await self.conn.fetchval(
                f"SELECT {TAG} machine_id FROM {self.prefix}runners WHERE lock_pid = $1",
                [lock_pid],
            )
        )

    async def session_end(self, dsn: str, machine: int, ended: trio.Event) -> None:
        """Set ``ended`` when runner ``machine``'s lock session ends, as its watcher sees
        it: a shared lock on its machine id, granted the moment the session lets go."""
        async with open_connection(dsn) as conn:
            await conn.execute(
                f"SELECT {TAG} pg_advisory_lock_shared($1::int, $2::int)",
                [self._runners_ns, machine],
            )
            ended.set()

    async def waiters(self, machine: int) -> int:
        """Lock waits queued on runner ``machine``'s liveness lock."""
        return int(
            await self.conn.fetchval(
                f"SELECT {TAG} count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND NOT granted AND objsubid = 2 AND classid = $1::int::oid"
                " AND objid = $2::int::oid",
                [self._runners_ns, machine],
            )
        )

    async def look(self) -> Look:
        rows = await self.conn.fetch(
            f"SELECT {TAG} r.address, r.lock_pid, extract(epoch FROM r.registered_at)::float8,"
            " extract(epoch FROM clock_timestamp())::float8"
            f" FROM {self.prefix}runners AS r WHERE EXISTS (SELECT 1 FROM pg_locks AS l"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.classid = $1::int::oid AND l.objid = r.machine_id::oid"
            " AND l.pid = r.lock_pid)",
            [self._runners_ns],
        )
        live = {int(pid): Live(str(a), int(pid), float(at)) for a, pid, at, _ in rows}
        if rows:
            now = float(rows[0][3])
        else:
            now = float(await self.conn.fetchval(f"SELECT {TAG} extract(epoch FROM now())::float8"))
        return Look(now, live, await self.locks())


async def statements_since_reset(conn: Connection) -> int:
    """Statements counted since the last ``pg_stat_statements_reset``, the harness's left out."""
    count = await conn.fetchval(
        f"SELECT {TAG} coalesce(sum(calls), 0)::bigint FROM pg_stat_statements"
        " WHERE query NOT LIKE '%scale-harness%' AND query NOT LIKE '%pg_stat_statements%'"
    )
    return int(count)


async def top_statements(conn: Connection, limit: int = 10) -> list[dict[str, Any]]:
    """The costliest statements since the last reset: calls, mean and total time, text."""
    rows = await conn.fetch(
        f"SELECT {TAG} calls, total_exec_time + total_plan_time, rows,"
        " left(regexp_replace(query, '\\s+', ' ', 'g'), 160) FROM pg_stat_statements"
        " WHERE query NOT LIKE '%scale-harness%' AND query NOT LIKE '%pg_stat_statements%'"
        " ORDER BY 2 DESC LIMIT $1",
        [limit],
    )
    return [
        {
            "calls": int(calls),
            "total_ms": float(total),
            "mean_ms": float(total) / max(int(calls), 1),
            "rows": int(n),
            "query": str(query),
        }
        for calls, total, n, query in rows
    ]


async def reset_statements(conn: Connection) -> None:
    await conn.execute(f"SELECT {TAG} pg_stat_statements_reset()")


@dataclass(frozen=True)
class Wal:
    writes: int
    records: int
    lsn_bytes: int


async def wal(conn: Connection) -> Wal:
    row = await conn.fetchrow(
        f"SELECT {TAG} wal_write, wal_records, pg_current_wal_lsn() - '0/0'::pg_lsn"
        " FROM pg_stat_wal"
    )
    assert row is not None
    return Wal(int(row[0]), int(row[1]), int(row[2]))


async def backends(conn: Connection) -> int:
    """Client backends of the runners (their lock, notice and pool connections)."""
    count = await conn.fetchval(
        f"SELECT {TAG} count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND application_name LIKE 'trio_cluster%'"
    )
    return int(count)


def resident_mb(pid: int) -> float | None:
    """A process's resident memory (Linux ``VmRSS``), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- the runners ------------------------------------------------------------------------


@dataclass
class Scale:
    """One repeat's cluster: the server, its runner processes, the observer."""

    children: Children
    server: ThrowawayPostgres
    observer: Observer
    prefix: str
    shards: int
    stderr: IO[bytes]
    nodes: list[Node]
    gc_threshold: str | None = None
    """Passed to each runner: its ``gc.set_threshold`` (see docs/operations.md)."""

    def start_node(self) -> Node:
        args = [self.server.dsn, "--prefix", self.prefix, "--shards", str(self.shards)]
        if self.gc_threshold:
            args += ["--gc-threshold", self.gc_threshold]
        child = self.children.start(
            f"runner-{len(self.children.all)}",
            python_module("benchmarks.bench_node", *args),
            cwd=ROOT,
            stdin=True,
            stderr=self.stderr,
        )
        node = Node(child)
        self.nodes.append(node)
        return node

    async def ready(self, nodes: list[Node]) -> None:
        """Wait for each runner's ``ready`` line (its runner open, its address known)."""

        async def one(node: Node) -> None:
            node.address = (await node.child.expect("ready ", echo=log)).split()[1]

        with trio.fail_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(one, node)

    async def all_settled(self, look: Look) -> bool:
        """Every runner serves exactly its assignment, which names every runner, and
        holds no other shard's lock (a handoff still draining)."""
        held = Counter(look.locks.values())
        for node in self.nodes:
            _, owns, owners, mine = (await node.child.ask("settled")).split()
            if owns != "1" or int(owners) != len(self.nodes):
                return False
            if held[self.pid_of(look, node)] != int(mine):
                return False
        return True

    async def settled(self, poll: float = SETTLE_POLL) -> Look:
        """The first look at a settled cluster (see the module docstring)."""
        with trio.fail_after(SETTLE_TIMEOUT):
            while True:
                look = await self.observer.look()
                if (
                    len(look.live) == len(self.nodes)
                    and look.owned_by_live(self.shards)
                    and await self.all_settled(look)
                ):
                    return look
                await trio.sleep(poll)

    def pid_of(self, look: Look, node: Node) -> int:
        return next(live.pid for live in look.live.values() if live.address == node.address)

    async def cpu(self) -> list[float]:
        return [(await node.status()).cpu for node in self.nodes]

    async def kill_all(self) -> None:
        for node in self.nodes:
            node.child.kill()
        for node in self.nodes:
            await node.child.wait()
        self.nodes.clear()


Record = dict[str, list[float]]


def record(values: Record, key: str, value: float) -> None:
    values.setdefault(key, []).append(value)


async def measure_settle(scale: Scale, runners: int, values: Record) -> Look:
    conn = scale.observer.conn
    await reset_statements(conn)
    started = time.perf_counter()
    nodes = [scale.start_node() for _ in range(runners)]
    await scale.ready(nodes)
    look = await scale.settled()
    elapsed = time.perf_counter() - started
    since_registered = look.at - max(live.registered_at for live in look.live.values())
    statements = await statements_since_reset(conn)
    record(values, "settle.spawn", elapsed)
    record(values, "settle.registered", since_registered)
    record(values, "settle.statements", statements)
    record(values, "settle.per_shard", statements / scale.shards)
    log(
        f"  settled: {elapsed:.2f} s from spawn, {since_registered:.2f} s from the last"
        f" registration, {statements} statements"
    )
    return look


async def measure_idle(scale: Scale, window: float, values: Record, tops: list[Any]) -> None:
    conn = scale.observer.conn
    log(f"  idle: waiting {SETTLE_S:.0f} s for the statistics, then {window:.0f} s measured")
    await trio.sleep(SETTLE_S)
    await reset_statements(conn)
    wal_before, cpu_before = await wal(conn), server_cpu(scale.server)
    runners_before = await scale.cpu()
    started = time.perf_counter()
    await trio.sleep(window)
    elapsed = time.perf_counter() - started
    wal_after, cpu_after = await wal(conn), server_cpu(scale.server)
    runners_after = await scale.cpu()
    statements = await statements_since_reset(conn)
    tops.append(await top_statements(conn))
    n = len(scale.nodes)
    record(values, "idle.statements", statements / elapsed / n)
    record(values, "idle.wal_writes", (wal_after.writes - wal_before.writes) / elapsed)
    record(values, "idle.wal_records", (wal_after.records - wal_before.records) / elapsed)
    record(values, "idle.wal_bytes", (wal_after.lsn_bytes - wal_before.lsn_bytes) / elapsed)
    if cpu_before is not None and cpu_after is not None:
        record(values, "idle.pg_cpu", (cpu_after - cpu_before) / elapsed * 100)
    runner_cpu = [
        (a - b) / elapsed * 100 for a, b in zip(runners_after, runners_before, strict=True)
    ]
    record(values, "idle.runner_cpu", statistics.mean(runner_cpu))
    record(values, "idle.runner_cpu_max", max(runner_cpu))
    record(values, "idle.backends", await backends(conn) / n)
    memory = [m for node in scale.nodes if (m := resident_mb(node.child.pid)) is not None]
    if memory:
        record(values, "idle.rss_max", max(memory))
    log(
        f"  idle: {statements / elapsed / n:.2f} statements/s per runner,"
        f" PostgreSQL {values.get('idle.pg_cpu', [math.nan])[-1]:.1f}% of a core,"
        f" runners {statistics.mean(runner_cpu):.1f}% each"
    )


async def measure_join(scale: Scale, before: Look, values: Record) -> Look:
    conn = scale.observer.conn
    await reset_statements(conn)
    newcomer = scale.start_node()
    await scale.ready([newcomer])
    after = await scale.settled()
    registered = next(
        live.registered_at for live in after.live.values() if live.address == newcomer.address
    )
    statements = await statements_since_reset(conn)
    # Pids identify lock connections: a runner keeps one, unless it reconnected.
    owner_before = {index: before.live[pid].address for index, pid in before.locks.items()}
    owner_after = {index: after.live[pid].address for index, pid in after.locks.items()}
    moved = sum(1 for index, owner in owner_after.items() if owner_before.get(index) != owner)
    ideal = math.ceil(scale.shards / len(scale.nodes))
    record(values, "join.moved", moved)
    record(values, "join.ideal", ideal)
    record(values, "join.ratio", moved / ideal)
    record(values, "join.settle", after.at - registered)
    record(values, "join.statements", statements)
    log(
        f"  join: {moved} shards moved (ideal {ideal}) in {after.at - registered:.2f} s,"
        f" {statements} statements"
    )
    return after


async def measure_failover(scale: Scale, look: Look, values: Record) -> None:
    observer = scale.observer
    victim = scale.nodes[0]
    victim_pid = scale.pid_of(look, victim)
    survivors = {pid for pid in look.live if pid != victim_pid}
    orphans = {index for index, pid in look.locks.items() if pid == victim_pid}
    freed: float | None = None
    ended = trio.Event()
    machine = await observer.machine_of(victim_pid)
    waiting = await observer.waiters(machine)  # its watcher's, before the harness's
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.session_end, scale.server.dsn, machine, ended)

        async def when_ended() -> None:
            nonlocal freed
            await ended.wait()
            freed = time.perf_counter() - killed

        # The harness's lock wait is queued before the kill.
        queued = False
        while not queued:
            await trio.sleep(0.001)
            queued = await observer.waiters(machine) > waiting
        nursery.start_soon(when_ended)
        victim.child.kill()
        killed = time.perf_counter()
        while True:
            locks = await observer.locks()
            now = time.perf_counter() - killed
            if all(locks.get(index) in survivors for index in orphans):
                owned = now
                break
            # A pause between reads: each copies every lock on the server (tens of ms at
            # 10,000 shards), and back to back they would take a core from the runners.
            await trio.sleep(OBSERVER_PAUSE_S)
    await victim.child.wait()
    scale.nodes.remove(victim)
    await scale.settled()
    settled = time.perf_counter() - killed
    assert freed is not None
    record(values, "failover.shards", len(orphans))
    record(values, "failover.freed", freed * 1e3)
    record(values, "failover.owned", owned * 1e3)
    record(values, "failover.settled", settled * 1e3)
    log(
        f"  failover: {len(orphans)} shards; session ended {freed * 1e3:.0f} ms, owned again"
        f" {owned * 1e3:.0f} ms, settled {settled * 1e3:.0f} ms"
    )


async def run_repeat(
    children: Children, server: ThrowawayPostgres, args: Any, *, repeat: int, values: Record,
    tops: list[Any], stderr: IO[bytes],
) -> None:  # fmt: skip
    prefix = f"scale{os.getpid() % 100000}_{repeat}_"
    log(f"repeat {repeat}: {args.runners} runners x {args.shards} shards ({prefix})")
    async with open_connection(server.dsn, application_name="scale harness") as conn:
        await enable_statements(conn)
        observer = Observer(conn, prefix)
        scale = Scale(
            children, server, observer, prefix, args.shards, stderr, [], args.gc_threshold
        )
        await observer.prepare()
        try:
            look = await measure_settle(scale, args.runners, values)
            await measure_idle(scale, args.idle, values, tops)
            look = await measure_join(scale, look, values)
            await measure_failover(scale, look, values)
        finally:
            with trio.CancelScope(shield=True):
                await scale.kill_all()


# -- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    key: str
    label: str
    unit: str
    digits: int = 2

    def format(self, value: float) -> str:
        return f"{value:,.{self.digits}f}"


LINES: Final = (
    Line("settle.spawn", "Settle, from the first spawn (process start-up included)", "s"),
    Line("settle.registered", "Settle, from the last registration", "s"),
    Line("settle.statements", "Statements while settling", "count", 0),
    Line("settle.per_shard", "Statements while settling, per shard", "count"),
    Line("idle.statements", "Idle statements per runner", "1/s"),
    Line("idle.wal_writes", "Idle WAL writes", "1/s"),
    Line("idle.wal_records", "Idle WAL records", "1/s"),
    Line("idle.wal_bytes", "Idle WAL bytes", "B/s", 0),
    Line("idle.pg_cpu", "Idle PostgreSQL CPU", "% of a core"),
    Line("idle.runner_cpu", "Idle runner CPU, mean", "% of a core"),
    Line("idle.runner_cpu_max", "Idle runner CPU, busiest", "% of a core"),
    Line("idle.backends", "Server backends per runner", "count"),
    Line("idle.rss_max", "Runner resident memory, largest", "MiB", 0),
    Line("join.moved", "Join: shards moved", "count", 0),
    Line("join.ideal", "Join: ideal share", "count", 0),
    Line("join.ratio", "Join: moved / ideal", "x"),
    Line("join.settle", "Join: settled, from its registration", "s"),
    Line("join.statements", "Join: statements", "count", 0),
    Line("failover.shards", "Failover: shards of the killed runner", "count", 0),
    Line("failover.freed", "Failover: the server ended its lock session", "ms", 0),
    Line("failover.owned", "Failover: all its shards locked by survivors", "ms", 0),
    Line("failover.settled", "Failover: cluster settled again", "ms", 0),
    Line("timeouts", "Repeats that timed out (a wait past its bound)", "count", 0),
)


def results_table(values: Values) -> str:
    def rows() -> Iterator[list[str]]:
        for line in LINES:
            series = values.get(line.key)
            if series:
                yield measurement_cells(line.label, line.unit, series, line.format)

    return markdown_table(MEASUREMENT_COLUMNS, MEASUREMENT_ALIGNMENT, rows())


async def measure_all(
    children: Children, server: ThrowawayPostgres, args: Any, stderr: IO[bytes]
) -> tuple[Values, list[Any]]:
    values: Values = {}
    tops: list[Any] = []
    for repeat in range(1, args.repeats + 1):
        try:
            await run_repeat(
                children, server, args, repeat=repeat, values=values, tops=tops, stderr=stderr
            )
        except trio.TooSlowError:
            # Counted and reported; what this repeat measured before stays.
            log(f"repeat {repeat}: timed out")
            record(values, "timeouts", 1)
    return values, tops


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(
        "python -m benchmarks.scale",
        "Settle, idle load, join and failover of N runner processes on one PostgreSQL.",
        repeats_help="repeats (default 3)",
    )
    parser.add_argument("--runners", type=int, default=4, help="runner processes (default 4)")
    parser.add_argument("--shards", type=int, default=1000, help="shards (default 1,000)")
    parser.add_argument(
        "--idle", type=float, default=20.0, help="seconds of the idle window (default 20)"
    )
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table")
    parser.add_argument(
        "--gc-threshold", help="each runner's gc.set_threshold, three integers (default Python's)"
    )
    parser.add_argument(
        "--runner-log", type=Path, default=Path("/tmp/benchmarks-scale-runners.log"),
        help="where the runners' stderr goes (default /tmp/benchmarks-scale-runners.log)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3
    if args.repeats < 1 or args.runners < 2 or args.shards < 1:
        parser.error("needs --repeats >= 1, --runners >= 2 and --shards >= 1")
    started = time.perf_counter()
    server = ThrowawayPostgres(durable=True, settings=SERVER_SETTINGS)
    with args.runner_log.open("ab") as stderr, server, Children() as children:
        version = trio.run(server_version, server.dsn)
        values, tops = trio.run(measure_all, children, server, args, stderr)
    elapsed = time.perf_counter() - started
    env = environment(version) | {"durability": durability_label(True)}
    header = (
        f"trio_cluster scale harness: {args.runners} runners x {args.shards:,} shards,"
        f" Python {env['python']}, {env['cpus']} CPUs, PostgreSQL {version}"
        f" ({env['durability']}), {args.repeats} repeats, median (min, max); {elapsed:.0f} s"
        + (f"; runners' gc thresholds {args.gc_threshold}" if args.gc_threshold else "")
    )
    text = "\n\n".join([header, results_table(values)])
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.json is not None:
        report = {
            "environment": env,
            "runners": args.runners,
            "shards": args.shards,
            "repeats": args.repeats,
            "idle_window_s": args.idle,
            "elapsed_s": elapsed,
            "metrics": {
                line.key: series_summary(line.label, line.unit, values[line.key])
                for line in LINES
                if values.get(line.key)
            },
            "idle_top_statements": tops,
        }
        write_json(args.json, report)


if __name__ == "__main__":
    main()
