"""Assignment benchmark: how long ``assign`` takes, how much a join or a leave moves.

Run from the repository root::

    python -m benchmarks.assignment [--quick] [--repeats N] [--json PATH]

Pure computation, no database: ``assign`` depends on the live runners alone.

- **Time**: wall and CPU (``time.process_time``) seconds of one ``assign`` of
  ``shards`` over ``runners`` with equal weights, and at 1,000 x 30,000 also with
  mixed weights (1, 2 and 4); the median of the repeats.  CPU time is the figure to
  compare on a busy machine: it leaves out the time other processes had the cores.
- **Movement**: the ``N + 1``-th runner joining the largest cluster (five
  different newcomers) and one of the ``N + 1`` leaving again, against the ideal
  ``shards / (N + 1)``; and for several cluster sizes around each ``runners``, the shards that
  change owner when one runner joins (the ``N + 1``-th) and when one leaves, against
  the ideal ``shards / N`` (``shards / (N + 1)`` for a join); and against what the
  runner that came or went holds, which separates the cascade from the mover's own
  luck on the ring.
- **Balance**: the most and the fewest shards one runner holds, over the mean.
- **Event loop**: the longest the loop went without running a task while the
  keeper's ``plan_off_loop`` computed the largest assignment in its thread.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from trio_cluster.core.assignment import RunnerSpec, assign
from trio_cluster.core.hashing import ShardId
from trio_cluster.runtime.keeper import plan_off_loop

from .common import bench_parser, log, markdown_table, repeats_of, utc_now, write_json

SIZES = [(10, 1_000), (16, 10_000), (100, 3_000), (100, 10_000), (1_000, 30_000)]
QUICK_SIZES = [(10, 1_000), (100, 3_000)]
SPREAD = range(-2, 3)
"""Cluster sizes around each ``runners`` whose joins and leaves are measured, in steps
of ``runners // 60`` (at least 1): a cap changes at some sizes and not at others."""


def runner_specs(count: int, weights: Callable[[int], float] = lambda _: 1.0) -> list[RunnerSpec]:
    return [RunnerSpec(f"10.0.{i // 250}.{i % 250}:7000", weight=weights(i)) for i in range(count)]


def shard_ids(count: int) -> list[ShardId]:
    return [ShardId("default", index) for index in range(count)]


