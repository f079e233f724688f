"""The keeper computes a large assignment without stalling the event loop."""

import trio

from trio_cluster.core.assignment import VNODES, RunnerSpec, assign
from trio_cluster.core.hashing import ShardId
from trio_cluster.core.reserved import singleton_shard
from trio_cluster.runtime.keeper import INLINE_WORK, Plan, plan, plan_off_loop

SINGLETON = singleton_shard("cleanup").group


async def test_a_large_assignment_leaves_the_loop_free() -> None:
    # The target size: 1,000 runners x 30,000 shards.
    runners = [RunnerSpec(f"10.0.{i // 250}.{i % 250}:7000") for i in range(1000)]
    assert 30_000 + VNODES * len(runners) > INLINE_WORK
    planned: list[Plan] = []
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        planned.append(await plan_off_loop(runners, 30_000))
        during = ticks
        nursery.cancel_scope.cancel()
    assert planned == [plan(runners, ["default"], 30_000)]
    # Computed inline, the plan would run between two checkpoints and leave the other
    # task none; in a thread the loop takes the GIL back every few milliseconds
    # (how long each gap lasts is the benchmark's to measure: benchmarks.assignment).
    assert during >= 10


async def test_a_small_assignment_runs_inline() -> None:
    runners = [RunnerSpec("a", groups={"default", SINGLETON}), RunnerSpec("b")]
    entities, singletons = await plan_off_loop(runners, 10)
    everything = assign(
        [ShardId("default", index) for index in range(10)] + [ShardId(SINGLETON, 0)], runners
    )
    assert entities | singletons == everything
    assert set(singletons) == {ShardId(SINGLETON, 0)}
    assert singletons[ShardId(SINGLETON, 0)] == "a"
