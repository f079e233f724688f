"""The pure part of schedules: instants from an expression and a time zone, across DST
transitions in three zones, and the missed-run decisions, as properties."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import Entity, Missed, Schedule, Tell
from trio_cluster.core.timetable import (
    CronTimetable,
    IntervalTimetable,
    Timetable,
    decide,
    from_ms,
    jitter_ms,
    to_ms,
)

ZONES = ("Europe/Paris", "America/New_York", "Australia/Sydney")
"""Two northern zones changing on different dates, and a southern one (DST over New Year)."""
EXPRESSIONS = (
    "30 2 * * *",  # a fixed time inside the skipped or repeated hour
    "0 3 * * *",
    "0 * * * *",
    "*/20 * * * *",
    "15 1-3 * * *",
    "0 9 * * 1-5",
    "*/30 * * * * *",  # six fields: seconds first
)
# 2026's transitions: the last Sundays of March and October in Paris, the second
# Sunday of March and the first of November in New York, the first Sundays of
# April and October in Sydney.
TRANSITIONS = (
    datetime(2026, 3, 29, 1, tzinfo=UTC),
    datetime(2026, 10, 25, 1, tzinfo=UTC),
    datetime(2026, 3, 8, 7, tzinfo=UTC),
    datetime(2026, 11, 1, 6, tzinfo=UTC),
    datetime(2026, 4, 4, 16, tzinfo=UTC),
    datetime(2026, 10, 3, 16, tzinfo=UTC),
)

near_transitions = st.builds(
    lambda base, offset: to_ms(base) + offset,
    st.sampled_from(TRANSITIONS),
    st.integers(min_value=-2 * 86_400_000, max_value=2 * 86_400_000),
)


def sequence(timetable: Timetable, start: int, count: int) -> list[int]:
    instants: list[int] = []
    moment = start
    for _ in range(count):
        instant = timetable.after(moment)
        assert instant is not None
        instants.append(instant)
        moment = instant
    return instants


@given(
    st.sampled_from(EXPRESSIONS),
    st.sampled_from(ZONES),
    near_transitions,
    st.integers(min_value=1, max_value=40),
)
def test_cron_instants_are_consistent_from_wherever_iteration_starts(
    expression: str, zone: str, start: int, cut: int
) -> None:
    """What a restart relies on: from a stored instant, or from any moment between two,
    the same instants follow; the last one at or before a moment is the one before."""
    timetable = CronTimetable(expression, ZoneInfo(zone))
    instants = sequence(timetable, start, 60)
    assert instants == sorted(set(instants))  # strictly increasing: none twice in UTC
    assert instants[0] > start
    assert sequence(timetable, instants[cut - 1], 60 - cut) == instants[cut:]
    for before, after in itertools.pairwise(instants):
        middle = (before + after) // 2
        assert timetable.after(middle) == after
        assert timetable.at_or_before(middle) == before
        assert timetable.at_or_before(after - 1) == before
        assert timetable.at_or_before(after) == after


@given(st.sampled_from(ZONES), st.sampled_from(["30 2 * * *", "0 3 * * *", "15 1 * * *"]))
def test_a_fixed_time_job_fires_once_a_local_day_through_both_transitions(
    zone: str, expression: str
) -> None:
    """Debian cron's rule: once on the day the clocks go back (not in both copies of the
    hour), and on the day they go forward too (at the end of the gap if its time is in it)."""
    tz = ZoneInfo(zone)
    timetable = CronTimetable(expression, tz)
    start = to_ms(datetime(2026, 1, 1, tzinfo=tz))
    days = Counter(from_ms(i, tz).date() for i in sequence(timetable, start, 365))
    assert set(days.values()) == {1}
    assert len(days) == 365  # one day after another: none skipped
    assert min(days) == date(2026, 1, 1)


@given(st.sampled_from(ZONES))
def test_an_hourly_job_fires_every_real_hour_across_the_transitions(zone: str) -> None:
    """A job with ``*`` hours follows real time: 23 firings the day clocks go forward,
    25 the day they go back, each an hour after the last."""
    tz = ZoneInfo(zone)
    timetable = CronTimetable("0 * * * *", tz)
    start = to_ms(datetime(2026, 1, 1, tzinfo=tz))
    instants = sequence(timetable, start, 366 * 24)
    assert {b - a for a, b in itertools.pairwise(instants)} == {3_600_000}
    per_day = Counter(from_ms(i, tz).date() for i in instants)
    whole_days = [count for day, count in per_day.items() if date(2026, 1, 1) < day < max(per_day)]
    assert sorted(Counter(whole_days).items()) == [(23, 1), (24, len(whole_days) - 2), (25, 1)]


@given(st.integers(min_value=1, max_value=10**7), st.integers(min_value=0, max_value=10**13))
def test_interval_instants_are_multiples_of_the_interval(every: int, moment: int) -> None:
    timetable = IntervalTimetable(every)
    after = timetable.after(moment)
    before = timetable.at_or_before(moment)
    assert after is not None and before is not None
    assert after % every == 0 == before % every
    assert before <= moment < after == before + every


@given(st.text(max_size=20), st.integers(min_value=0), st.integers(min_value=0, max_value=10**7))
def test_jitter_is_a_function_of_the_name_and_the_instant_within_its_bound(
    name: str, instant: int, bound: int
) -> None:
    value = jitter_ms(name, instant, bound)
    assert 0 <= value <= bound
    assert value == jitter_ms(name, instant, bound)


# -- the missed-run policy ------------------------------------------------------------


def run_decisions(
    timetable: Timetable,
    *,
    start: int,
    wakes: list[int],
    max_age: int | None,
    bound: int,
) -> tuple[list[tuple[int, int]], list[int]]:
    """Follow decide() from ``start`` at each moment of ``wakes`` (a runner that looks only
    then, as one down in between would): the (instant, moment) fired, and the moments."""
    cursor, fired, moments = start, [], []
    for now in wakes:
        moments.append(now)
        for _ in range(10_000):  # every due instant is fired before time moves on
            decision = decide(
                timetable,
                cursor=cursor,
                now=now,
                jitter=lambda i: jitter_ms("s", i, bound),
                max_age=max_age,
                max_jitter=bound,
            )
            assert decision.cursor >= cursor
            cursor = decision.cursor
            if decision.fire is None:
                assert decision.wake_at is None or decision.wake_at > now
                break
            assert decision.fire == cursor
            fired.append((decision.fire, now))
        else:
            raise AssertionError("decide() did not settle")
    return fired, moments


wake_gaps = st.lists(st.integers(min_value=1, max_value=20_000), min_size=1, max_size=30)


@given(
    st.integers(min_value=100, max_value=3_000),
    st.integers(min_value=0, max_value=10_000),
    wake_gaps,
    st.integers(min_value=0, max_value=99),
)
def test_skip_older_than_fires_each_instant_once_unless_it_was_too_late(
    every: int, max_age: int, gaps: list[int], jitter_percent: int
) -> None:
    timetable = IntervalTimetable(every)
    bound = every * jitter_percent // 100
    start = 1_000_000
    wakes = [start + sum(gaps[: i + 1]) for i in range(len(gaps))]
    fired, _ = run_decisions(timetable, start=start, wakes=wakes, max_age=max_age, bound=bound)
    instants = [instant for instant, _ in fired]
    assert instants == sorted(set(instants))  # in order, none twice
    fired_at = dict(fired)
    # Jitter is shorter than the interval, so instants fall due in order, and each is
    # settled at the first look after it fell due: fired if no later than max_age then.
    for instant in range(start + every - start % every, wakes[-1] + 1, every):
        due = instant + jitter_ms("s", instant, bound)
        look = next((now for now in wakes if now >= due), None)
        if look is None:
            assert instant not in fired_at
        elif look - due <= max_age:
            assert fired_at[instant] == look
        else:
            assert instant not in fired_at


@given(
    st.integers(min_value=100, max_value=3_000),
    wake_gaps,
    st.integers(min_value=0, max_value=99),
)
def test_run_latest_fires_only_the_latest_of_the_instants_missed_together(
    every: int, gaps: list[int], jitter_percent: int
) -> None:
    timetable = IntervalTimetable(every)
    bound = every * jitter_percent // 100
    start = 1_000_000
    wakes = [start + sum(gaps[: i + 1]) for i in range(len(gaps))]
    fired, _ = run_decisions(timetable, start=start, wakes=wakes, max_age=None, bound=bound)
    instants = [instant for instant, _ in fired]
    assert instants == sorted(set(instants))
    # At each look, of the instants that fell due since the last one, exactly the
    # latest is fired.
    previous = start
    for now in wakes:
        due_since = [
            instant
            for instant in range(start + every - start % every, now + 1, every)
            if previous < instant + jitter_ms("s", instant, bound) <= now
        ]
        fired_here = [instant for instant, at in fired if at == now]
        assert fired_here == due_since[-1:]
        previous = now


# -- declaration ------------------------------------------------------------------------


class Ping(msgspec.Struct):
    pass


Probe = Entity("SchedProbe")
persisted_ping = Probe.rpc("persisted_ping", Ping, int, persisted=True)
volatile_ping = Probe.rpc("volatile_ping", Ping, int)


async def nothing(_: object) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "bad cron"),
        ({"cron": "* * *"}, "bad cron"),
        ({"cron": "0 * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({}, "exactly one of cron and every"),
        ({"cron": "0 * * * *", "every": timedelta(seconds=1)}, "exactly one"),
        ({"every": timedelta(microseconds=1500)}, "whole number of ms"),
        ({"every": timedelta(0)}, "whole number of ms"),
        ({"every": timedelta(seconds=1), "jitter": timedelta(seconds=1)}, "shorter than"),
        ({"every": timedelta(seconds=1), "tz": "Europe/Paris"}, "cron schedules only"),
        ({"every": timedelta(seconds=1), "jitter": timedelta(seconds=-1)}, "jitter"),
    ],
)
def test_a_bad_schedule_is_refused_at_declaration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule("s", nothing, **kwargs)  # type: ignore[arg-type]


def test_a_schedule_fires_only_persisted_rpcs_and_valid_names() -> None:
    with pytest.raises(ValueError, match="volatile"):
        Tell(volatile_ping, "p", Ping())
    with pytest.raises(ValueError, match="schedule name"):
        Schedule("no spaces", nothing, every=timedelta(seconds=1))
    with pytest.raises(ValueError, match=">= 0"):
        Missed.skip_older_than(timedelta(seconds=-1))
    Schedule("ok", Tell(persisted_ping, "p", Ping()), every=timedelta(seconds=1))


def test_next_fire_times_are_read_in_the_schedules_zone_with_its_jitter() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule("nightly", nothing, cron="30 2 * * *", tz="Europe/Paris")
    times = schedule.next_fire_times(3, datetime(2026, 3, 27, 12, tzinfo=paris))
    assert times == [
        datetime(2026, 3, 28, 2, 30, tzinfo=paris),
        datetime(2026, 3, 29, 3, 0, tzinfo=paris),  # 2:30 does not exist that night
        datetime(2026, 3, 30, 2, 30, tzinfo=paris),
    ]
    jittered = Schedule("j", nothing, every=timedelta(seconds=10), jitter=timedelta(seconds=5))
    after = datetime(2026, 1, 1, tzinfo=UTC)
    for n, moment in enumerate(jittered.next_fire_times(5, after), start=1):
        instant = after + timedelta(seconds=10 * n)
        assert instant <= moment <= instant + timedelta(seconds=5)
