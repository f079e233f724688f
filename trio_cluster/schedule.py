"""Schedules: a named cron expression (or fixed interval) that fires an entity RPC or a function.

Declare one with :class:`Schedule` and give it to ``open_runner(...,
schedules=[...])`` on every runner that may fire it. Each schedule is
driven by a singleton of its own (see :mod:`trio_cluster.singleton`), so it
fires on one runner at a time, moves on a handoff and fails over when its
runner dies. Instants are computed from the expression alone, so every
runner agrees on them; the last settled instant is kept in storage, so a
new holder goes on where the old one stopped. What "exactly once" means
for each kind of target is said on :class:`Tell` and :data:`ScheduledFunction`.

Cron expressions need the ``cron`` extra (cronsim): ``pip install
'trio-cluster[cron]'``; fixed intervals need nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from .core.timetable import CronTimetable, IntervalTimetable, Timetable, from_ms, jitter_ms, to_ms
from .entity import Rpc, _check_name

if TYPE_CHECKING:
    from .runtime.client import Client

__all__ = ["Firing", "Missed", "Schedule", "ScheduledFunction", "Tell"]

P = TypeVar("P")

_MS = timedelta(milliseconds=1)


@attrs.frozen
class Missed:
    """The missed-run policy: what a schedule does with instants nobody fired in time.

    An instant is missed when no runner could fire it when it fell due (all
    were down, the holder was failing over, the previous firing ran long).
    Make one with :meth:`skip_older_than` or :meth:`run_latest`.
    """

    max_age: timedelta | None
    """Fire missed instants at most this late; None: only the latest, once."""

    @classmethod
    def skip_older_than(cls, age: timedelta) -> Missed:
        """Fire every missed instant, oldest first, unless it is late by more than ``age``:
        those are skipped. ``timedelta(0)`` skips every late instant."""
        if not isinstance(age, timedelta) or age < timedelta(0):
            raise ValueError(f"Missed.skip_older_than takes a timedelta >= 0 (got {age!r})")
        return cls(age)

    @classmethod
    def run_latest(cls) -> Missed:
        """Of the instants missed together, fire only the latest, once; skip the others."""
        return cls(None)


DEFAULT_MISSED = Missed.skip_older_than(timedelta(minutes=1))
"""Catch up on a failover's worth of instants; skip what an outage longer than that missed."""


@attrs.frozen
class Tell(Generic[P]):
    """A schedule's target: tell ``payload`` to the entity ``entity_id`` over a persisted ``rpc``.

    Exactly once per instant: the request is stored under a primary key made
    of the schedule's name and the instant, so a second firing of one
    instant (a holder that died after storing it and before recording the
    instant, a restart, an overlapping handoff) is deduplicated by storage,
    and the entity's handler then runs with the guarantees of any persisted
    request. The handler reads the instant from the request's headers
    (``ctx.request.headers["schedule-instant"]``, ISO 8601) and the schedule's
    name from ``"schedule"``.
    """

    rpc: Rpc[P, Any]
    entity_id: str
    payload: P

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.rpc, Rpc):
            raise TypeError(f"Tell takes an Rpc (got {self.rpc!r})")
        if not self.rpc.persisted:
            raise ValueError(
                f"{self.rpc!r} is volatile: a schedule fires only persisted RPCs, whose "
                "storage deduplicates a second firing of one instant"
            )


@attrs.frozen
class Firing:
    """What a scheduled function is given: which instant it fires, and a client."""

    name: str
    instant: datetime
    """The scheduled instant (in the schedule's time zone), not the moment it runs."""
    client: Client
    """The runner's client: ``ask`` and ``tell`` to any entity."""
    epoch: int
    """The fencing epoch of the schedule's singleton lease on this runner."""


ScheduledFunction = Callable[[Firing], Awaitable[None]]
"""A schedule's other target: ``await function(firing)`` on the holder.

The instant is recorded in storage (fenced by the lease) before the
function starts, and recorded once: so the function runs at most once per
instant. A holder dying or losing its lease mid-run cancels that run and
it is not run again (the record says the instant was fired); an exception
is logged and counted, and the schedule goes on with the next instant.
For an effect that must happen exactly once, tell a persisted RPC instead.
"""


def _valid_name(_instance: object, _attribute: object, value: str) -> None:
    _check_name("schedule", value)


