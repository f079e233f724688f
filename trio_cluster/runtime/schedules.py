"""One schedule driven here: the loop its singleton runs, deciding (pure) then doing the I/O.

Each turn reads the wall clock, asks :func:`~trio_cluster.core.timetable.decide`
what to do, and does it: sleep until the next instant falls due (waking
at least every :data:`MAX_SLEEP` seconds, so a step of the wall clock is
noticed), or fire one instant. Exactly once per instant rests on storage,
fenced by the singleton's lease:

- a :class:`~trio_cluster.schedule.Tell` is stored under a primary key made
  of the schedule's name and the instant, and only then is the instant
  recorded as fired: a holder that dies between the two leaves an instant
  its successor fires again, and storage deduplicates that second request;
- a function is run only after its instant is recorded: at most once.

Where a schedule stands (the last settled instant) lives in storage, so it
survives restarts and handoffs; what the missed-run policy passed over is
kept in memory only (deciding again after a restart skips the same instants).
A failure to tell or to record raises out of the loop: the singleton logs
it and runs the loop again after a backoff, which decides again from storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import timedelta

import attrs
import trio

from ..core.reserved import SCHEDULE_PREFIX, singleton_shard
from ..core.timetable import decide, from_ms
from ..errors import ClusterError
from ..schedule import Firing, Schedule, Tell
from ..singleton import Singleton, SingletonContext
from ..storage.base import Lease, ScheduleStorage
from .hooks import Hooks

log = logging.getLogger("trio_cluster.schedule")

MAX_SLEEP = 60.0
"""Longest sleep between two looks at the wall clock."""
HANDOFF_GRACE = 5.0
"""How long a firing under way may finish when the schedule is handed off."""
INSTANT_HEADER = "schedule-instant"
_MS = timedelta(milliseconds=1)
NAME_HEADER = "schedule"


def wall_ms() -> int:
    """The wall clock, in Unix ms: instants are wall-clock moments."""
    return time.time_ns() // 1_000_000


wall_clock: ContextVar[Callable[[], int]] = ContextVar("wall_clock", default=wall_ms)
"""The clock the schedules of a runner opened from this context read: the wall clock,
or, in tests, one that follows Trio's (see :func:`trio_cluster.testing.wall_clock_from`)."""


@attrs.frozen
class ScheduleServices:
    """What a schedule runs with: where it stands, the hooks, the runner's machine id and
    the wall clock (a test gives one that follows Trio's clock)."""

    storage: ScheduleStorage
    hooks: Hooks
    machine_id: Callable[[], int]
    clock: Callable[[], int] = wall_ms


def schedule_singleton(schedule: Schedule, services: ScheduleServices) -> Singleton:
    """The singleton that drives ``schedule``, one holder at a time."""

    async def drive(ctx: SingletonContext) -> None:
        await _Driver(schedule, services, ctx).run()

    return Singleton(SCHEDULE_PREFIX + schedule.name, drive, grace=HANDOFF_GRACE)


class _Driver:
    def __init__(
        self, schedule: Schedule, services: ScheduleServices, ctx: SingletonContext
    ) -> None:
        self.schedule = schedule
        self.services = services
        self.ctx = ctx
        self.lease = Lease(singleton_shard(ctx.name), services.machine_id(), ctx.epoch)

    async def run(self) -> None:
        schedule, services, ctx = self.schedule, self.services, self.ctx
        storage, clock = services.storage, services.clock
        cursor = await storage.schedule_cursor(self.lease, schedule.name, clock())
        max_age = schedule.missed.max_age
        while not ctx.stopping:
            now = clock()
            decision = decide(
                schedule.timetable,
                cursor=cursor,
                now=now,
                jitter=schedule.jitter_of,
                max_age=None if max_age is None else max_age // _MS,
                max_jitter=schedule.max_jitter_ms,
            )
            cursor = decision.cursor
            if decision.skipped:
                log.info("schedule %s skipped missed instants", schedule.name)
                services.hooks.schedule_skipped(schedule.name)
            if decision.fire is None:
                wake = MAX_SLEEP if decision.wake_at is None else (decision.wake_at - now) / 1000
                await _sleep_unless_stopping(ctx, min(wake, MAX_SLEEP))
            else:
                await self._fire(decision.fire, now)

    async def _fire(self, instant: int, now: int) -> None:
        schedule, hooks = self.schedule, self.services.hooks
        late = max(0, now - instant - schedule.jitter_of(instant)) / 1000
        target = schedule.target
        if isinstance(target, Tell):
            try:
                await self.ctx.client.tell(
                    target.rpc,
                    target.entity_id,
                    target.payload,
                    headers={
                        NAME_HEADER: schedule.name,
                        INSTANT_HEADER: from_ms(instant, schedule.zone).isoformat(),
                    },
                    primary_key=f"{SCHEDULE_PREFIX}{schedule.name}@{instant}",
                )
            except ClusterError as error:
                hooks.schedule_failed(schedule.name, error)
                raise
            if await self._record(instant):
                hooks.schedule_fired(schedule.name, instant, late)
            return
        if not await self._record(instant):
            return
        hooks.schedule_fired(schedule.name, instant, late)
        firing = Firing(
            schedule.name, from_ms(instant, schedule.zone), self.ctx.client, self.ctx.epoch
        )
        try:
            await target(firing)
        except Exception as error:
            log.exception("scheduled function %s raised at %s", schedule.name, firing.instant)
            hooks.schedule_failed(schedule.name, error)

    async def _record(self, instant: int) -> bool:
        return await self.services.storage.advance_schedule(self.lease, self.schedule.name, instant)


async def _sleep_unless_stopping(ctx: SingletonContext, seconds: float) -> None:
    with trio.move_on_after(max(seconds, 0.0)):
        await ctx.wait_stopping()
