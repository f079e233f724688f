"""The keeper computes a large assignment without stalling the event loop."""

from benchmarks.assignment import longest_gap
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

    async def planning() -> None:
        planned.append(await plan_off_loop(runners, 30_000))

    gap, took = await longest_gap(planning)
    assert planned == [plan(runners, ["default"], 30_000)]
    # Inline, one gap would be the whole computation (about 0.2 s); in a thread the
    # loop gets the GIL back every few milliseconds.
    assert gap < took / 3


async def test_a_small_assignment_runs_inline() -> None:
    runners = [RunnerSpec("a", groups={"default", SINGLETON}), RunnerSpec("b")]
    entities, singletons = await plan_off_loop(runners, 10)
    everything = assign(
        [ShardId("default", index) for index in range(10)] + [ShardId(SINGLETON, 0)], runners
    )
    assert entities | singletons == everything
    assert set(singletons) == {ShardId(SINGLETON, 0)}
    assert singletons[ShardId(SINGLETON, 0)] == "a"
