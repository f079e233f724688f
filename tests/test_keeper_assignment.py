"""The keeper computes a large assignment without stalling the event loop."""

import time

import trio
import trio.lowlevel

from trio_cluster.core.assignment import RunnerSpec, assign
from trio_cluster.core.hashing import ShardId
from trio_cluster.runtime.keeper import INLINE_PAIRS, assign_off_loop


async def test_a_large_assignment_leaves_the_loop_free() -> None:
    shards = [ShardId("default", index) for index in range(2000)]
    runners = [RunnerSpec(f"10.0.{i // 250}.{i % 250}:7000") for i in range(300)]
    assert len(shards) * len(runners) > INLINE_PAIRS
    gaps: list[float] = []

    async def tick(done: trio.Event) -> None:
        last = time.perf_counter()
        while not done.is_set():
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick, done)
        started = time.perf_counter()
        result = await assign_off_loop(shards, runners)
        took = time.perf_counter() - started
        done.set()
    assert result == assign(shards, runners)
    # Inline, one gap would be the whole computation (about 150 ms); in a thread the
    # loop gets the GIL back every few milliseconds.
    assert max(gaps) < took / 3


async def test_a_small_assignment_runs_inline() -> None:
    shards = [ShardId("default", index) for index in range(10)]
    runners = [RunnerSpec("a"), RunnerSpec("b")]
    assert await assign_off_loop(shards, runners) == assign(shards, runners)