@attrs.frozen
class Schedule:
    """A named schedule: ``cron`` (read in ``tz``) or ``every``, firing ``target``.

    ``cron`` is a 5-field expression (``"0 * * * *"``), or 6 fields with
    seconds first; ``every`` is a whole number of milliseconds, its instants
    counted from the Unix epoch. ``missed`` is the missed-run policy
    (:class:`Missed`). ``jitter`` delays each firing by up to that much, by a
    hash of the name and the instant (so every runner agrees on it); firings
    stay in instant order. A bad expression, time zone or interval raises
    ValueError here, at declaration.
    """

    name: str = attrs.field(validator=_valid_name)
    target: Tell[Any] | ScheduledFunction
    cron: str | None = attrs.field(default=None, kw_only=True)
    tz: str = attrs.field(default="UTC", kw_only=True)
    every: timedelta | None = attrs.field(default=None, kw_only=True)
    missed: Missed = attrs.field(default=DEFAULT_MISSED, kw_only=True)
    jitter: timedelta = attrs.field(default=timedelta(0), kw_only=True)
    timetable: Timetable = attrs.field(init=False, repr=False, eq=False)
    zone: ZoneInfo = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.target, Tell) and not callable(self.target):
            raise TypeError(f"a schedule's target is a Tell or an async function ({self.target!r})")
        if not isinstance(self.missed, Missed):
            raise TypeError(f"missed must be a Missed policy (got {self.missed!r})")
        if not isinstance(self.jitter, timedelta) or self.jitter < timedelta(0):
            raise ValueError(f"schedule {self.name!r}: jitter must be a timedelta >= 0")
        zone = _zone(self.name, self.tz)
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give exactly one of cron and every")
        timetable: Timetable
        if self.cron is not None:
            timetable = _cron(self.name, self.cron, zone)
        else:
            assert self.every is not None
            timetable = _interval(self.name, self.every, self.jitter, self.tz)
        object.__setattr__(self, "timetable", timetable)
        object.__setattr__(self, "zone", zone)

    @property
    def max_jitter_ms(self) -> int:
        return self.jitter // _MS

    def jitter_of(self, instant: int) -> int:
        """The delay in ms of this schedule's firing of ``instant`` (Unix ms)."""
        return jitter_ms(self.name, instant, self.max_jitter_ms)

    def next_fire_times(self, n: int, after: datetime | None = None) -> list[datetime]:
        """The next ``n`` moments this schedule fires (instant plus jitter) after ``after``
        (default: now), in its time zone. Fewer when the expression runs out."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0 (got {n!r})")
        if after is not None and (not isinstance(after, datetime) or after.tzinfo is None):
            raise TypeError(f"after must be a timezone-aware datetime (got {after!r})")
        moment = to_ms(after or datetime.now(self.zone))
        times: list[datetime] = []
        while len(times) < n:
            instant = self.timetable.after(moment)
            if instant is None:
                break
            times.append(from_ms(instant + self.jitter_of(instant), self.zone))
            moment = instant
        return times


def _zone(name: str, tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as error:
        raise ValueError(f"schedule {name!r}: unknown time zone {tz!r}") from error


def _cron(name: str, expression: str, zone: ZoneInfo) -> CronTimetable:
    try:
        from cronsim import CronSimError  # noqa: PLC0415 - the cron extra, only when used
    except ImportError as error:
        raise ImportError(
            "cron schedules need the cron extra: pip install 'trio-cluster[cron]'"
        ) from error
    if not isinstance(expression, str):
        raise TypeError(f"schedule {name!r}: cron must be a str (got {expression!r})")
    try:
        return CronTimetable(expression, zone)
    except CronSimError as error:
        raise ValueError(
            f"schedule {name!r}: bad cron expression {expression!r}: {error}"
        ) from error


def _interval(name: str, every: timedelta, jitter: timedelta, tz: str) -> IntervalTimetable:
    if not isinstance(every, timedelta) or every < _MS or every % _MS:
        raise ValueError(f"schedule {name!r}: every must be a whole number of ms >= 1 ms")
    if jitter >= every:
        raise ValueError(f"schedule {name!r}: jitter must be shorter than the interval")
    if tz != "UTC":
        raise ValueError(f"schedule {name!r}: a time zone applies to cron schedules only")
    return IntervalTimetable(every // _MS)
