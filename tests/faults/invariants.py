"""The invariants of a schedule, as pure functions of what was observed from outside.

Inputs are plain records: handler runs (from the runs table), stored
requests and replies (from ``{prefix}messages``), what the client printed
(acknowledgements and answers), and the interruptions the harness caused
(with wall-clock times; the server and the harness share this machine's
clock, so server timestamps and harness timestamps compare directly).
Nothing here touches a process or a database, so each rule is unit-tested
on made-up records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .common import RUNNER_GIVES_UP_S, Outcome

FENCING_WINDOW_S = RUNNER_GIVES_UP_S + 1.5
"""How long after a lease-ending interruption an old run may still be going.

The runner's own bound on noticing a lost lease (``heartbeat_interval +
liveness_timeout``, 1.5 s here), plus 1.5 s for a loaded 2-core machine to
schedule a process that was just resumed: the documented fencing window
("when the paused one runs again its handlers can take a few more steps",
``docs/operations.md``).
"""

LEASE_ENDING = frozenset({"stop", "lockcut", "pgrestart"})
"""Interruptions after which a runner's leases are gone while it may still run code."""
DEATHS = frozenset({"kill", "term", "crash"})
"""Interruptions after which a process runs nothing (``term``: from its exit on)."""

LOST = "lost"
OUTCOME = "outcome"
OVERLAP = "overlap"
ANSWERS = "answers"
EXIT = "exit"
UNPROCESSED = "unprocessed"
INVARIANTS = (LOST, OUTCOME, OVERLAP, ANSWERS, EXIT, UNPROCESSED)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.detail}"


@dataclass(frozen=True)
class Run:
    """One handler run; ``exit`` is None when it never finished (it was cut short)."""

    run: str
    entity_id: str
    key: str
    pid: int
    entry: float
    exit: float | None


@dataclass(frozen=True)
class Interruption:
    """Something the schedule did to one process, from ``start`` to ``end`` (wall clock).

    ``stop``: SIGSTOP to SIGCONT; ``lockcut``: the lock backend's
    termination (start = end); ``pgrestart``: PostgreSQL stop issued to
    start completed; ``kill``: SIGKILL sent; ``term``: SIGTERM sent to the
    process's exit; ``crash``: an exit nobody asked for.
    """

    pid: int
    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Stored:
    """A persisted request as ``{prefix}messages`` has it; ``outcome`` decodes its reply."""

    key: str
    entity_id: str
    processed: bool
    outcome: Outcome | None
    error: str | None
    """The stored reply when it is not a success (an error reply, or undecodable)."""


@dataclass(frozen=True)
class Answer:
    """What the client was told for a key: ``ack`` (first answer) or ``again`` (a duplicate)."""

    key: str
    entity_id: str
    pid: int
    run: str
    source: str


def pair_runs(rows: Iterable[tuple[str, str, str, str, int, float]]) -> tuple[list[Run], list[str]]:
    """Runs from ``(run, phase, entity_id, key, pid, at)`` rows, and any inconsistent rows."""
    entries: dict[str, tuple[str, str, int, float]] = {}
    exits: dict[str, float] = {}
    problems: list[str] = []
    for run, phase, entity_id, key, pid, at in rows:
        if phase == "entry":
            entries[run] = (entity_id, key, int(pid), float(at))
        elif phase == "exit":
            exits[run] = float(at)
        else:
            problems.append(f"run {run}: unknown phase {phase!r}")
    problems.extend(
        f"run {run}: an exit row without an entry row" for run in exits.keys() - entries.keys()
    )
    runs = [
        Run(run, entity_id, key, pid, entry, exits.get(run))
        for run, (entity_id, key, pid, entry) in entries.items()
    ]
    runs.sort(key=lambda r: (r.entry, r.run))
    return runs, problems


def check_acknowledged(
    acked: Mapping[str, str], stored: Mapping[str, Stored], runs: Sequence[Run]
) -> list[Violation]:
    """0 acknowledged persisted requests lost.

    Every acknowledged key (``acked``: key -> entity) has a stored request,
    marked ``processed``, with a success reply naming a run that completed
    (it has an exit row) for that key and entity.
    """
    by_id = {run.run: run for run in runs}
    violations = []
    for key, entity_id in sorted(acked.items()):
        row = stored.get(key)
        problem = None
        if row is None:
            problem = "was never stored"
        elif row.entity_id != entity_id:
            problem = f"was stored for entity {row.entity_id}, acknowledged for {entity_id}"
        elif not row.processed:
            problem = "is still unprocessed"
        elif row.outcome is None:
            problem = f"has no success reply stored ({row.error})"
        else:
            run = by_id.get(row.outcome.run)
            if run is None:
                problem = f"has a stored reply naming run {row.outcome.run}, which never started"
            elif run.exit is None:
                problem = f"has a stored reply naming run {run.run}, which never finished"
            elif (run.key, run.entity_id, run.pid) != (key, entity_id, row.outcome.pid):
                problem = f"has a stored reply {row.outcome} that does not match its run {run}"
        if problem is not None:
            violations.append(Violation(LOST, f"acknowledged {key} ({entity_id}) {problem}"))
    return violations


