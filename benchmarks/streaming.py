"""Streaming replies across runner processes: chunks per second over the link.

Run from the repository root::

    python -m benchmarks.streaming [--quick] [--repeats N] [--json PATH]

Each repeat starts the cross-runner benchmark's cluster (``benchmarks.cluster``:
a throwaway PostgreSQL server with stock durability, two ``bench_node``
runner processes, and a client-only runner in this process), so every
chunk measured crosses a socket from a runner process to this one. A
volatile stream touches no storage (PostgreSQL is there for the leases);
a persisted one goes through it.

What it measures, each repeat, after a warm-up stream:

* one stream of small chunks (an int each) with the default window (16)
  and with a window of 256: chunks per second, the caller consuming each
  chunk as it comes;
* 10 such streams at once, to 10 entities (window 16): chunks per second
  in all;
* one stream of 1 KiB chunks (window 16): chunks per second;
* one persisted stream (window 16, and 256): chunks per second, each
  chunk stored, announced and read from storage (a twentieth of the
  chunks of a volatile stream);
* the baseline: sequential volatile ``ask`` to the same kind of entity,
  replies per second: what fetching the same items one request at a time
  would give.

Medians over the repeats, with the min and max. Nothing here asserts on a time.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from trio_cluster import StreamRpc
from trio_cluster.demo.orchestrate import Children
from trio_cluster.pgdriver.server import ThrowawayPostgres

from .bench_node import (
    Payload,
    StoredTicks,
    Tick,
    Ticks,
    echo,
    stored_ticks,
    stored_ticks_wide,
    ticks,
)
from .cluster import Cluster, open_cluster
from .common import bench_parser, clock, log, repeats_of, write_json
from .pgstats import SERVER_SETTINGS

CONCURRENT: Final = 10


def sizes(quick: bool) -> tuple[int, int]:
    """Chunks per stream, asks in the baseline."""
    return (20_000, 2_000) if quick else (100_000, 10_000)


async def stream_rate(
    cluster: Cluster, entity_ids: list[str], n: int, *, window: int, size: int = 0
) -> float:
    """Chunks per second, ``n`` of them per entity, every stream at once."""

    async def one(entity_id: str) -> None:
        received = 0
        async with cluster.client.stream(ticks, entity_id, Ticks(n, size), window=window) as chunks:
            async for _ in chunks:
                received += 1
        assert received == n, (entity_id, received)

    start = clock()
    async with trio.open_nursery() as nursery:
        for entity_id in entity_ids:
            nursery.start_soon(one, entity_id)
    return n * len(entity_ids) / ((clock() - start) / 1e9)


async def stored_rate(cluster: Cluster, rpc: StreamRpc[StoredTicks, Tick], n: int) -> float:
    """Chunks per second of one persisted stream of ``n`` chunks (a fresh primary key)."""
    received = 0
    start = clock()
    key = f"bench-{clock()}"
    async with cluster.client.stream(rpc, "p-0", StoredTicks(key, n)) as chunks:
        async for _ in chunks:
            received += 1
    assert received == n, received
    return n / ((clock() - start) / 1e9)


async def ask_rate(cluster: Cluster, entity_id: str, n: int) -> float:
    start = clock()
    for i in range(n):
        await cluster.client.ask(echo, entity_id, Payload(1, str(i)))
    return n / ((clock() - start) / 1e9)


async def run_repeat(
    children: Children, server: ThrowawayPostgres, repeat: int, quick: bool
) -> dict[str, float]:
    chunks, asks = sizes(quick)
    prefix = f"sbench{os.getpid() % 100000}_{repeat}_"
    async with open_cluster(children, server, prefix) as cluster:
        entities = [f"s-{i}" for i in range(CONCURRENT)]
        cluster.check_cross_process(entities)
        log(f"repeat {repeat}: warm-up")
        await stream_rate(cluster, entities, 1000, window=16)
        await ask_rate(cluster, entities[0], 500)
        await stored_rate(cluster, stored_ticks, 200)
        measured: dict[str, Callable[[], Awaitable[float]]] = {
            "one stream, window 16": lambda: stream_rate(cluster, entities[:1], chunks, window=16),
            "one stream, window 256": lambda: stream_rate(
                cluster, entities[:1], chunks, window=256
            ),
            f"{CONCURRENT} streams, window 16": lambda: stream_rate(
                cluster, entities, chunks // CONCURRENT, window=16
            ),
            "one stream, 1 KiB chunks, window 16": lambda: stream_rate(
                cluster, entities[:1], chunks // 2, window=16, size=1024
            ),
            "one persisted stream, window 16": lambda: stored_rate(
                cluster, stored_ticks, chunks // 20
            ),
            "one persisted stream, window 256": lambda: stored_rate(
                cluster, stored_ticks_wide, chunks // 20
            ),
            "baseline: sequential volatile ask": lambda: ask_rate(cluster, entities[0], asks),
        }
        results = {}
        for name, measure in measured.items():
            log(f"repeat {repeat}: {name}")
            results[name] = await measure()
        return results


async def measure_all(
    children: Children, server: ThrowawayPostgres, repeats: int, quick: bool
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for repeat in range(1, repeats + 1):
        for name, value in (await run_repeat(children, server, repeat, quick)).items():
            values.setdefault(name, []).append(value)
    return values


def table(values: dict[str, list[float]]) -> str:
    lines = ["| Measurement | Median | Min | Max | Unit |", "|---|---:|---:|---:|---|"]
    for name, series in values.items():
        unit = "replies/s" if name.startswith("baseline") else "chunks/s"
        cells = [statistics.median(series), min(series), max(series)]
        lines.append(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in cells) + f" | {unit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(
        "python -m benchmarks.streaming",
        "Benchmark streaming replies across runner processes.",
        repeats_help="repeats (default 5, or 3 with --quick)",
    )
    args = parser.parse_args(argv)
    repeats = repeats_of(parser, args)
    started = clock()
    server = ThrowawayPostgres(durable=True, settings=SERVER_SETTINGS)
    with server, Children() as children:
        values = trio.run(measure_all, children, server, repeats, args.quick)
    elapsed_s = (clock() - started) / 1e9
    header = (
        f"trio_cluster streaming benchmark: Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, 2 runner processes + client-only runner in the benchmark "
        f"process, {repeats} repeats, median (min, max); {elapsed_s:.0f} s"
    )
    print(header + "\n\n" + table(values))
    if args.json is not None:
        write_json(args.json, {"values": values, "repeats": repeats, "elapsed_s": elapsed_s})


if __name__ == "__main__":
    main()
