"""Retention benchmark: does the messages table stay bounded under steady persisted traffic?

Run from the repository root::

    python -m benchmarks.retention [--seconds S] [--rate R] [--window W] [--interval I]
                                   [--json PATH]

A throwaway PostgreSQL server with stock durability, one runner in this
process owning every shard (with a short retention window so that a run of a
few minutes covers many windows), and one sender making ``rate`` persisted
asks a second, each with a fresh primary key. Every second it samples the
table's rows (all, and processed) and its size on disk. Without retention the
rows grow as ``rate * t``; with it they should level off at about
``rate * (window + interval)``, and the size once autovacuum reuses the space.
Nothing is asserted: it prints the samples and the bound.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from trio_cluster import ShardingConfig, open_runner
from trio_cluster.pgdriver import open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres import Retention, open_postgres_storage

from .bench_node import Bench, BenchHandler, Payload, persist
from .common import log, markdown_table, utc_now, write_json

PREFIX = "retbench_"
CONFIG = ShardingConfig(shards_per_group=10)


async def sample(dsn: str) -> tuple[int, int, int]:
    """Rows, processed rows, and the table's size with its indexes, in bytes."""
    async with open_connection(dsn) as conn:
        row = await conn.fetchrow(
            f"SELECT count(*), count(*) FILTER (WHERE processed),"
            f" pg_total_relation_size('{PREFIX}messages') FROM {PREFIX}messages"
        )
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def measure(dsn: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    retention = Retention(window=args.window, interval=args.interval)
    samples: list[dict[str, Any]] = []
    async with (
        open_postgres_storage(dsn, prefix=PREFIX, retention=retention) as storage,
        open_runner(Bench.implement(BenchHandler), storage=storage, config=CONFIG) as runner,
        trio.open_nursery() as nursery,
    ):
        sent = 0

        async def send() -> None:
            nonlocal sent
            sent += 1
            await runner.ask(persist, f"e{sent % 50}", Payload(1, f"k{sent}"))

        async def sender() -> None:
            start = trio.current_time()
            while True:
                async with trio.open_nursery() as batch:
                    for _ in range(args.rate // 10):
                        batch.start_soon(send)
                # Paced by the clock, not by replies: a steady offered load.
                await trio.sleep_until(start + (sent / args.rate))

        nursery.start_soon(sender)
        start = trio.current_time()
        for second in range(1, args.seconds + 1):
            await trio.sleep_until(start + second)
            rows, processed, size = await sample(dsn)
            samples.append({"t": second, "sent": sent, "rows": rows, "processed": processed,
                            "bytes": size})  # fmt: skip
            if second % 10 == 0:
                log(f"  {second} s: sent {sent}, rows {rows}, {size / 1e6:.1f} MB")
        nursery.cancel_scope.cancel()
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retention", description=__doc__)
    parser.add_argument("--seconds", type=int, default=120, help="length of the run")
    parser.add_argument("--rate", type=int, default=200, help="persisted asks per second")
    parser.add_argument("--window", type=float, default=10.0, help="retention window, s")
    parser.add_argument("--interval", type=float, default=2.0, help="sweep interval, s")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the samples")
    args = parser.parse_args(argv)
    with ThrowawayPostgres(durable=True) as server:
        samples = trio.run(measure, server.dsn, args)
    bound = args.rate * (args.window + args.interval)
    every = max(1, len(samples) // 12)
    rows = [
        [str(s["t"]), f"{s['sent']:,}", f"{s['rows']:,}", f"{s['processed']:,}",
         f"{s['bytes'] / 1e6:.1f}"]
        for s in samples[every - 1 :: every]
    ]  # fmt: skip
    print(
        f"Retention: window {args.window:g} s, sweep every {args.interval:g} s, offered "
        f"{args.rate} persisted asks/s for {args.seconds} s (stock durability); expected "
        f"bound about rate x (window + interval) = {bound:,.0f} rows\n"
    )
    print(
        markdown_table(
            ("t (s)", "sent", "rows", "processed rows", "table + indexes (MB)"),
            (True, True, True, True, True),
            rows,
        )
    )
    later = [s["rows"] for s in samples if s["t"] > args.window + args.interval]
    if later:
        print(f"\nmax rows after the first window: {max(later):,}; final: {later[-1]:,}")
    if args.json is not None:
        write_json(args.json, {"date": utc_now(), "args": vars(args) | {"json": None},
                               "samples": samples})  # fmt: skip


if __name__ == "__main__":
    main()
