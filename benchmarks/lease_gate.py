"""Start-gate benchmark: what ``LeaseSession.confirmed`` costs every handler start.

Run from the repository root::

    python -m benchmarks.lease_gate [--quick] [--repeats N] [--json PATH]

A throwaway PostgreSQL server with stock durability and one real
``PgLeaseSession`` holding one shard, just answered by its lock connection:
the common case, where the gate returns without waiting. Each repeat times
``calls`` awaits of ``confirmed`` in a loop (and, for the loop's own share, as
many awaits of a coroutine that does nothing) and reports nanoseconds per
call, wall and CPU; the median of the repeats. Nothing is asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.hashing import ShardId
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres import open_postgres_storage

from .common import bench_parser, log, markdown_table, repeats_of, utc_now, write_json

SHARD = ShardId("default", 0)


async def nothing(shard: ShardId) -> None:
    """The baseline: an await of a coroutine that returns at once."""


async def per_call(gate: Callable[[ShardId], Awaitable[None]], calls: int) -> tuple[float, float]:
    """Nanoseconds per await of ``gate``: wall, CPU."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(calls):
        await gate(SHARD)
    return (time.perf_counter_ns() - wall) / calls, (time.process_time_ns() - cpu) / calls


async def measure(dsn: str, calls: int, repeats: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[tuple[float, float]]] = {"confirmed": [], "empty coroutine": []}
    async with (
        open_postgres_storage(dsn, prefix="gatebench_") as storage,
        storage.session(RunnerSpec("bench"), lambda _: None) as session,
    ):
        assert await session.acquire(SHARD) is not None
        for repeat in range(repeats):
            # The timed loops never yield: give the heartbeat its turn between them.
            await trio.sleep(0.1)
            samples["confirmed"].append(await per_call(session.confirmed, calls))
            samples["empty coroutine"].append(await per_call(nothing, calls))
            log(f"  repeat {repeat + 1}/{repeats}: {samples['confirmed'][-1][0]:.0f} ns")
    return {
        name: {
            "wall_ns": statistics.median(s[0] for s in series),
            "cpu_ns": statistics.median(s[1] for s in series),
        }
        for name, series in samples.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser("python -m benchmarks.lease_gate", __doc__ or "")
    args = parser.parse_args(argv)
    repeats = repeats_of(parser, args)
    calls = 20_000 if args.quick else 200_000
    with ThrowawayPostgres(durable=True) as server:
        results = trio.run(measure, server.dsn, calls, repeats)
    print(f"{calls:,} awaits per repeat, median of {repeats} repeats\n")
    print(
        markdown_table(
            ("await", "wall ns / call", "CPU ns / call"),
            (False, True, True),
            [[name, f"{r['wall_ns']:.0f}", f"{r['cpu_ns']:.0f}"] for name, r in results.items()],
        )
    )
    if args.json is not None:
        report: dict[str, Any] = {"date": utc_now(), "calls": calls, "results": results}
        write_json(args.json, report)


if __name__ == "__main__":
    main()
