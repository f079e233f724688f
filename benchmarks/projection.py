"""Projection to 100 and 1,000 runners x 30,000 shards on one PostgreSQL (issue 13).

Run from the repository root::

    python -m benchmarks.projection [--quick] [--repeats N] [--json PATH]

This machine cannot run 1,000 runner processes, so the costs that grow with
the cluster are measured one operation at a time on a throwaway PostgreSQL
with stock durability, at the sizes the projection needs, and fed into a
model of what a cluster of that size asks of the server:

* **membership read** (``membership.read_members``, what every runner runs
  when the membership changes and on its safety poll): N registered
  runners whose machine-id locks are held, and 30,000 shard locks held
  besides, for N in 10, 100 and 1,000 (one session holds them all: the
  read asks the lock, not who holds it). The baseline is the read as it was
  before, a join on ``pg_locks``, which copies every lock on the server.
  Client-side time of one read, median of ``--repeats`` rounds of 20.
* **NOTIFY fan-out**: server CPU (``/proc``, every backend) per
  notification with L connections listening on its channel, and with L
  connections listening on another channel (PostgreSQL 15 wakes every
  listener of the database whatever its channel, so targeted channels
  save the client's work, not the server's), for L in 10, 50 and 150.

The model (``project``) then gives, for N runners hosting shards: the
backends (2 per runner, direct, plus a pooler's P = 50 server
connections), the lock table entries, PostgreSQL's idle CPU (each runner's
heartbeat, an empty query every second, measured here too, and its safety
poll, every ``membership_poll_interval`` = 15 s, the only statement an
idle cluster runs), the server CPU of the two notices of one persisted
batch (broadcast to every runner, as today, or, at best, targeted), and what
one membership change costs it (every runner reads once, and the notice
wakes every listener). Nothing here asserts on a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import trio

from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.membership import _HOLDS, read_members

from .common import bench_parser, log, markdown_table, repeats_of, utc_now, write_json
from .pgstats import server_cpu

RUNNERS: Final = (10, 100, 1_000)
QUICK_RUNNERS: Final = (10, 100)
SHARDS: Final = 30_000
LISTENERS: Final = (10, 50, 150)
QUICK_LISTENERS: Final = (10, 50)
READS_PER_ROUND: Final = 20
NOTIFIES: Final = 400
HEARTBEATS: Final = 2_000
POLL_INTERVAL_S: Final = 15.0
"""``ShardingConfig.membership_poll_interval``'s default."""
POOLER_BACKENDS: Final = 50
RUNNERS_NS, SHARDS_NS = 7_001, 7_002
PREFIX: Final = "proj_"
OLD_HOLDS: Final = (
    "EXISTS (SELECT 1 FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.objsubid = 2 AND l.classid = $1::int::oid"
    " AND l.objid = r.machine_id::oid AND l.pid = r.lock_pid)"
)
"""The liveness test of a membership read before issue 13's part 4: a join on ``pg_locks``."""


def server_read(holds: str) -> str:
    """A membership read's work on the server, returning one row: what it costs
    PostgreSQL, without the rows' transfer and decoding (the runner's cost)."""
    return (
        f"SELECT count(*) FILTER (WHERE live) FROM (SELECT r.machine_id, {holds} AS live"
        f" FROM {PREFIX}runners AS r WHERE r.lock_pid > 0) AS m"
    )


async def hold_cluster(holder: Connection, runners: int) -> None:
    """``runners`` registered rows whose locks ``holder`` holds, and 30,000 shard locks."""
    await holder.execute_script(
        f"DROP TABLE IF EXISTS {PREFIX}runners;"
        f"CREATE TABLE {PREFIX}runners (machine_id int PRIMARY KEY, address text,"
        " lock_pid int, weight float8, groups text);"
        "SELECT pg_advisory_unlock_all();"
    )
    pid = holder.backend_pid
    await holder.execute(
        f"INSERT INTO {PREFIX}runners SELECT g, 'r' || g, $1, 1.0, 'default'"
        " FROM generate_series(0, $2::int - 1) AS g",
        [pid, runners],
    )
    await holder.execute(
        "SELECT count(pg_advisory_lock($1, g)) FROM generate_series(0, $2::int - 1) AS g",
        [RUNNERS_NS, runners],
    )
    await holder.execute(
        "SELECT count(pg_advisory_lock($1, g)) FROM generate_series(0, $2::int - 1) AS g",
        [SHARDS_NS, SHARDS],
    )


