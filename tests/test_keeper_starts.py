"""The keeper schedules the runtimes it adopts and does not wait for each to start.

Stand-in runtimes whose start the test holds back show what the keeper does
meanwhile: a later pass ends at once (so the next membership change is acted
on), and a runtime no longer assigned here while it was still starting is
handed off once it started, not at the next safety poll. The first pass waits
for its runtimes, so that a runner opens serving what it took.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio
import trio.testing

from trio_cluster.core.assignment import RunnerSpec, assign
from trio_cluster.core.hashing import ShardId
from trio_cluster.core.lifecycle import ShardState
from trio_cluster.runtime.hooks import Hooks
from trio_cluster.runtime.keeper import ShardKeeper
from trio_cluster.runtime.routing import Router
from trio_cluster.runtime.shard import ShardRuntime
from trio_cluster.storage import Lease, MemoryStorage
from trio_cluster.testing import TEST_CONFIG

CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=8, membership_poll_interval=3600.0)


class HeldBack:
    """A shard runtime that starts once its gate opens, then serves until stopped."""

    def __init__(self, lease: Lease, on_stopped: Callable[[HeldBack], None], gate: trio.Event):
        self.lease = lease
        self._on_stopped = on_stopped
        self._gate = gate
        self.state = ShardState.STARTING
        self._stopped = trio.Event()

    @property
    def accepting(self) -> bool:
        return self.state is ShardState.SERVING

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._gate.wait()
        self.state = ShardState.SERVING
        task_status.started()
        await self._stopped.wait()
        self._on_stopped(self)

    async def stop(self, grace: float) -> None:
        self.state = ShardState.DRAINING
        self._stopped.set()

    def lose(self) -> None:
        self.state = ShardState.LOST
        self._stopped.set()


async def test_a_shard_reassigned_while_starting_is_handed_off_once_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    opened, later = trio.Event(), trio.Event()
    opened.set()
    made: list[HeldBack] = []
    shards: dict[ShardId, ShardRuntime] = {}
    hooks = Hooks(trusted=())
    router = Router("a", CONFIG, hooks, shards)
    every = [ShardId("default", index) for index in range(CONFIG.shards_per_group)]
    split = assign(every, [RunnerSpec("a"), RunnerSpec("b")])
    moving = next(shard for shard in every if split[shard] == "b")

    def new_shard(lease: Lease, on_stopped: Callable[[ShardRuntime], None]) -> ShardRuntime:
        # The first pass's runtimes start at once; those of later passes wait for ``later``.
        gate = opened if len(made) < CONFIG.shards_per_group else later
        runtime = HeldBack(lease, on_stopped, gate)  # type: ignore[arg-type]
        made.append(runtime)
        return runtime  # type: ignore[return-value]

    keeper: ShardKeeper | None = None

    def lost(shard: ShardId) -> None:
        assert keeper is not None
        keeper.on_lease_lost(shard)

    async with storage.session(RunnerSpec("a"), lost) as session:
        keeper = ShardKeeper(
            address="a",
            config=CONFIG,
            runners=storage,
            session=session,
            router=router,
            shards=shards,
            hooks=hooks,
            new_shard=new_shard,
        )
        async with trio.open_nursery() as nursery:
            # The first pass returns once its runtimes serve: the runner opens serving.
            await nursery.start(keeper.run, nursery)
            assert len(made) == CONFIG.shards_per_group
            assert all(runtime.accepting for runtime in made)
            # ``moving`` is lost and taken again: its new runtime is held back.
            storage.revoke(moving)
            while len(made) == CONFIG.shards_per_group:
                await trio.testing.wait_all_tasks_blocked()
            assert id(shards[moving]) == id(made[-1]) and not made[-1].accepting
            async with storage.session(RunnerSpec("b"), lambda shard: None):
                # B's registration (its notice, as the runner's follower would pass it
                # on) wakes the keeper: its pass hands off B's serving shards and
                # leaves ``moving`` alone, for it is not serving yet.
                keeper.wake()
                while set(router.assignment.values()) != {"a", "b"}:
                    await keeper.changed()
                await trio.testing.wait_all_tasks_blocked()
                assert moving in shards
                later.set()  # it starts: the keeper hands it off now
                with trio.fail_after(1):  # long before the safety poll (an hour)
                    while moving in shards:
                        await keeper.changed()
                assert keeper.owns_its_assignment()
                assert made[-1].state is ShardState.DRAINING
                theirs = {shard for shard, owner in split.items() if owner == "b"}
                assert theirs.isdisjoint(shards)
            nursery.cancel_scope.cancel()
