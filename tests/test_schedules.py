"""Schedules on in-process runners over the memory storage, under a MockClock: one firing
per instant across lease losses, failed writes and handoffs; the missed-run policy across
outages (a property); metrics."""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import (
    Entity,
    EntityContext,
    Firing,
    Implementation,
    Missed,
    PersistenceError,
    Runner,
    Schedule,
    Tell,
    open_runner,
)
from trio_cluster.core.reserved import SCHEDULE_PREFIX, singleton_shard
from trio_cluster.core.timetable import to_ms
from trio_cluster.storage.base import Lease
from trio_cluster.storage.memory import MemoryStorage
from trio_cluster.testing import TEST_CONFIG, schedules_follow_trio

START = datetime(2026, 3, 29, 0, 0, 30, tzinfo=UTC)
"""Half a minute before midnight in Paris, the night its clocks go forward."""


class Beat(msgspec.Struct):
    pass


Metronome = Entity("Metronome")
beat = Metronome.rpc("beat", Beat, int, persisted=True)


class Heard:
    """What the entity handled, by scheduled instant: the request ids that carried it
    (two ids for one instant would be two firings; one id twice, a redelivery)."""

    def __init__(self) -> None:
        self.requests: dict[str, set[int]] = defaultdict(set)
        self.changed = trio.Event()

    def implementation(self) -> Implementation:
        heard = self

        class Handler:
            def __init__(self, ctx: EntityContext) -> None:
                self.ctx = ctx

            @beat.handler
            async def beat(self, _: Beat) -> int:
                request = self.ctx.request
                heard.requests[request.headers["schedule-instant"]].add(request.request_id)
                heard.changed.set()
                heard.changed = trio.Event()
                return len(heard.requests)

        return Metronome.implement(Handler)

    async def wait_for(self, count: int) -> None:
        while len(self.requests) < count:
            await self.changed.wait()

    def instants(self) -> list[datetime]:
        assert all(len(ids) == 1 for ids in self.requests.values()), self.requests
        return sorted(datetime.fromisoformat(text) for text in self.requests)


def every_second(name: str = "metronome", **kwargs: object) -> Schedule:
    return Schedule(name, Tell(beat, "m", Beat()), every=timedelta(seconds=1), **kwargs)  # type: ignore[arg-type]


def consecutive(instants: list[datetime], step: timedelta) -> bool:
    return all(b - a == step for a, b in itertools.pairwise(instants))


async def test_a_tell_fires_once_per_instant_across_lease_losses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heard = Heard()
    storage = MemoryStorage()
    with schedules_follow_trio(START):
        async with open_runner(
            heard.implementation(), storage=storage, config=TEST_CONFIG, schedules=[every_second()]
        ) as runner:
            await heard.wait_for(3)
            assert runner.schedules == {"metronome"}
            for _ in range(5):
                storage.revoke(singleton_shard(SCHEDULE_PREFIX + "metronome"))
                await heard.wait_for(len(heard.requests) + 3)
            snapshot = runner.snapshot()
    instants = heard.instants()
    assert consecutive(instants, timedelta(seconds=1))  # none lost, none twice
    assert instants[0] == START + timedelta(seconds=1)  # begins from its first start
    assert snapshot.schedules_running == 1
    assert snapshot.schedule_firings >= len(instants) - 1
    assert snapshot.schedule_failures == 0


