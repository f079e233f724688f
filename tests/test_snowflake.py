"""Snowflake ids: strictly increasing per generator whatever the clock does."""

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core.snowflake import (
    EPOCH_MS,
    MACHINE_IDS,
    MAX_MACHINE_ID,
    MAX_SEQUENCE,
    SnowflakeGenerator,
    SnowflakeParts,
    compose,
    parse,
)

LAST_MS = EPOCH_MS + 2**41 - 1

timestamps = st.integers(min_value=EPOCH_MS, max_value=LAST_MS)
machine_ids = st.integers(min_value=0, max_value=MAX_MACHINE_ID)
sequences = st.integers(min_value=0, max_value=MAX_SEQUENCE)


class ScriptedClock:
    """Returns the given readings in order, then repeats the last one."""

    def __init__(self, readings: list[int]) -> None:
        self._readings: Iterator[int] = iter(readings)
        self._last = readings[0]

    def __call__(self) -> int:
        self._last = next(self._readings, self._last)
        return self._last


def frozen(now_ms: int) -> ScriptedClock:
    return ScriptedClock([now_ms])


def test_epoch_is_2025() -> None:
    assert int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000) == EPOCH_MS


@given(timestamps, machine_ids, sequences)
def test_parse_inverts_compose(timestamp_ms: int, machine_id: int, sequence: int) -> None:
    snowflake = compose(timestamp_ms, machine_id, sequence)
    assert 0 <= snowflake < 2**63  # fits a signed bigint
    assert parse(snowflake) == SnowflakeParts(timestamp_ms, machine_id, sequence)


parts_of_ids = st.tuples(timestamps, machine_ids, sequences)


@given(parts_of_ids, parts_of_ids)
def test_ids_order_by_time_across_machines(
    earlier: tuple[int, int, int], later: tuple[int, int, int]
) -> None:
    if earlier[0] < later[0]:
        assert compose(*earlier) < compose(*later)


@given(parts_of_ids, parts_of_ids)
def test_different_parts_make_different_ids(
    one: tuple[int, int, int], other: tuple[int, int, int]
) -> None:
    assert (compose(*one) == compose(*other)) == (one == other)


def test_room_for_8192_machines() -> None:
    # 1,000 runners and their client-only runners each take a machine id.
    assert MACHINE_IDS == MAX_MACHINE_ID + 1 == 8192
    assert parse(compose(EPOCH_MS, MAX_MACHINE_ID, MAX_SEQUENCE)).machine_id == MAX_MACHINE_ID


@given(
    timestamps,
    st.integers(min_value=0, max_value=1023),
    st.integers(min_value=0, max_value=511),
)
def test_ids_of_the_first_1024_machines_keep_the_earlier_layout(
    timestamp_ms: int, machine_id: int, sequence: int
) -> None:
    # The earlier layout: 41 bits of time, 10 of machine id, 12 of sequence.  Runners of
    # both versions mint disjoint ids while every live machine id is below 1,024.
    earlier = (timestamp_ms - EPOCH_MS) << 22 | machine_id << 12 | sequence
    assert compose(timestamp_ms, machine_id, sequence) == earlier


