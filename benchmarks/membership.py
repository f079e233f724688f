"""Membership costs (issue 13): what idle runners cost PostgreSQL, and failover after SIGKILL.

Run from the repository root::

    python -m benchmarks.membership [--runners 2 4] [--shards 100 1000]
                                    [--repeats 3] [--idle 30] [--json PATH]

For each (runner processes, shards) pair it starts that many
``bench_node`` processes and a client-only runner here (as
``benchmarks.cluster`` does; every one is a registered runner), on a
throwaway PostgreSQL with stock durability and pg_stat_statements, then:

* idle: nothing is sent for ``--idle`` seconds; the growth of
  PostgreSQL's counters over that window (statements from
  pg_stat_statements, transactions, WAL records and WAL writes from
  pg_stat_wal, autovacuum and autoanalyze runs, the server's CPU) per second, and the statements per
  second per registered runner. Snapshots are taken after ``SETTLE_S``
  of quiet each (see ``pgstats``), so both miss the same tail and the
  difference is the steady state. The busiest idle statements are listed.
* failover, ``--repeats`` times: SIGKILL a runner process and time until
  every one of its shards is held again by a survivor (its lock, read from
  ``pg_locks`` every 5 ms: the new owner serves it from then on) and until
  every one answers a volatile ask from the client (``cluster.failover``'s
  probes, one per shard: at 1,000 shards they saturate the client process
  and measure it more than the failover), then start a replacement and wait
  until it serves.

Nothing here asserts on a time; the report prints the medians.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from trio_cluster.demo.orchestrate import Children
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres

from .cluster import Cluster, failover, open_cluster, start_node
from .common import log, write_json
from .pgstats import SERVER_SETTINGS, SETTLE_S, server_cpu

TOP_STATEMENTS: Final = 4
IDLE_RATES: Final = (
    "statements_per_runner",
    "statements",
    "wal_records",
    "wal_writes",
    "transactions",
    "server_cpu_percent",
)


async def counters(conn: Connection) -> dict[str, float]:
    row = await conn.fetchrow(
        "SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
        "        WHERE query NOT LIKE '%pg_stat%'),"
        " (SELECT sum(xact_commit) FROM pg_stat_database),"
        " wal_records, wal_write,"
        " (SELECT sum(autovacuum_count + autoanalyze_count) FROM pg_stat_all_tables)"
        " FROM pg_stat_wal"
    )
    assert row is not None
    names = ("statements", "transactions", "wal_records", "wal_writes", "autovacuums")
    return {name: float(value) for name, value in zip(names, row, strict=True)}


async def idle(cluster: Cluster, seconds: float) -> dict[str, Any]:
    """The server's counters' growth per second while the cluster sits idle."""
    async with open_connection(cluster.dsn) as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # The earlier phases' writes are vacuumed and checkpointed first, so the
        # window's WAL is what the idle cluster writes, not maintenance of before.
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
        await trio.sleep(SETTLE_S)
        await conn.execute("SELECT pg_stat_statements_reset()")
        before, cpu_before = await counters(conn), server_cpu(cluster.server)
        await trio.sleep(seconds)
        cpu_after = server_cpu(cluster.server)
        await trio.sleep(SETTLE_S)
        after = await counters(conn)
        top = await conn.fetch(
            "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
            " FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat%'"
            f" ORDER BY calls DESC LIMIT {TOP_STATEMENTS}"
        )
    rates = {name: (after[name] - before[name]) / seconds for name in after}
    registered = len(cluster.nodes) + 1  # the client here is a registered runner too
    rates["statements_per_runner"] = rates["statements"] / registered
    if cpu_before is not None and cpu_after is not None:
        rates["server_cpu_percent"] = 100 * (cpu_after - cpu_before) / seconds
    return {
        "rates": rates,
        "top": [(int(calls), query) for calls, query in top],
        "registered_runners": registered,
    }


async def measure(
    children: Children,
    server: ThrowawayPostgres,
    *,
    runners: int,
    shards: int,
    repeats: int,
    idle_s: float,
) -> dict[str, Any]:
    prefix = f"mbench{os.getpid() % 100000}_{runners}_{shards}_"
    log(f"{runners} runners x {shards} shards ({prefix})")
    async with open_cluster(children, server, prefix, runners=runners, shards=shards) as cluster:
        quiet = None
        if idle_s > 0:
            log("  idle")
            quiet = await idle(cluster, idle_s)
            log(f"  idle: {quiet['rates']}")
        failovers: list[float] = []
        held: list[float] = []
        first: list[float] = []
        for repeat in range(repeats):
            outage, _ = await failover(
                cluster, cluster.nodes[-1], restart=False, tag=f"m{runners}-{shards}-{repeat}"
            )
            assert outage.all_shards is not None and outage.held is not None
            assert outage.first_held is not None
            failovers.append(outage.all_shards * 1e3)
            held.append(outage.held * 1e3)
            first.append(outage.first_held * 1e3)
            back = start_node(children, cluster.dsn, prefix, shards)
            await back.ready()
            cluster.nodes.append(back)
            await cluster.settled()
    return {
        "runners": runners,
        "shards": shards,
        "idle": quiet,
        "failover_all_shards_ms": failovers,
        "failover_median_ms": statistics.median(failovers),
        "held_again_ms": held,
        "held_again_median_ms": statistics.median(held),
        "first_held_ms": first,
        "first_held_median_ms": statistics.median(first),
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| runners | shards | statements/s per runner | statements/s | WAL records/s"
        " | WAL writes/s | transactions/s | server CPU % | failover: first shard held again"
        " (median; runs) | all shards held again | all shards answer a probe |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rates = result["idle"]["rates"] if result["idle"] else dict.fromkeys(IDLE_RATES, math.nan)
        runs = ", ".join(f"{ms:.0f}" for ms in result["failover_all_shards_ms"])
        held = ", ".join(f"{ms:.0f}" for ms in result["held_again_ms"])
        first = ", ".join(f"{ms:.0f}" for ms in result["first_held_ms"])
        lines.append(
            f"| {result['runners']} (+1 client) | {result['shards']}"
            f" | {rates['statements_per_runner']:.2f} | {rates['statements']:.2f}"
            f" | {rates['wal_records']:.2f} | {rates['wal_writes']:.2f}"
            f" | {rates['transactions']:.2f} | {rates.get('server_cpu_percent', float('nan')):.1f}"
            f" | {result['first_held_median_ms']:.0f} ms ({first})"
            f" | {result['held_again_median_ms']:.0f} ms ({held})"
            f" | {result['failover_median_ms']:.0f} ms ({runs}) |"
        )
    for result in filter(lambda result: result["idle"], results):
        top = "; ".join(f"{calls}x {query}" for calls, query in result["idle"]["top"])
        lines.append(f"\n{result['runners']} x {result['shards']} idle statements: {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.membership", description=__doc__)
    parser.add_argument("--runners", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3, help="failovers per pair (3)")
    parser.add_argument(
        "--idle", type=float, default=30.0, help="idle window, seconds (30; 0: failover only)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results")
    args = parser.parse_args(argv)
    server = ThrowawayPostgres(durable=True, settings=SERVER_SETTINGS)
    with server, Children() as children:
        results = [
            trio.run(
                partial(
                    measure,
                    children,
                    server,
                    runners=runners,
                    shards=shards,
                    repeats=args.repeats,
                    idle_s=args.idle,
                )
            )
            for shards in args.shards
            for runners in args.runners
        ]
    print(report(results))
    if args.json:
        write_json(args.json, {"results": results})


if __name__ == "__main__":
    main()