class ForgetfulStorage(MemoryStorage):
    """Fails to record every other firing, after the tell was stored: as a holder dying
    between the two would leave it."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    async def advance_schedule(self, lease: Lease, name: str, instant: int) -> bool:
        if instant // 1000 % 2:
            self.failed += 1
            if self.failed % 2:
                raise PersistenceError("lost the connection while recording")
        return await super().advance_schedule(lease, name, instant)


async def test_a_tell_stored_but_not_recorded_is_deduplicated_when_fired_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heard = Heard()
    storage = ForgetfulStorage()
    with schedules_follow_trio(START):
        async with open_runner(
            heard.implementation(), storage=storage, config=TEST_CONFIG, schedules=[every_second()]
        ) as runner:
            await heard.wait_for(8)
            snapshot = runner.snapshot()
    assert storage.failed >= 4
    assert consecutive(heard.instants(), timedelta(seconds=1))
    assert snapshot.singleton_failures >= 2  # each failed record: logged, retried after a backoff


async def test_a_handoff_goes_on_from_the_last_instant_on_the_next_runner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    heard = Heard()
    storage = MemoryStorage()
    implementation = heard.implementation()
    leave, left = trio.Event(), trio.Event()

    def runner() -> contextlib.AbstractAsyncContextManager[Runner]:
        return open_runner(
            implementation, storage=storage, config=TEST_CONFIG, schedules=[every_second()]
        )

    async def first(*, task_status: trio.TaskStatus[Runner]) -> None:
        async with runner() as alone:
            task_status.started(alone)
            await leave.wait()
        left.set()

    with schedules_follow_trio(START):
        async with trio.open_nursery() as nursery:
            # The first runner, alone, holds the schedule; it moves to the second
            # either when that one joins or when the first leaves: one handoff.
            leaves: Runner = await nursery.start(first)
            await leaves.settled()
            await heard.wait_for(2)
            assert leaves.schedules == {"metronome"}
            async with runner() as stays:
                await stays.settled()
                await leaves.settled()
                await heard.wait_for(len(heard.requests) + 2)
                leave.set()
                await left.wait()
                await heard.wait_for(len(heard.requests) + 3)
                assert stays.schedules == {"metronome"}
    assert consecutive(heard.instants(), timedelta(seconds=1))


async def test_a_function_runs_at_most_once_per_instant_and_its_failures_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[tuple[datetime, int]] = []
    enough = trio.Event()

    async def work(firing: Firing) -> None:
        runs.append((firing.instant, firing.epoch))
        if len(runs) >= 12:
            enough.set()
        if len(runs) % 3 == 0:
            raise RuntimeError("a scheduled function failing")
        await trio.sleep(0.5)  # revoked halfway through some runs

    storage = MemoryStorage()
    schedule = Schedule("work", work, every=timedelta(seconds=1))
    with schedules_follow_trio(START):
        async with open_runner(storage=storage, config=TEST_CONFIG, schedules=[schedule]) as runner:
            while not enough.is_set():
                with trio.move_on_after(2.25):
                    await enough.wait()
                storage.revoke(singleton_shard(SCHEDULE_PREFIX + "work"))
            snapshot = runner.snapshot()
    instants = [instant for instant, _ in runs]
    assert instants == sorted(set(instants))  # never twice, though runs were cancelled
    assert len({epoch for _, epoch in runs}) > 1
    assert snapshot.schedule_failures == len(runs) // 3


async def test_the_next_fire_times_follow_the_schedules_clock_and_zone() -> None:
    schedule = Schedule("midnight", Tell(beat, "m", Beat()), cron="0 0 * * *", tz="Europe/Paris")
    with schedules_follow_trio(datetime(2026, 3, 28, 23, tzinfo=UTC)):
        async with open_runner(config=TEST_CONFIG, schedules=[schedule]) as runner:
            times = runner.next_fire_times("midnight", 2)
            with pytest.raises(KeyError):
                runner.next_fire_times("elsewhere", 1)
    assert [t.isoformat() for t in times] == [
        "2026-03-30T00:00:00+02:00",  # midnight in Paris is the start itself: not after it
        "2026-03-31T00:00:00+02:00",
    ]


async def test_declaring_schedules_wrongly_is_refused_before_the_runner_starts() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        async with open_runner(schedules=[every_second(), every_second()]):
            pass
    with pytest.raises(TypeError, match="Schedule instances"):
        async with open_runner(schedules=["0 * * * *"]):  # type: ignore[list-item]
            pass


async def test_the_metrics_expose_schedules_and_firings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_cluster.prometheus import PrometheusMetrics  # noqa: PLC0415 - an extra

    heard = Heard()
    metrics = PrometheusMetrics()
    schedule = every_second(missed=Missed.run_latest())
    with schedules_follow_trio(START):
        async with open_runner(
            heard.implementation(), config=TEST_CONFIG, schedules=[schedule], instruments=[metrics]
        ):
            await heard.wait_for(4)
            text = metrics.exposition().decode()
    assert "trio_cluster_schedules 1.0" in text
    assert 'trio_cluster_schedule_firings_total{schedule="metronome"}' in text
    assert 'trio_cluster_schedule_lateness_seconds_count{schedule="metronome"}' in text


# -- the missed-run policy across outages, as a property --------------------------------

EVERY = 10
"""Seconds between instants in the outage property."""
SLACK = 1.0
"""How late a firing may be beyond its instant when nothing was missed (the runner's own
start under the MockClock), and how far from the policy's age no instant is judged."""


