"""Snowflake ids: 64-bit, roughly time-ordered, unique without coordination.

Layout, most significant first (63 bits used, so ids are positive as a signed
``bigint`` in PostgreSQL)::

    41 bits  milliseconds since EPOCH_MS (2025-01-01T00:00:00Z; lasts until 2094)
    10 bits  machine id (0..1023), unique per live runner
    12 bits  sequence within one millisecond (0..4095)

Ordering ids orders them by creation time across machines (to the millisecond, give
or take clock skew), which is what storage range queries rely on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "EPOCH_MS",
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
_MACHINE_BITS = 10
_SEQUENCE_BITS = 12

MAX_MACHINE_ID = (1 << _MACHINE_BITS) - 1
MAX_SEQUENCE = (1 << _SEQUENCE_BITS) - 1
_MAX_OFFSET_MS = (1 << _TIMESTAMP_BITS) - 1
_MACHINE_SHIFT = _SEQUENCE_BITS
_TIMESTAMP_SHIFT = _SEQUENCE_BITS + _MACHINE_BITS


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


def _check_machine_id(machine_id: int) -> None:
    if not 0 <= machine_id <= MAX_MACHINE_ID:
        raise ValueError(f"machine_id must be within 0..{MAX_MACHINE_ID} (got {machine_id})")


def compose(timestamp_ms: int, machine_id: int, sequence: int) -> int:
    """Build the id for the given parts.

    Besides being the inverse of :func:`parse`, this gives storage the bounds of a
    time range: ``compose(t, 0, 0)`` is the smallest id any machine can mint at ``t``.
    """
    offset = _check_timestamp(timestamp_ms)
    _check_machine_id(machine_id)
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence must be within 0..{MAX_SEQUENCE} (got {sequence})")
    return (offset << _TIMESTAMP_SHIFT) | (machine_id << _MACHINE_SHIFT) | sequence


def parse(snowflake: int) -> SnowflakeParts:
    """Split an id into its parts (for logs, debugging and time-range queries)."""
    if not 0 <= snowflake < 1 << (_TIMESTAMP_SHIFT + _TIMESTAMP_BITS):
        raise ValueError(f"not a snowflake id: {snowflake}")
    return SnowflakeParts(
        timestamp_ms=(snowflake >> _TIMESTAMP_SHIFT) + EPOCH_MS,
        machine_id=(snowflake >> _MACHINE_SHIFT) & MAX_MACHINE_ID,
        sequence=snowflake & MAX_SEQUENCE,
    )


class SnowflakeGenerator:
    """Mints ids for one machine id, strictly increasing for the generator's life.

    The generator keeps a *logical* timestamp that never goes backwards: if the clock
    steps back it keeps using the last timestamp; if the 4096 sequence numbers of a
    millisecond run out it moves the logical timestamp one millisecond ahead instead of
    sleeping (this is pure code and must never block the event loop).  The price is
    that ids can run ahead of the wall clock, after a backwards clock step by up to
    the size of the step, and under bursts above ~4M ids/s by the length of the burst
    beyond that rate; the gap closes once the clock catches up.  Consumers must
    therefore read the embedded timestamp as approximate.

    Not thread-safe: each Trio run is single-threaded, and ``next_id`` never awaits,
    so tasks cannot interleave inside it.
    """

    __slots__ = ("_clock_ms", "_last_ms", "_machine_bits", "_sequence")

    def __init__(self, machine_id: int, clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        _check_machine_id(machine_id)
        self._machine_bits = machine_id << _MACHINE_SHIFT
        self._clock_ms = clock_ms
        self._last_ms = -1
        self._sequence = 0

    @property
    def machine_id(self) -> int:
        return self._machine_bits >> _MACHINE_SHIFT

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