@pytest.mark.parametrize(
    ("timestamp_ms", "machine_id", "sequence", "field"),
    [
        (EPOCH_MS - 1, 0, 0, "timestamp_ms"),
        (LAST_MS + 1, 0, 0, "timestamp_ms"),
        (EPOCH_MS, -1, 0, "machine_id"),
        (EPOCH_MS, MAX_MACHINE_ID + 1, 0, "machine_id"),
        (EPOCH_MS, 0, -1, "sequence"),
        (EPOCH_MS, 0, MAX_SEQUENCE + 1, "sequence"),
    ],
)
def test_compose_rejects_out_of_range_parts(
    timestamp_ms: int, machine_id: int, sequence: int, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        compose(timestamp_ms, machine_id, sequence)


@pytest.mark.parametrize("snowflake", [-1, 2**63])
def test_parse_rejects_non_snowflakes(snowflake: int) -> None:
    with pytest.raises(ValueError, match="snowflake"):
        parse(snowflake)


@pytest.mark.parametrize("machine_id", [-1, MAX_MACHINE_ID + 1])
def test_generator_rejects_bad_machine_id(machine_id: int) -> None:
    with pytest.raises(ValueError, match="machine_id"):
        SnowflakeGenerator(machine_id)


@given(
    machine_ids,
    st.lists(
        st.integers(min_value=EPOCH_MS, max_value=EPOCH_MS + 10_000),
        min_size=1,
        max_size=MAX_SEQUENCE + 1,
    ),
)
def test_strictly_increasing_whatever_the_clock_does(machine_id: int, readings: list[int]) -> None:
    generator = SnowflakeGenerator(machine_id, ScriptedClock(readings))
    ids = [generator.next_id() for _ in readings]
    assert all(a < b for a, b in itertools.pairwise(ids))
    for position, snowflake in enumerate(ids):
        parts = parse(snowflake)
        assert parts.machine_id == machine_id == generator.machine_id
        # At most 512 ids, so the logical clock is exactly the latest reading so far.
        assert parts.timestamp_ms == max(readings[: position + 1])


def test_unique_and_ordered_within_one_frozen_millisecond() -> None:
    generator = SnowflakeGenerator(7, frozen(EPOCH_MS + 1000))
    ids = [generator.next_id() for _ in range(1_200)]
    assert ids == sorted(set(ids))
    parts = [parse(snowflake) for snowflake in ids]
    # The sequence overflowed twice, so the logical clock ran two ms ahead: no sleeping.
    assert parts[0] == SnowflakeParts(EPOCH_MS + 1000, 7, 0)
    assert parts[MAX_SEQUENCE] == SnowflakeParts(EPOCH_MS + 1000, 7, MAX_SEQUENCE)
    assert parts[MAX_SEQUENCE + 1] == SnowflakeParts(EPOCH_MS + 1001, 7, 0)
    assert parts[-1].timestamp_ms == EPOCH_MS + 1002


def test_catches_up_with_the_clock_after_running_ahead() -> None:
    generator = SnowflakeGenerator(0, ScriptedClock([EPOCH_MS] * 1000 + [EPOCH_MS + 5]))
    ids = [generator.next_id() for _ in range(1001)]
    assert parse(ids[-2]).timestamp_ms == EPOCH_MS + 1
    assert parse(ids[-1]) == SnowflakeParts(EPOCH_MS + 5, 0, 0)


@given(st.lists(machine_ids, min_size=2, max_size=5, unique=True))
def test_unique_across_machine_ids(machine: list[int]) -> None:
    # Same instant, same sequence numbers: only the machine id tells them apart.
    generators = [SnowflakeGenerator(m, frozen(EPOCH_MS + 42)) for m in machine]
    ids = [generator.next_id() for generator in generators for _ in range(50)]
    assert len(set(ids)) == len(ids)


def test_bad_clock_reading_raises_without_wedging_the_generator() -> None:
    generator = SnowflakeGenerator(1, ScriptedClock([EPOCH_MS + 10, LAST_MS + 1, EPOCH_MS + 11]))
    first = generator.next_id()
    with pytest.raises(ValueError, match="timestamp_ms"):
        generator.next_id()
    assert parse(generator.next_id()).timestamp_ms == EPOCH_MS + 11 > parse(first).timestamp_ms


def test_wall_clock_by_default() -> None:
    before = datetime.now(UTC).timestamp() * 1000
    parts = parse(SnowflakeGenerator(3).next_id())
    after = datetime.now(UTC).timestamp() * 1000
    assert before - 1 <= parts.timestamp_ms <= after + 1
    assert parts.machine_id == 3


async def test_unique_and_ordered_across_concurrent_trio_tasks() -> None:
    generator = SnowflakeGenerator(5)
    drawn: list[int] = []

    async def draw() -> None:
        for _ in range(100):
            drawn.append(generator.next_id())
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(draw)

    assert len(drawn) == 5000
    assert drawn == sorted(set(drawn))  # increasing in the order the tasks drew them