def run_with_outages(schedule: Schedule, outages: list[tuple[float, float]]) -> list[int]:
    """Run a runner for each (up, down) pair of durations in turn, over one storage, and
    return the instants (Unix ms) the entity heard, in the order it heard them."""
    heard: list[int] = []

    class Handler:
        def __init__(self, ctx: EntityContext) -> None:
            self.ctx = ctx

        @beat.handler
        async def beat(self, _: Beat) -> int:
            heard.append(
                to_ms(datetime.fromisoformat(self.ctx.request.headers["schedule-instant"]))
            )
            return 0

    async def main() -> None:
        storage = MemoryStorage()
        with schedules_follow_trio(START):
            for up, down in outages:
                async with open_runner(
                    Metronome.implement(Handler),
                    storage=storage,
                    config=TEST_CONFIG,
                    schedules=[schedule],
                ):
                    await trio.sleep(up)
                await trio.sleep(down)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return heard


outage_plans = st.lists(
    st.tuples(st.integers(min_value=15, max_value=60), st.integers(min_value=0, max_value=90)),
    min_size=2,
    max_size=4,
)


def downtimes(plan: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """The (went down, came back) moments, in seconds after the start."""
    moments, now = [], 0.0
    for up, down in plan:
        now += up
        moments.append((now, now + down))
        now += down
    return moments[:-1]


@given(outage_plans, st.integers(min_value=0, max_value=60))
def test_skip_older_than_fires_what_is_young_enough_after_an_outage(
    plan: list[tuple[int, int]], age: int
) -> None:
    schedule = Schedule(
        "metronome",
        Tell(beat, "m", Beat()),
        every=timedelta(seconds=EVERY),
        missed=Missed.skip_older_than(timedelta(seconds=age)),
    )
    heard = run_with_outages(schedule, [(float(u), float(d)) for u, d in plan])
    assert heard == sorted(set(heard))  # none twice, in order
    start = to_ms(START)
    fired = {(instant - start) / 1000 for instant in heard}
    for down, back in downtimes(plan):
        for k in range(int(down // EVERY) + 1, int(back // EVERY) + 1):
            instant = k * EVERY
            if instant <= down + SLACK or abs(back - instant - age) <= SLACK:
                continue  # fired before going down, or too close to the age to judge
            assert (instant in fired) == (back - instant < age), (instant, down, back)


@given(outage_plans)
def test_run_latest_fires_only_the_latest_instant_an_outage_missed(
    plan: list[tuple[int, int]],
) -> None:
    schedule = Schedule(
        "metronome",
        Tell(beat, "m", Beat()),
        every=timedelta(seconds=EVERY),
        missed=Missed.run_latest(),
    )
    heard = run_with_outages(schedule, [(float(u), float(d)) for u, d in plan])
    assert heard == sorted(set(heard))
    start = to_ms(START)
    fired = {(instant - start) / 1000 for instant in heard}
    for down, back in downtimes(plan):
        instants = [k * EVERY for k in range(int(down // EVERY) + 1, int(back // EVERY) + 1)]
        if any(abs(i - down) <= SLACK or abs(i - back) <= SLACK for i in instants):
            continue  # too close to an edge of the outage to judge
        missed = [instant for instant in instants if down < instant < back]
        assert [instant for instant in missed if instant in fired] == missed[-1:]
