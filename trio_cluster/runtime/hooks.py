"""How the runtime calls its instruments: one attribute per event, built once.

Each event is an attribute holding the one callable to call: a no-op when
no instrument overrides the event, the instrument's bound method when one
does, a fan-out when several do. Reporting an event is one attribute read
and one call, and an event nobody listens to costs no more than that.

Instruments given by the user are guarded: one that raises is logged and
removed from every event (Trio does the same with its instruments), so that
observability can never fail a message. The runner's own counters are
trusted and called directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..instrument import EVENTS, Instrument

log = logging.getLogger("trio_cluster.instrument")


def _ignore(*_args: object) -> None:
    pass


class Hooks:
    """The runner's instruments, as one callable per event (see :class:`Instrument`)."""

    # The events are attributes named as Instrument's methods, so that call
    # sites read ``hooks.request_sent(call)``; they are set in _rebuild().
    runner_opened: Callable[..., None]
    request_sent: Callable[..., None]
    request_finished: Callable[..., None]
    handling_started: Callable[..., None]
    handling_finished: Callable[..., None]
    defect: Callable[..., None]
    request_refused: Callable[..., None]
    storage_written: Callable[..., None]
    timer_changed: Callable[..., None]
    deferred_completed: Callable[..., None]
    entity_activated: Callable[..., None]
    entity_passivated: Callable[..., None]
    shard_acquired: Callable[..., None]
    shard_stopped: Callable[..., None]
    runner_joined: Callable[..., None]
    runner_left: Callable[..., None]
    singleton_started: Callable[..., None]
    singleton_stopped: Callable[..., None]
    singleton_failed: Callable[..., None]
    schedule_fired: Callable[..., None]
    schedule_skipped: Callable[..., None]
    schedule_failed: Callable[..., None]
    contained_failure: Callable[..., None]

    def __init__(
        self, instruments: Sequence[Instrument] = (), *, trusted: Sequence[Instrument] = ()
    ) -> None:
        for instrument in (*instruments, *trusted):
            if not isinstance(instrument, Instrument):
                raise TypeError(f"instruments must be Instrument instances (got {instrument!r})")
        self._trusted = tuple(trusted)
        self._guarded = list(instruments)
        self._rebuild()

    @property
    def instruments(self) -> tuple[Instrument, ...]:
        """The user's instruments still installed (those that raised are gone)."""
        return tuple(self._guarded)

    def _rebuild(self) -> None:
        for event in EVENTS:
            calls = [getattr(i, event) for i in self._trusted if _overrides(i, event)]
            calls += [self._guard(i, event) for i in self._guarded if _overrides(i, event)]
            setattr(self, event, _combined(calls))

    def _guard(self, instrument: Instrument, event: str) -> Callable[..., None]:
        method = getattr(instrument, event)

        def guarded(*args: Any) -> None:
            try:
                method(*args)
            except Exception:
                log.exception("instrument %r failed in %s: removing it", instrument, event)
                self._remove(instrument)

        return guarded

    def _remove(self, instrument: Instrument) -> None:
        if instrument in self._guarded:
            self._guarded.remove(instrument)
            self._rebuild()


def _overrides(instrument: Instrument, event: str) -> bool:
    return getattr(type(instrument), event) is not getattr(Instrument, event)


def _combined(calls: list[Callable[..., None]]) -> Callable[..., None]:
    if not calls:
        return _ignore
    if len(calls) == 1:
        return calls[0]
    every = tuple(calls)

    def fan_out(*args: Any) -> None:
        for call in every:
            call(*args)

    return fan_out
