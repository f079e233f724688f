"""Snowflake ids: 64-bit, roughly time-ordered, unique without coordination.

Layout, most significant first (63 bits used, so ids are positive as a signed
``bigint`` in PostgreSQL)::

    41 bits  milliseconds since EPOCH_MS (2025-01-01T00:00:00Z; lasts until 2094)
    10 bits  machine id, its low 10 bits
     3 bits  machine id, its high 3 bits (so machine ids 0..8191), unique per live runner
     9 bits  sequence within one millisecond (0..511)

Ordering ids orders them by creation time across machines (to the millisecond, give
or take clock skew), which is what storage range queries rely on.

Why 13 bits of machine id: every runner takes one, client-only runners included (the
id also names the runner in the membership and in reply notices), so 1,000 runners
and their clients need more than the classic 10 bits (1,024).  The 3 bits come from
the sequence, not the timestamp: 512 ids per millisecond is 512,000 ids/s per
runner, four times the most messages one runner was measured sending (about
110,000/s), and beyond that rate the generator only runs ahead of the clock (see
SnowflakeGenerator); fewer timestamp bits would end the id space decades sooner.

Why the machine id is split: the earlier layout was 41 bits of time, 10 of machine
id and 12 of sequence.  Keeping the low 10 bits where they were makes an id of
machine ``m < 1024`` exactly the id that layout gives ``m`` with a sequence below
512, so runners of both versions can share a cluster during a rolling upgrade
without ever minting the same id, as long as no live runner has a machine id of
1,024 or more (storage hands out the lowest free id, so fewer than 1,024 live
runners suffice).  ``parse`` of an id minted by the earlier layout with a sequence of
512 or more reads a wrong machine id and sequence; its timestamp is right.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "EPOCH_MS",
    "MACHINE_IDS",
    "MAX_MACHINE_ID",
    "MAX_SEQUENCE",
    "SnowflakeGenerator",
    "SnowflakeParts",
    "compose",
    "parse",
]

EPOCH_MS = 1_735_689_600_000
"""2025-01-01T00:00:00Z in Unix milliseconds: a recent epoch buys decades of range."""

_TIMESTAMP_BITS = 41
_MACHINE_LOW_BITS = 10
_MACHINE_HIGH_BITS = 3
_SEQUENCE_BITS = 9

MACHINE_IDS = 1 << (_MACHINE_LOW_BITS + _MACHINE_HIGH_BITS)
"""How many runners can be live at once: storage hands out ids below this."""
MAX_MACHINE_ID = MACHINE_IDS - 1
MAX_SEQUENCE = (1 << _SEQUENCE_BITS) - 1
_MAX_OFFSET_MS = (1 << _TIMESTAMP_BITS) - 1
_MACHINE_LOW_MASK = (1 << _MACHINE_LOW_BITS) - 1
_MACHINE_HIGH_MASK = (1 << _MACHINE_HIGH_BITS) - 1
_MACHINE_HIGH_SHIFT = _SEQUENCE_BITS
_MACHINE_LOW_SHIFT = _MACHINE_HIGH_SHIFT + _MACHINE_HIGH_BITS
_TIMESTAMP_SHIFT = _MACHINE_LOW_SHIFT + _MACHINE_LOW_BITS


class SnowflakeParts(NamedTuple):
    """The fields of an id, with the timestamp back in Unix milliseconds."""

    timestamp_ms: int
    machine_id: int
    sequence: int


def _wall_clock_ms() -> int:
    # Wall time, not a monotonic clock: ids embed a real date that other machines
    # must agree on.  The generator copes with this clock stepping backwards.
    return time.time_ns() // 1_000_000


def _check_timestamp(timestamp_ms: int) -> int:
    offset = timestamp_ms - EPOCH_MS
    if not 0 <= offset <= _MAX_OFFSET_MS:
        raise ValueError(
            f"timestamp_ms must be within {EPOCH_MS}..{EPOCH_MS + _MAX_OFFSET_MS} "
            f"(got {timestamp_ms})"
        )
    return offset


def _machine_bits(machine_id: int) -> int:
    """The machine id's bits in place: its low 10 bits above its high 3 (see above)."""
    if not 0 <= machine_id <= MAX_MACHINE_ID:
        raise ValueError(f"machine_id must be within 0..{MAX_MACHINE_ID} (got {machine_id})")
    low, high = machine_id & _MACHINE_LOW_MASK, machine_id >> _MACHINE_LOW_BITS
    return (low << _MACHINE_LOW_SHIFT) | (high << _MACHINE_HIGH_SHIFT)


