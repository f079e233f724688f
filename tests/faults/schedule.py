"""Fault schedules: a pure function of a seed.

A schedule is a list of faults, each with a kind, a target, a start time
(seconds after the traffic starts) and a duration, drawn from
``random.Random(seed)`` alone, so a seed printed by a failed run replays
the same schedule. Nothing here touches a process or a clock.

The kinds, on three runner processes (``r0``..``r2``) and the client
process (``client``):

- ``kill``: SIGKILL, kept down for ``duration``, then restarted;
- ``stop``: SIGSTOP for ``duration``, always past the server's
  idle-session timeout plus a margin (so the lease is really lost), then
  SIGCONT;
- ``lockcut``: the target's lock connection is terminated on the server
  (``pg_terminate_backend``); instantaneous;
- ``pgrestart``: PostgreSQL stopped, kept down for ``duration``, started
  with the same data; no target;
- ``cut``: every runner-to-runner TCP connection of the target is killed
  (``ss -K``), again and again for ``duration``;
- ``term``: SIGTERM (a graceful stop), kept down for ``duration``, then
  restarted.

Faults may overlap a little, but never two on one target, never two
PostgreSQL restarts, and never two heavy faults (kill, stop, term) on
runners at once: at least two runners stay able to serve most of the time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .common import SERVER_FREES_S

KILL = "kill"
STOP = "stop"
LOCKCUT = "lockcut"
PGRESTART = "pgrestart"
CUT = "cut"
TERM = "term"
KINDS = (KILL, STOP, LOCKCUT, PGRESTART, CUT, TERM)
HEAVY = frozenset({KILL, STOP, TERM})
"""Kinds that take their target out of service for seconds."""

RUNNERS = ("r0", "r1", "r2")
CLIENT = "client"
TARGETS = (*RUNNERS, CLIENT)

DEFAULT_LENGTH_S = 16.0
"""Seconds of traffic during which faults start."""
FIRST_FAULT_S = (1.0, 2.0)
"""Traffic flows for a moment before the first fault."""
LAST_START_MARGIN_S = 1.0
"""No fault starts in the last second of the schedule."""
STOP_MARGIN_S = (1.0, 2.5)
"""How far past the server's idle-session timeout a SIGSTOP lasts."""
DOWN_S = {KILL: (0.2, 2.0), TERM: (0.2, 2.0), PGRESTART: (0.3, 2.0), CUT: (0.3, 1.5)}
RESTART_ALLOWANCE_S = 2.0
"""A restarted process counts as down for about this long after its restart."""
SETTLE_S = 1.0
"""After a fault ends, how long its target counts as recovering."""
CLIENT_SHARE = 0.2
"""The share of targeted faults aimed at the client process."""
OVERLAP_PROBABILITY = 0.3
"""How often the next fault starts while the previous one is still in effect."""


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str | None
    """A slot of ``TARGETS``; None for a PostgreSQL restart."""
    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def busy_until(self) -> float:
        """Until when the target counts as out of service, recovery included."""
        if self.kind in (KILL, TERM):
            return self.end + RESTART_ALLOWANCE_S
        if self.kind == CUT:
            return self.end
        return self.end + SETTLE_S

    def describe(self) -> str:
        target = "" if self.target is None else f" {self.target}"
        duration = "" if self.kind == LOCKCUT else f" for {self.duration:.2f}s"
        return f"{self.kind}{target} @{self.start:.2f}s{duration}"


@dataclass(frozen=True)
class Schedule:
    seed: int
    length: float
    faults: tuple[Fault, ...]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(fault.kind for fault in self.faults)

    @property
    def end(self) -> float:
        """When the last fault's effect is over (at least ``length``)."""
        return max([self.length, *(fault.end for fault in self.faults)])

    def describe(self) -> str:
        return "; ".join(fault.describe() for fault in self.faults)


def _duration(rng: random.Random, kind: str) -> float:
    if kind == STOP:
        return round(SERVER_FREES_S + rng.uniform(*STOP_MARGIN_S), 2)
    if kind == LOCKCUT:
        return 0.0
    low, high = DOWN_S[kind]
    return round(rng.uniform(low, high), 2)


def _target(rng: random.Random, kind: str) -> str | None:
    if kind == PGRESTART:
        return None
    if rng.random() < CLIENT_SHARE:
        return CLIENT
    return rng.choice(RUNNERS)


def generate(seed: int, length: float = DEFAULT_LENGTH_S) -> Schedule:
    """The schedule of ``seed``: the same seed, the same faults, on any machine."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    target_free = dict.fromkeys(TARGETS, 0.0)
    runners_heavy_free = 0.0
    pg_free = 0.0
    cursor = rng.uniform(*FIRST_FAULT_S)
    while True:
        kind = rng.choice(KINDS)
        target = _target(rng, kind)
        duration = _duration(rng, kind)
        start = cursor
        if target is not None:
            start = max(start, target_free[target])
        if kind in HEAVY and target in RUNNERS:
            start = max(start, runners_heavy_free)
        if kind == PGRESTART:
            start = max(start, pg_free)
        if start >= length - LAST_START_MARGIN_S:
            break
        # Rounded up, so that a start pushed past a busy target stays past it.
        fault = Fault(kind, target, math.ceil(start * 100 - 1e-6) / 100, duration)
        faults.append(fault)
        if target is not None:
            target_free[target] = fault.busy_until
        if kind in HEAVY and target in RUNNERS:
            runners_heavy_free = fault.busy_until
        if kind == PGRESTART:
            pg_free = fault.busy_until
        if rng.random() < OVERLAP_PROBABILITY:
            cursor = fault.start + rng.uniform(0.1, max(0.2, fault.duration))
        else:
            cursor = fault.busy_until + rng.uniform(0.3, 1.5)
    faults.sort(key=lambda fault: fault.start)
    return Schedule(seed, length, tuple(faults))