def check_outcomes(answers: Iterable[Answer], stored: Mapping[str, Stored]) -> list[Violation]:
    """One outcome per primary key: every answer given is the stored reply.

    The client answers a persisted ask with the run's ``(pid, run id)``;
    each answer (the first, and any duplicate ask of the same key) must be
    the run whose reply was stored.
    """
    violations = []
    for answer in answers:
        row = stored.get(answer.key)
        given = Outcome(answer.pid, answer.run)
        if row is None or row.outcome != given:
            violations.append(
                Violation(
                    OUTCOME,
                    f"{answer.source} of {answer.key} ({answer.entity_id}) was {given}, "
                    f"but the stored reply is {None if row is None else row.outcome}",
                )
            )
    return violations


def end_of(run: Run, interruptions: Sequence[Interruption]) -> float | None:
    """When ``run`` was over: its exit row, or for an unfinished run the first cut it met.

    An unfinished run ended, at the latest, when the first interruption of
    its process that could cut it short began (or at its entry, if that
    interruption was already under way): a death, or a lost lease. This is
    the earliest moment the run may have ended, so an overlap found with it
    certainly happened. None: no interruption explains why it never finished.
    """
    if run.exit is not None:
        return run.exit
    ends = [
        max(run.entry, cut.start)
        for cut in interruptions
        if cut.pid == run.pid
        and (cut.kind in DEATHS or cut.kind in LEASE_ENDING)
        and cut.end + FENCING_WINDOW_S >= run.entry
    ]
    return min(ends) if ends else None


def _excused(
    earlier: Run,
    end: float,
    later: Run,
    stored: Mapping[str, Stored],
    interruptions: Sequence[Interruption],
) -> Interruption | None:
    """The interruption that puts this overlap inside the fencing window, if any."""
    row = stored.get(earlier.key)
    if row is not None and row.outcome is not None and row.outcome.run == earlier.run:
        return None  # the earlier run's reply was stored: it was never fenced off
    for cut in interruptions:
        if (
            cut.pid == earlier.pid
            and cut.kind in LEASE_ENDING
            and cut.start <= later.entry
            and end <= cut.end + FENCING_WINDOW_S
        ):
            return cut
    return None


def check_overlaps(
    runs: Sequence[Run],
    stored: Mapping[str, Stored],
    interruptions: Sequence[Interruption],
    origin: float = 0.0,
) -> tuple[list[Violation], list[str]]:
    """No overlapping runs of one entity beyond the documented fencing window.

    The rule. Each run has an entry time (its entry row) and an end (its
    exit row; for an unfinished run, see :func:`end_of`). Two runs A and B
    of one entity, A entered first, overlap when B entered before A's end.
    An overlap is allowed only when both hold:

    1. A's reply is not the stored reply of A's key: A was fenced off (or
       never replied), so storage recorded nothing of it;
    2. A's process had its leases taken away around that time: it was
       SIGSTOPped, its lock connection was terminated, or PostgreSQL was
       restarted, beginning no later than B's entry, and A ended no later
       than ``FENCING_WINDOW_S`` after that interruption ended (SIGCONT,
       the termination, PostgreSQL back up).

    Any other overlap is a violation, as is an unfinished run that no
    interruption of its process explains (a handler that silently never
    completed). Returns the violations and a description of each allowed
    overlap; times in them are shown relative to ``origin``.
    """
    by_entity: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_entity[run.entity_id].append(run)

    def at(moment: float) -> str:
        return f"{moment - origin:.3f}s"

    def shown(run: Run, until: float | None = None) -> str:
        span = f"{at(run.entry)}..{'?' if until is None else at(until)}"
        return f"run {run.run} of {run.key} on pid {run.pid} ({span})"

    violations = []
    allowed: list[str] = []
    for entity_id, entity_runs in sorted(by_entity.items()):
        active: list[tuple[float, Run]] = []
        for run in sorted(entity_runs, key=lambda r: (r.entry, r.run)):
            end = end_of(run, interruptions)
            if end is None:
                violations.append(
                    Violation(
                        OVERLAP,
                        f"{entity_id}: {shown(run)} never finished, "
                        "and nothing interrupted its process",
                    )
                )
                end = float("inf")
            active = [(until, other) for until, other in active if until > run.entry]
            for until, other in active:
                cut = _excused(other, until, run, stored, interruptions)
                if cut is not None:
                    allowed.append(
                        f"{entity_id}: {shown(run, end)} entered during fenced "
                        f"{shown(other, until)} after its {cut.kind} "
                        f"{at(cut.start)}..{at(cut.end)}"
                    )
                    continue
                violations.append(
                    Violation(
                        OVERLAP,
                        f"{entity_id}: {shown(run, end)} entered while {shown(other, until)} "
                        "still ran, and no fencing explains it",
                    )
                )
            active.append((end, run))
    return violations, allowed


def runs_after_reply(runs: Sequence[Run], replied_at: Mapping[str, float]) -> int:
    """Runs that entered after their key's reply was stored (a figure, not an invariant)."""
    return sum(
        1 for run in runs if run.key in replied_at and run.entry > replied_at[run.key] + 0.001
    )
