"""Singletons on in-process runners over the memory storage: one at a time, moved on
leave and on lease loss, restarted after failures, only where declared."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import trio
import trio.testing

from trio_cluster import (
    Entity,
    Instrument,
    Runner,
    Singleton,
    SingletonContext,
    open_runner,
)
from trio_cluster.core.reserved import singleton_shard
from trio_cluster.storage.memory import MemoryStorage
from trio_cluster.testing import TEST_CONFIG


class Tracker:
    """What singleton runs did, seen from outside them: entries, exits, overlaps."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []
        """(phase, runner address, epoch), in order."""
        self.running: set[str] = set()
        self.max_running = 0
        self._changed = trio.Event()

    def _note(self, phase: str, ctx: SingletonContext) -> None:
        self.log.append((phase, ctx.runner_address, ctx.epoch))
        self._changed.set()
        self._changed = trio.Event()

    def enter(self, ctx: SingletonContext) -> None:
        self.running.add(ctx.runner_address)
        self.max_running = max(self.max_running, len(self.running))
        self._note("enter", ctx)

    def exit(self, ctx: SingletonContext) -> None:
        self.running.discard(ctx.runner_address)
        self._note("exit", ctx)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not condition():
                await self._changed.wait()

    def entries(self) -> list[tuple[str, int]]:
        return [(address, epoch) for phase, address, epoch in self.log if phase == "enter"]


def forever(tracker: Tracker, name: str = "reports") -> Singleton:
    """A singleton that runs until cancelled, recording its entry and exit."""

    async def run(ctx: SingletonContext) -> None:
        tracker.enter(ctx)
        try:
            await trio.sleep_forever()
        finally:
            tracker.exit(ctx)

    return Singleton(name, run)


async def test_exactly_one_of_two_runners_runs_it_and_both_agree_where() -> None:
    tracker = Tracker()
    storage = MemoryStorage()
    single = forever(tracker)
    async with (
        open_runner(storage=storage, config=TEST_CONFIG, singletons=[single]) as first,
        open_runner(storage=storage, config=TEST_CONFIG, singletons=[single]) as second,
    ):
        await tracker.wait_until(lambda: len(tracker.running) == 1)
        with trio.fail_after(5):
            await first.settled()
            await second.settled()
        (address,) = tracker.running
        assert first.singleton_owners == second.singleton_owners == {"reports": address}
        owner = first if first.address == address else second
        assert owner.singletons == {"reports"}
        assert owner.snapshot().singletons_running == 1
        assert {first.singletons, second.singletons} == {frozenset(), frozenset({"reports"})}
    assert tracker.max_running == 1
    assert tracker.running == set()


async def test_a_lost_lease_cancels_it_before_it_runs_again_under_a_new_epoch() -> None:
    tracker = Tracker()
    storage = MemoryStorage()
    single = forever(tracker)
    async with open_runner(storage=storage, config=TEST_CONFIG, singletons=[single]) as runner:
        await tracker.wait_until(lambda: len(tracker.entries()) == 1)
        storage.revoke(singleton_shard("reports"))
        await tracker.wait_until(lambda: len(tracker.entries()) == 2)
        (_, address, first_epoch), exit_, (_, _, second_epoch) = tracker.log
        assert exit_ == ("exit", address, first_epoch)  # cancelled before the next began
        assert second_epoch > first_epoch
        assert runner.snapshot().singletons_running == 1
    assert tracker.max_running == 1


async def test_leaving_hands_it_to_the_other_runner_after_it_exited() -> None:
    tracker = Tracker()
    storage = MemoryStorage()
    single = forever(tracker)
    leave, left = trio.Event(), trio.Event()

    async def first(*, task_status: trio.TaskStatus[Runner]) -> None:
        async with open_runner(storage=storage, config=TEST_CONFIG, singletons=[single]) as alone:
            task_status.started(alone)
            await leave.wait()
        left.set()

    async with trio.open_nursery() as nursery:
        # The first runner, alone, takes the singleton; it moves to the second either
        # when that one joins or when the first leaves: one handoff either way.
        leaves: Runner = await nursery.start(first)
        await tracker.wait_until(lambda: tracker.running == {leaves.address})
        async with open_runner(storage=storage, config=TEST_CONFIG, singletons=[single]) as stays:
            await stays.settled()
            await leaves.settled()
            leave.set()
            await left.wait()
            await tracker.wait_until(lambda: tracker.running == {stays.address})
            enter_leaving, exit_leaving, enter_staying = tracker.log[-3:]
            assert enter_leaving[:2] == ("enter", leaves.address)
            assert exit_leaving[:2] == ("exit", leaves.address)
            assert enter_staying[:2] == ("enter", stays.address)
            assert enter_staying[2] > exit_leaving[2]
    assert tracker.max_running == 1


