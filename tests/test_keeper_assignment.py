"""The keeper computes a large assignment without stalling the event loop."""

import time

import trio
import trio.lowlevel

from trio_cluster.core.assignment import VNODES, RunnerSpec, assign
from trio_cluster.core.hashing import ShardId
from trio_cluster.core.reserved import singleton_shard
from trio_cluster.runtime.keeper import INLINE_WORK, plan, plan_off_loop

SINGLETON = singleton_shard("cleanup").group


async def test_a_large_assignment_leaves_the_loop_free() -> None:
    # The target size: 1,000 runners x 30,000 shards.
    runners = [RunnerSpec(f"10.0.{i // 250}.{i % 250}:7000") for i in range(1000)]
    assert 30_000 + VNODES * len(runners) > INLINE_WORK
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
        result = await plan_off_loop(runners, 30_000)
        took = time.perf_counter() - started
        done.set()
    assert result == plan(runners, ["default"], 30_000)
    # Inline, one gap would be the whole computation (about 0.1 s); in a thread the
    # loop gets the GIL back every few milliseconds.
    assert max(gaps) < took / 3


async def test_a_small_assignment_runs_inline() -> None:
    runners = [RunnerSpec("a", groups={"default", SINGLETON}), RunnerSpec("b")]
    entities, singletons = await plan_off_loop(runners, 10)
    everything = assign(
        [ShardId("default", index) for index in range(10)] + [ShardId(SINGLETON, 0)], runners
    )
    assert entities | singletons == everything
    assert set(singletons) == {ShardId(SINGLETON, 0)}
    assert singletons[ShardId(SINGLETON, 0)] == "a"