READS: Final = {
    "read (runner)": None,
    "read (server)": server_read(_HOLDS),
    "pg_locks read (server, before)": server_read(OLD_HOLDS),
}
"""The library's read as a runner makes it (rows decoded), and the server's work of it
and of the read before it."""


async def one_read(reader: Connection, sql: str | None) -> int:
    """One membership read: the library's (``None``), or ``sql``; live runners seen."""
    if sql is None:
        return sum(member.live for member in await read_members(reader, PREFIX, RUNNERS_NS))
    return int(await reader.fetchval(sql, [RUNNERS_NS]))


async def read_times(reader: Connection, runners: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per read, one median per round, for each of ``READS``."""
    found: dict[str, list[float]] = {name: [] for name in READS}
    for _ in range(repeats):
        for name, series in found.items():
            samples = []
            for _ in range(READS_PER_ROUND):
                started = time.perf_counter()
                live = await one_read(reader, READS[name])
                samples.append(time.perf_counter() - started)
                assert live == runners, (name, live)
            series.append(statistics.median(samples))
    return found


@asynccontextmanager
async def listening(dsn: str, count: int, channel: str) -> AsyncIterator[None]:
    """``count`` connections listening on ``channel``, each draining what it hears."""
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        for _ in range(count):
            conn = await stack.enter_async_context(open_connection(dsn))
            await conn.listen(channel)

            async def drain(conn: Connection = conn) -> None:
                while True:
                    await conn.wait_notification()

            nursery.start_soon(drain)
        yield
        nursery.cancel_scope.cancel()


async def fanout_cost(server: ThrowawayPostgres, sender: Connection) -> float:
    """Server CPU seconds per notification on ``ch``, with whoever listens now."""
    before = server_cpu(server)
    for _ in range(NOTIFIES):
        await sender.execute("SELECT pg_notify('ch', 'm:')")
    # Every listener's backend has sent them once the last one's client has it.
    async with open_connection(server.dsn) as probe:
        await probe.listen("ch")
        await sender.execute("SELECT pg_notify('ch', 'end')")
        while (await probe.wait_notification()).payload != "end":
            pass
    after = server_cpu(server)
    assert before is not None and after is not None, "needs Linux /proc"
    return (after - before) / NOTIFIES


async def heartbeat_cost(server: ThrowawayPostgres, conn: Connection) -> float:
    """Server CPU seconds of one heartbeat (the lock connection's empty query)."""
    before = server_cpu(server)
    for _ in range(HEARTBEATS):
        await conn.execute_script("")
    after = server_cpu(server)
    assert before is not None and after is not None, "needs Linux /proc"
    return (after - before) / HEARTBEATS


def read_at(read_s: dict[int, float], runners: int) -> float:
    """A read's cost at ``runners`` rows: measured, or on the line through the two
    nearest measured sizes (it grows with the rows it returns)."""
    if runners in read_s:
        return read_s[runners]
    sizes = sorted(read_s)
    below = [size for size in sizes if size < runners]
    above = [size for size in sizes if size > runners]
    if below and above:
        a, b = below[-1], above[0]
    elif below:
        a, b = sizes[-2], sizes[-1]
    else:
        a, b = sizes[0], sizes[1]
    return read_s[a] + (read_s[b] - read_s[a]) * (runners - a) / (b - a)


def per_listener(fanout: dict[str, list[float]], channel: str) -> float:
    """Server CPU one more connection listening on ``channel`` adds to a notification:
    the slope between the fewest and the most listeners measured."""
    counts = sorted({int(label.split()[0]) for label in fanout})
    few, most = (statistics.median(fanout[f"{n} on {channel}"]) for n in (counts[0], counts[-1]))
    return (most - few) / (counts[-1] - counts[0])


def project(
    read_s: dict[int, float], fanout: dict[str, list[float]], heartbeat_s: float
) -> list[dict[str, Any]]:
    """What N runners hosting 30,000 shards ask of one PostgreSQL, from measured costs:
    per persisted batch, its two notices (the requests', the replies') heard by every
    runner; and, targeted, the best case of sending each only to the runner it
    concerns (a batch that concerns one runner: one that concerns K sends K notices,
    each still waking every listener)."""
    hearing, elsewhere = per_listener(fanout, "ch"), per_listener(fanout, "other")
    projected = []
    for runners in (10, 100, 1_000):
        read = read_at(read_s, runners)
        projected.append(
            {
                "runners": runners,
                "backends_pooled": 2 * runners + POOLER_BACKENDS,
                "backends_direct": 12 * runners,
                "locks": SHARDS + runners,
                "read_ms": read * 1e3,
                "idle_cores": runners / POLL_INTERVAL_S * read + runners * heartbeat_s,
                "change_cpu_s": runners * (read + hearing),
                "batch_notices_ms": 2 * runners * hearing * 1e3,
                "batch_notices_targeted_ms": 2 * (hearing + (runners - 1) * elsewhere) * 1e3,
            }
        )
    return projected


async def measure(
    repeats: int, runner_sizes: tuple[int, ...], listener_sizes: tuple[int, ...]
) -> dict[str, Any]:
    settings = {"max_connections": "400", "max_locks_per_transaction": "256"}
    values: dict[str, Any] = {"reads": {}, "fanout": {}}
    with ThrowawayPostgres(durable=True, settings=settings) as server:
        async with open_connection(server.dsn) as holder, open_connection(server.dsn) as reader:
            for runners in runner_sizes:
                await hold_cluster(holder, runners)
                values["reads"][runners] = await read_times(reader, runners, repeats)
                log(f"read at {runners} runners: {values['reads'][runners]}")
            values["heartbeat"] = [await heartbeat_cost(server, reader) for _ in range(repeats)]
        async with open_connection(server.dsn) as sender:
            for listeners in listener_sizes:
                for channel in ("ch", "other"):
                    async with listening(server.dsn, listeners, channel):
                        costs = [await fanout_cost(server, sender) for _ in range(repeats)]
                    values["fanout"][f"{listeners} on {channel}"] = costs
                    log(f"fan-out, {listeners} listening on {channel}: {costs}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("python -m benchmarks.projection", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    repeats = repeats_of(parser, args)
    runner_sizes = QUICK_RUNNERS if args.quick else RUNNERS
    listener_sizes = QUICK_LISTENERS if args.quick else LISTENERS
    values = trio.run(measure, repeats, runner_sizes, listener_sizes)
    reads = values["reads"]
    rows = []
    for runners, series in reads.items():
        runner, server, old = (statistics.median(series[name]) for name in READS)
        cells = [f"{x * 1e3:.2f}" for x in (runner, server, old)]
        rows.append([f"{runners:,}", *cells, f"{old / server:.0f}"])
    print(
        f"membership read with {SHARDS:,} shard locks held (ms, median of {repeats}):\n"
        + markdown_table(["runners", *READS, "before / now (server)"], [True] * 5, rows)
    )
    fan_rows = [
        [label, f"{statistics.median(costs) * 1e6:.1f}"]
        for label, costs in values["fanout"].items()
    ]
    print(
        "\nserver CPU per NOTIFY (µs):\n"
        + markdown_table(["listeners", "CPU per notify"], [False, True], fan_rows)
    )
    hearing = per_listener(values["fanout"], "ch")
    elsewhere = per_listener(values["fanout"], "other")
    read_s = {
        runners: statistics.median(series["read (server)"]) for runners, series in reads.items()
    }
    heartbeat = statistics.median(values["heartbeat"])
    print(f"\nserver CPU per heartbeat (an empty query): {heartbeat * 1e6:.1f} µs")
    projected = project(read_s, values["fanout"], heartbeat)
    print(
        f"\nprojection ({SHARDS:,} shards, safety poll {POLL_INTERVAL_S:.0f} s, pooler"
        f" {POOLER_BACKENDS} backends; a notice costs {hearing * 1e6:.1f} µs per listener"
        f" hearing it, {elsewhere * 1e6:.1f} µs per listener on another channel):\n"
        + markdown_table(
            [
                "runners",
                "backends (pooled)",
                "backends (direct pools)",
                "locks",
                "read (ms)",
                "idle PostgreSQL (cores)",
                "one membership change (CPU s)",
                "notices per persisted batch (CPU ms)",
                "targeted, at best (CPU ms)",
            ],
            [True] * 9,
            [
                [
                    f"{p['runners']:,}",
                    f"{p['backends_pooled']:,}",
                    f"{p['backends_direct']:,}",
                    f"{p['locks']:,}",
                    f"{p['read_ms']:.2f}",
                    f"{p['idle_cores']:.3f}",
                    f"{p['change_cpu_s']:.2f}",
                    f"{p['batch_notices_ms']:.2f}",
                    f"{p['batch_notices_targeted_ms']:.2f}",
                ]
                for p in projected
            ],
        )
    )
    if args.json:
        write_json(
            Path(args.json),
            {"when": utc_now(), "repeats": repeats, "values": values, "projection": projected},
        )


if __name__ == "__main__":
    main()