async def test_it_runs_only_on_runners_that_declare_it() -> None:
    tracker = Tracker()
    storage = MemoryStorage()
    async with (
        open_runner(storage=storage, config=TEST_CONFIG) as bystander,
        open_runner(storage=storage, config=TEST_CONFIG, singletons=[forever(tracker)]) as host,
    ):
        await tracker.wait_until(lambda: tracker.running == {host.address})
        await bystander.settled()
        assert bystander.singleton_owners == {"reports": host.address}
        assert bystander.singletons == frozenset()
    # With no runner declaring it left, it has no owner.
    async with open_runner(storage=storage, config=TEST_CONFIG) as alone:
        await alone.settled()
        assert alone.singleton_owners == {}


async def test_a_function_that_raises_is_restarted_with_backoff_and_the_runner_lives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[tuple[int, float]] = []
    done = trio.Event()

    async def flaky(ctx: SingletonContext) -> None:
        attempts.append((ctx.attempt, trio.current_time()))
        if ctx.attempt < 4:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        done.set()
        await trio.sleep_forever()

    async with open_runner(config=TEST_CONFIG, singletons=[Singleton("flaky", flaky)]) as runner:
        await done.wait()
        snapshot = runner.snapshot()
        assert (snapshot.singleton_failures, snapshot.singletons_running) == (3, 1)
        assert snapshot.contained_failures == 0  # the user's failure, not the runtime's
    assert [attempt for attempt, _ in attempts] == [1, 2, 3, 4]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    assert all(gap > 0 for gap in gaps)  # never a busy loop


async def test_a_graceful_handoff_lets_it_return_within_its_grace() -> None:
    stopped_gracefully: list[bool] = []

    async def patient(ctx: SingletonContext) -> None:
        await ctx.wait_stopping()
        stopped_gracefully.append(ctx.stopping)

    single = Singleton("patient", patient, grace=5.0)
    async with open_runner(config=TEST_CONFIG, singletons=[single]) as runner:
        await runner.settled()
        assert runner.singletons == {"patient"}
    assert stopped_gracefully == [True]


class Events(Instrument):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def singleton_started(self, name: str, epoch: int) -> None:
        self.events.append(("started", name, epoch))

    def singleton_stopped(self, name: str, how: str) -> None:
        self.events.append(("stopped", name, how))


async def test_instruments_hear_it_start_and_stop() -> None:
    events = Events()
    tracker = Tracker()
    storage = MemoryStorage()
    async with open_runner(
        storage=storage, config=TEST_CONFIG, singletons=[forever(tracker)], instruments=[events]
    ):
        await tracker.wait_until(lambda: bool(tracker.running))
        storage.revoke(singleton_shard("reports"))  # epoch 2 is the revocation's
        await tracker.wait_until(lambda: len(tracker.entries()) == 2)
    assert events.events == [
        ("started", "reports", 1),
        ("stopped", "reports", "lost"),
        ("started", "reports", 3),
        ("stopped", "reports", "released"),
    ]


async def test_declaration_mistakes_are_refused() -> None:
    async def nothing(ctx: SingletonContext) -> None:
        pass

    with pytest.raises(ValueError, match="singleton name"):
        Singleton("no spaces", nothing)
    with pytest.raises(ValueError, match="declared twice"):
        async with open_runner(singletons=[Singleton("a", nothing), Singleton("a", nothing)]):
            pass
    with pytest.raises(ValueError, match="reserved"):
        Entity("Sneaky", shard_group="__singleton__.a")