def timed(shards: list[ShardId], runners: list[RunnerSpec], repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        assign(shards, runners)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def moved(before: dict[ShardId, str], after: dict[ShardId, str]) -> int:
    return sum(1 for shard, owner in before.items() if after.get(shard) != owner)


def one_more(shards: list[ShardId], size: int, trials: int = 5) -> dict[str, list[float]]:
    """The ``size + 1``-th runner joining (one of ``trials`` newcomers), and then one of
    the ``size + 1`` leaving again, against the ideal ``shards / (size + 1)``."""
    everyone = runner_specs(size + trials)
    before = assign(shards, everyone[:size])
    ideal = len(shards) / (size + 1)
    joins, leaves = [], []
    for trial in range(trials):
        grown = [*everyone[:size], everyone[size + trial]]
        joined = assign(shards, grown)
        gone = grown[trial * size // trials]
        left = assign(shards, [spec for spec in grown if spec is not gone])
        joins.append(moved(before, joined) / ideal)
        leaves.append(moved(joined, left) / ideal)
    return {"join_vs_ideal": joins, "leave_vs_ideal": leaves}


def movement(shards: list[ShardId], size: int) -> dict[str, Any]:
    """Joins and leaves at sizes around ``size``: ratios to the ideal and to the mover."""
    step = max(1, size // 60)
    everyone = runner_specs(size + max(SPREAD) * step + 1)
    joins, leaves, join_cascade, leave_cascade, most, fewest = [], [], [], [], [], []
    n = len(shards)
    for count in (size + k * step for k in SPREAD):
        before = assign(shards, everyone[:count])
        joined = assign(shards, everyone[: count + 1])
        left = assign(shards, everyone[1:count])
        loads = Counter(before.values())
        newcomer = Counter(joined.values())[everyone[count].address]
        leaver = loads[everyone[0].address]
        joins.append(moved(before, joined) / (n / (count + 1)))
        leaves.append(moved(before, left) / (n / count))
        join_cascade.append(moved(before, joined) / max(newcomer, 1))
        leave_cascade.append(moved(before, left) / max(leaver, 1))
        most.append(max(loads.values()) / (n / count))
        fewest.append(min(loads[spec.address] for spec in everyone[:count]) / (n / count))
    return {
        "join_vs_ideal": joins,
        "leave_vs_ideal": leaves,
        "join_vs_newcomer": join_cascade,
        "leave_vs_leaver": leave_cascade,
        "max_over_mean": most,
        "min_over_mean": fewest,
    }


async def loop_gaps(shards: int, runners: list[RunnerSpec]) -> tuple[float, float]:
    """The longest stretch without a checkpoint while the keeper plans off the loop,
    and while a thread only sleeps as long: what the machine's other load costs."""
    planning = await longest_gap(lambda: plan_off_loop(runners, shards))
    took = planning[1]
    idle = await longest_gap(lambda: trio.to_thread.run_sync(time.sleep, took))
    return planning[0], idle[0]


async def longest_gap(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """The longest gap between two checkpoints of a busy task while ``work`` runs, and
    how long it ran."""
    gaps: list[float] = []
    done = trio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        started = time.perf_counter()
        await work()
        took = time.perf_counter() - started
        done.set()
    return max(gaps), took


def main() -> None:
    parser = bench_parser("python -m benchmarks.assignment", __doc__.splitlines()[0])
    args = parser.parse_args()
    repeats = repeats_of(parser, args)
    sizes = QUICK_SIZES if args.quick else SIZES
    rows, report = [], []
    for runners, shards in sizes:
        log(f"{runners} runners x {shards} shards")
        ids = shard_ids(shards)
        timing = timed(ids, runner_specs(runners), repeats)
        moves = movement(ids, runners)
        entry: dict[str, Any] = {"runners": runners, "shards": shards, **timing, **moves}
        report.append(entry)
        rows.append(
            [
                f"{runners:,} x {shards:,}",
                f"{timing['wall_s'] * 1000:,.1f}",
                f"{timing['cpu_s'] * 1000:,.1f}",
                f"{statistics.mean(moves['join_vs_ideal']):.2f}"
                f" ({min(moves['join_vs_ideal']):.2f}-{max(moves['join_vs_ideal']):.2f})",
                f"{statistics.mean(moves['leave_vs_ideal']):.2f}"
                f" ({min(moves['leave_vs_ideal']):.2f}-{max(moves['leave_vs_ideal']):.2f})",
                f"{statistics.mean(moves['join_vs_newcomer']):.2f}",
                f"{statistics.mean(moves['leave_vs_leaver']):.2f}",
                f"{max(moves['max_over_mean']):.2f}",
                f"{min(moves['min_over_mean']):.2f}",
            ]
        )
    runners, shards = sizes[-1]
    weighted = runner_specs(runners, lambda i: (1.0, 2.0, 4.0)[i % 3])
    mixed = timed(shard_ids(shards), weighted, repeats)
    gap, idle_gap = trio.run(loop_gaps, shards, runner_specs(runners))
    exact = one_more(shard_ids(shards), runners)
    print(
        markdown_table(
            [
                "runners x shards",
                "wall ms",
                "CPU ms",
                "join / ideal",
                "leave / ideal",
                "join / newcomer's",
                "leave / leaver's",
                "max / mean",
                "min / mean",
            ],
            [False, *[True] * 8],
            rows,
        )
    )
    print()
    joins, leaves = exact["join_vs_ideal"], exact["leave_vs_ideal"]
    print(
        f"Runner {runners + 1:,} joining {runners:,} at {shards:,} shards (5 newcomers):"
        f" {statistics.mean(joins):.2f} x ideal ({min(joins):.2f}-{max(joins):.2f}); one of the"
        f" {runners + 1:,} leaving again: {statistics.mean(leaves):.2f} x ideal"
        f" ({min(leaves):.2f}-{max(leaves):.2f})."
    )
    print(
        f"Mixed weights (1, 2, 4) at {runners:,} x {shards:,}: wall {mixed['wall_s'] * 1000:,.1f}"
        f" ms, CPU {mixed['cpu_s'] * 1000:,.1f} ms (medians of {repeats})."
    )
    print(
        f"Longest event-loop gap while the keeper planned {runners:,} x {shards:,}:"
        f" {gap * 1000:.1f} ms (while a thread slept as long: {idle_gap * 1000:.1f} ms)."
    )
    if args.json:
        gaps = {"loop_gap_s": gap, "idle_loop_gap_s": idle_gap}
        write_json(
            Path(args.json),
            {
                "when": utc_now(),
                "repeats": repeats,
                "sizes": report,
                "one_more": exact,
                "mixed": mixed,
                **gaps,
            },
        )


if __name__ == "__main__":
    main()
