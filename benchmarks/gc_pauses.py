"""Python's garbage collector under a runner holding thousands of shards (issue 13).

Run from the repository root::

    python -m benchmarks.gc_pauses [--quick] [--shards 10000] [--repeats N]
                                   [--gc-threshold 700,10,100] [--json PATH]

One process, two runners on a throwaway PostgreSQL with stock durability
(in one process so that the collector's pauses, which stop every task of
the process, are seen by both): runner A takes every shard, then runner B
joins and half of them move. Reported per repeat: how long B took to open
(its registration and first keeper pass, with A's handoffs running in the
same event loop), how long until both serve their assignment, the pauses of
the collector by generation until then (``gc.callbacks``), and the lock connections
that went silent past ``liveness_timeout`` meanwhile (each one a runner
losing every lease). Also the GC-tracked objects one idle shard keeps.

``--gc-threshold`` applies ``gc.set_threshold`` first, to compare a tuned
process with the default one (700, 10, 10). Nothing here asserts on a time.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from typing import Any

import attrs
import trio

from trio_cluster import Entity, MemoryStorage, Runner, open_runner
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import LOOPBACK, TEST_CONFIG

from .common import bench_parser, log, repeats_of, utc_now, write_json

SHARDS = 10_000
QUICK_SHARDS = 300

Idle = Entity("Idle")
IDLE = Idle.implement(type("IdleHandler", (), {"__init__": lambda self, ctx: None}))


class Pauses:
    """The collector's pauses, by generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.by_generation: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.by_generation[info["generation"]].append(time.perf_counter() - self._started)


class Silences(logging.Handler):
    """Counts the lock connections given up for silence."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("lock connection silent"):
            self.count += 1


def serving(*runners: Runner) -> bool:
    members = len(runners)
    return all(
        r.owns_its_assignment() and len(set(r.assignment.values())) == members for r in runners
    )


async def objects_per_shard(shards: int) -> float:
    """GC-tracked objects one idle shard keeps (memory storage: no driver objects)."""
    config = attrs.evolve(TEST_CONFIG, shards_per_group=shards)
    gc.collect()
    before = len(gc.get_objects())
    async with open_runner(IDLE, storage=MemoryStorage(), config=config) as runner:
        await runner.settled()
        gc.collect()
        return (len(gc.get_objects()) - before) / shards


async def one_join(dsn: str, prefix: str, shards: int) -> dict[str, float]:
    config = attrs.evolve(TEST_CONFIG, shards_per_group=shards)
    pauses, silences = Pauses(), Silences()
    logging.getLogger("trio_cluster.postgres.leases").addHandler(silences)
    gc.callbacks.append(pauses)
    try:
        async with (
            open_postgres_storage(dsn, prefix=prefix) as first,
            open_postgres_storage(dsn, prefix=prefix) as second,
            open_runner(IDLE, storage=first, config=config, transport=LOOPBACK) as a,
        ):
            with trio.fail_after(120):
                while not serving(a):
                    await a.changed()
            gc.collect()
            for series in pauses.by_generation.values():
                series.clear()
            started = time.perf_counter()
            async with open_runner(IDLE, storage=second, config=config, transport=LOOPBACK) as b:
                opened = time.perf_counter() - started
                with trio.fail_after(300):
                    # A poll, not a wait on changes: each check is O(shards), and
                    # there is a change per shard moved.
                    while not serving(a, b):  # noqa: ASYNC110
                        await trio.sleep(0.1)
                settled = time.perf_counter() - started
                # The pauses until both serve, not those of the runners' closing.
                until_settled = {g: list(p) for g, p in pauses.by_generation.items()}
    finally:
        gc.callbacks.remove(pauses)
        logging.getLogger("trio_cluster.postgres.leases").removeHandler(silences)
    result = {"opened_s": opened, "settled_s": settled, "silences": float(silences.count)}
    for generation, series in until_settled.items():
        result[f"gen{generation}_s"] = sum(series)
        result[f"gen{generation}_max_s"] = max(series, default=0.0)
        result[f"gen{generation}_count"] = float(len(series))
    return result


async def measure(shards: int, repeats: int) -> dict[str, Any]:
    per_shard = await objects_per_shard(shards)
    log(f"{per_shard:.0f} GC-tracked objects per idle shard")
    joins = []
    with ThrowawayPostgres(durable=True) as server:
        for repeat in range(repeats):
            joins.append(await one_join(server.dsn, f"gcp{repeat}_", shards))
            log(f"repeat {repeat + 1}: {joins[-1]}")
    return {"objects_per_shard": per_shard, "joins": joins}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("python -m benchmarks.gc_pauses", __doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, help="default 10,000 (300 with --quick)")
    parser.add_argument("--gc-threshold", help="three integers, as gc.set_threshold takes them")
    args = parser.parse_args(argv)
    shards = args.shards or (QUICK_SHARDS if args.quick else SHARDS)
    if args.gc_threshold:
        gc.set_threshold(*(int(part) for part in args.gc_threshold.split(",")))
    values = trio.run(measure, shards, repeats_of(parser, args))
    joins = values["joins"]

    def median(key: str) -> float:
        return float(statistics.median(join[key] for join in joins))

    younger = median("gen0_s") + median("gen1_s")
    print(
        f"gc threshold {gc.get_threshold()}, {shards:,} shards, {len(joins)} repeats,"
        f" medians: {values['objects_per_shard']:.0f} tracked objects per idle shard;"
        f" B opened in {median('opened_s'):.2f} s, both serving after {median('settled_s'):.2f} s;"
        f" full collections {median('gen2_count'):.0f} taking {median('gen2_s'):.2f} s"
        f" (longest {median('gen2_max_s'):.2f} s), younger ones {younger:.2f} s;"
        f" lock connections given up for silence: {median('silences'):.0f}"
    )
    if args.json:
        write_json(args.json, {"when": utc_now(), "threshold": gc.get_threshold(), **values})


if __name__ == "__main__":
    main()