def compose(timestamp_ms: int, machine_id: int, sequence: int) -> int:
    """Build the id for the given parts.

    Besides being the inverse of :func:`parse`, this gives storage the bounds of a
    time range: ``compose(t, 0, 0)`` is the smallest id any machine can mint at ``t``.
    """
    offset = _check_timestamp(timestamp_ms)
    machine = _machine_bits(machine_id)
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence must be within 0..{MAX_SEQUENCE} (got {sequence})")
    return (offset << _TIMESTAMP_SHIFT) | machine | sequence


def parse(snowflake: int) -> SnowflakeParts:
    """Split an id into its parts (for logs, debugging and time-range queries)."""
    if not 0 <= snowflake < 1 << (_TIMESTAMP_SHIFT + _TIMESTAMP_BITS):
        raise ValueError(f"not a snowflake id: {snowflake}")
    return SnowflakeParts(
        timestamp_ms=(snowflake >> _TIMESTAMP_SHIFT) + EPOCH_MS,
        machine_id=((snowflake >> _MACHINE_LOW_SHIFT) & _MACHINE_LOW_MASK)
        | ((snowflake >> _MACHINE_HIGH_SHIFT) & _MACHINE_HIGH_MASK) << _MACHINE_LOW_BITS,
        sequence=snowflake & MAX_SEQUENCE,
    )


class SnowflakeGenerator:
    """Mints ids for one machine id, strictly increasing for the generator's life.

    The generator keeps a *logical* timestamp that never goes backwards: if the clock
    steps back it keeps using the last timestamp; if the 512 sequence numbers of a
    millisecond run out it moves the logical timestamp one millisecond ahead instead of
    sleeping (this is pure code and must never block the event loop).  The price is
    that ids can run ahead of the wall clock, after a backwards clock step by up to
    the size of the step, and under bursts above 512,000 ids/s by the length of the burst
    beyond that rate; the gap closes once the clock catches up.  Consumers must
    therefore read the embedded timestamp as approximate.

    Not thread-safe: each Trio run is single-threaded, and ``next_id`` never awaits,
    so tasks cannot interleave inside it.
    """

    __slots__ = ("_clock_ms", "_last_ms", "_machine_bits", "_machine_id", "_sequence")

    def __init__(self, machine_id: int, clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self._machine_bits = _machine_bits(machine_id)
        self._machine_id = machine_id
        self._clock_ms = clock_ms
        self._last_ms = -1
        self._sequence = 0

    @property
    def machine_id(self) -> int:
        return self._machine_id

    def next_id(self) -> int:
        now = self._clock_ms()
        if now > self._last_ms:
            last_ms, sequence = now, 0
        elif self._sequence < MAX_SEQUENCE:
            last_ms, sequence = self._last_ms, self._sequence + 1
        else:
            last_ms, sequence = self._last_ms + 1, 0
        # Validate before committing, so one absurd clock reading (say, a far-future
        # timestamp) raises once instead of wedging the generator for good.
        offset = _check_timestamp(last_ms)
        self._last_ms, self._sequence = last_ms, sequence
        # Inlined compose(): this is on the hot path and only the timestamp can be bad.
        return (offset << _TIMESTAMP_SHIFT) | self._machine_bits | sequence
