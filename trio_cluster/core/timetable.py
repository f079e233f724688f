"""When a schedule's instants fall, and what is due at a given moment: pure, no I/O, no clock.

Time is Unix milliseconds (``int``) throughout: instants are compared,
hashed and stored as such, so every runner computes the same ones. A
timetable answers two questions, the first instant strictly after a
moment and the last one at or before it; :func:`decide` turns those, the
last settled instant and the present moment into one decision (fire this
instant now, or wake up then), which the driver carries out. Cron
expressions are read by cronsim, which follows Debian cron across DST
transitions: a job at a fixed local time runs once on the day the clocks
go back, and at the first minute after the gap on the day they go forward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

import attrs

if TYPE_CHECKING:
    from cronsim import CronSim

__all__ = ["CronTimetable", "Decision", "IntervalTimetable", "Timetable", "decide", "jitter_ms"]

MS = 1000
MAX_MS = 253402300799 * MS
_LOOKS = 4
"""Matches a DST transition can put on the wrong side of a moment: a few, never more."""
"""The last second of the year 9999: no instant lies beyond it."""


class Timetable(Protocol):
    def after(self, moment: int) -> int | None:
        """The first instant strictly after ``moment``, or None when there is none."""
        ...

    def at_or_before(self, moment: int) -> int | None:
        """The last instant at or before ``moment``, or None when there is none."""
        ...


@attrs.frozen
class IntervalTimetable:
    """Every ``every_ms`` milliseconds, counted from the Unix epoch (so every runner,
    and every restart, agrees on the instants without storing an origin)."""

    every_ms: int

    def after(self, moment: int) -> int | None:
        instant = (moment // self.every_ms + 1) * self.every_ms
        return instant if instant <= MAX_MS else None

    def at_or_before(self, moment: int) -> int | None:
        instant = moment // self.every_ms * self.every_ms
        return instant if instant >= 0 else None


class CronTimetable:
    """A cron expression (5 fields, or 6 with seconds first) read in a time zone."""

    __slots__ = ("expression", "zone")

    def __init__(self, expression: str, zone: ZoneInfo) -> None:
        self.expression = expression
        self.zone = zone
        self._iterate(0, reverse=False)  # a bad expression raises here, not at the first tick

    def _iterate(self, moment: int, *, reverse: bool) -> CronSim:
        from cronsim import CronSim  # noqa: PLC0415 - the cron extra, only when a cron is used

        return CronSim(self.expression, datetime.fromtimestamp(moment / MS, self.zone), reverse)

    def after(self, moment: int) -> int | None:
        # cronsim drops the fraction of a second, then looks strictly after: right,
        # since every cron instant is a whole second. But a job at a fixed local time
        # is matched on the naive local time (Debian's rule), so from the second copy
        # of a repeated hour it may name the first copy's instant, already past.
        iterator = self._iterate(max(moment, 0), reverse=False)
        for _ in range(_LOOKS):
            instant = self._next(iterator)
            if instant is None or instant > moment:
                return instant
        return None

    def at_or_before(self, moment: int) -> int | None:
        if moment < 0:
            return None
        # Strictly before the next whole second: at or before ``moment``; then step
        # forward past what a naive match in a repeated hour stepped back over.
        iterator = self._iterate((moment // MS + 1) * MS, reverse=True)
        found = self._next(iterator)
        for _ in range(_LOOKS):
            if found is None or found <= moment:
                break
            found = self._next(iterator)
        if found is None:
            return None
        for _ in range(_LOOKS):
            later = self.after(found)
            if later is None or later > moment:
                return found
            found = later
        return found

    @staticmethod
    def _next(iterator: CronSim) -> int | None:
        try:
            found = next(iterator)
        except (StopIteration, ValueError, OverflowError):  # past the years cronsim reaches
            return None
        instant = int(found.timestamp()) * MS
        return instant if 0 <= instant <= MAX_MS else None

    def __repr__(self) -> str:
        return f"CronTimetable({self.expression!r}, {self.zone.key!r})"


def jitter_ms(name: str, instant: int, bound: int) -> int:
    """The delay, in ``[0, bound]`` ms, of the schedule ``name``'s firing of ``instant``.

    A hash, not a random draw: every runner, before and after a restart or
    a handoff, computes the same delay, so a new holder neither fires
    early nor waits for a different moment than the old one would have.
    """
    if bound <= 0:
        return 0
    digest = hashlib.blake2b(f"{name}@{instant}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (bound + 1)


@attrs.frozen
class Decision:
    """What to do now: fire ``fire``, or else sleep until ``wake_at`` (None: no instant is
    left, ever). ``cursor`` is the new in-memory last settled moment: every instant at
    or before it is fired or skipped. ``skipped``: missed instants were passed over."""

    cursor: int
    fire: int | None = None
    wake_at: int | None = None
    skipped: bool = False


def decide(
    timetable: Timetable,
    *,
    cursor: int,
    now: int,
    jitter: Callable[[int], int],
    max_age: int | None,
    max_jitter: int,
) -> Decision:
    """The next step of a schedule whose instants up to ``cursor`` are settled.

    Instant ``d`` is due at ``d + jitter(d)`` and fired in instant order. Its
    lateness is how long ago it fell due. The missed-run policy: with
    ``max_age`` (ms), every due instant is fired unless it is later than
    ``max_age``, then it is skipped; with ``max_age=None``, when several
    instants are due at once only the latest is fired, once. Work is bounded
    whatever the gap since ``cursor``: only instants within ``max_jitter``
    (plus ``max_age``) of ``now`` are looked at one by one.
    """
    first = timetable.after(cursor)
    if first is None:
        return Decision(cursor)
    if first + jitter(first) > now:
        return Decision(cursor, wake_at=first + jitter(first))
    if max_age is None:
        return _latest(timetable, first, now, jitter)
    if now - (first + jitter(first)) <= max_age:
        return Decision(first, fire=first)
    return _skip_old(
        timetable, cursor=cursor, now=now, jitter=jitter, max_age=max_age, max_jitter=max_jitter
    )


def _latest(timetable: Timetable, first: int, now: int, jitter: Callable[[int], int]) -> Decision:
    """Fire the latest due instant (``first`` is due, so one is), skipping those before it."""
    latest = timetable.at_or_before(now)
    # Walk back over the few instants whose jitter has not elapsed yet.
    while latest is not None and latest > first and latest + jitter(latest) > now:
        latest = timetable.at_or_before(latest - 1)
    if latest is None or latest <= first:
        return Decision(first, fire=first)
    return Decision(latest, fire=latest, skipped=True)


def _skip_old(
    timetable: Timetable,
    *,
    cursor: int,
    now: int,
    jitter: Callable[[int], int],
    max_age: int,
    max_jitter: int,
) -> Decision:
    """Skip the instants late by more than ``max_age``: fire the first one that is not, or
    wait for the first one not due yet."""
    # Only an instant at or after now - max_age - max_jitter can be late by max_age or less.
    candidate = timetable.after(max(cursor, now - max_age - max_jitter - 1))
    while candidate is not None:
        due = candidate + jitter(candidate)
        if due > now:
            return Decision(candidate - 1, wake_at=due, skipped=True)
        if now - due <= max_age:
            return Decision(candidate, fire=candidate, skipped=True)
        candidate = timetable.after(candidate)
    return Decision(now, skipped=True)


def to_ms(moment: datetime) -> int:
    """A timezone-aware datetime as Unix milliseconds."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def from_ms(moment: int, zone: ZoneInfo | None = None) -> datetime:
    """Unix milliseconds as an aware datetime, in ``zone`` (UTC by default)."""
    utc = EPOCH + timedelta(milliseconds=moment)
    return utc if zone is None else utc.astimezone(zone)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
