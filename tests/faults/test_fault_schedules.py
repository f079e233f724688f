"""The fault schedules: their generator and invariants on made-up data, then the CI seeds.

The CI seeds are played against real runner processes and a PostgreSQL
server of the suite's own (``conftest.fault_pg``); together they cover
every fault kind on a runner and every targeted kind on the client, and
seed 28 overlaps a SIGSTOP with a PostgreSQL restart. A failure prints the
schedule, every violation, the stderr tail of every crashed process and
the command that replays it. More seeds: ``python -m tests.faults.soak``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.pgdriver.server import ThrowawayPostgres

from . import invariants as inv
from .common import SERVER_FREES_S, Outcome
from .harness import crash_signature, run_schedule
from .schedule import (
    CLIENT,
    HEAVY,
    KINDS,
    LAST_START_MARGIN_S,
    LOCKCUT,
    PGRESTART,
    RUNNERS,
    STOP,
    TARGETS,
    generate,
)

CI_SEEDS = (0, 1, 2, 3, 28)

# -- the generator ---------------------------------------------------------------------


def test_a_schedule_is_a_function_of_its_seed() -> None:
    assert generate(7) == generate(7)
    assert generate(7, 10.0) == generate(7, 10.0)
    assert len({generate(seed).faults for seed in range(20)}) == 20


@given(st.integers(min_value=0, max_value=2**32))
def test_schedules_follow_their_rules(seed: int) -> None:
    schedule = generate(seed)
    faults = schedule.faults
    assert faults, "every schedule faults something"
    assert [fault.start for fault in faults] == sorted(fault.start for fault in faults)
    for fault in faults:
        assert fault.kind in KINDS
        assert 0 < fault.start < schedule.length - LAST_START_MARGIN_S
        assert (fault.target is None) == (fault.kind == PGRESTART)
        assert fault.target is None or fault.target in TARGETS
        if fault.kind == STOP:
            # Past the server's idle-session timeout, with a margin: the lease is lost.
            assert fault.duration >= SERVER_FREES_S + 1.0
        if fault.kind == LOCKCUT:
            assert fault.duration == 0
    for a, b in itertools.combinations(faults, 2):
        first, second = sorted((a, b), key=lambda fault: fault.start)
        overlapping = second.start < first.busy_until - 1e-6  # starts are rounded
        if first.target is not None and first.target == second.target:
            assert not overlapping, (first, second)
        if first.kind == second.kind == PGRESTART:
            assert not overlapping, (first, second)
        heavy_on_runners = all(
            fault.kind in HEAVY and fault.target in RUNNERS for fault in (first, second)
        )
        if heavy_on_runners:
            assert not overlapping, (first, second)


def test_the_ci_seeds_cover_every_kind_on_runners_and_the_client() -> None:
    seen = {
        (fault.kind, "client" if fault.target == CLIENT else "other")
        for seed in CI_SEEDS
        for fault in generate(seed).faults
    }
    assert {kind for kind, where in seen if where == "other"} == set(KINDS)
    assert {kind for kind, where in seen if where == "client"} == set(KINDS) - {PGRESTART}


# -- the invariants on made-up records -----------------------------------------------------


def run(name: str, entry: float, exit: float | None, pid: int = 1, key: str = "") -> inv.Run:
    return inv.Run(name, "e1", key or f"k-{name}", pid, entry, exit)


def stored(key: str, outcome: Outcome | None, processed: bool = True) -> inv.Stored:
    return inv.Stored(key, "e1", processed, outcome, None if outcome else "no reply")


def test_runs_pair_entry_and_exit_rows_by_run_id() -> None:
    runs, problems = inv.pair_runs(
        [
            ("r1", "entry", "e1", "k1", 10, 1.0),
            ("r2", "entry", "e1", "k1", 11, 2.0),
            ("r1", "exit", "e1", "k1", 10, 1.5),
            ("r3", "exit", "e1", "k2", 11, 3.0),
        ]
    )
    assert runs == [
        inv.Run("r1", "e1", "k1", 10, 1.0, 1.5),
        inv.Run("r2", "e1", "k1", 11, 2.0, None),
    ]
    assert problems == ["run r3: an exit row without an entry row"]


def test_an_acknowledged_key_needs_a_processed_reply_from_a_completed_run() -> None:
    runs = [run("r1", 1.0, 1.1, pid=5, key="k1"), run("r2", 1.0, None, pid=5, key="k2")]
    good = {"k1": stored("k1", Outcome(5, "r1"))}
    assert inv.check_acknowledged({"k1": "e1"}, good, runs) == []
    cases = {
        "never stored": {},
        "still unprocessed": {"k1": stored("k1", None, processed=False)},
        "no success reply": {"k1": stored("k1", None)},
        "never started": {"k1": stored("k1", Outcome(5, "r9"))},
        "does not match": {"k1": stored("k1", Outcome(6, "r1"))},
    }
    for words, rows in cases.items():
        [violation] = inv.check_acknowledged({"k1": "e1"}, rows, runs)
        assert violation.invariant == inv.LOST and words in violation.detail, violation
    [unfinished] = inv.check_acknowledged(
        {"k2": "e1"}, {"k2": stored("k2", Outcome(5, "r2"))}, runs
    )
    assert "never finished" in unfinished.detail


def test_every_answer_must_be_the_stored_reply() -> None:
    rows = {"k1": stored("k1", Outcome(5, "r1"))}
    assert inv.check_outcomes([inv.Answer("k1", "e1", 5, "r1", "ack")], rows) == []
    [violation] = inv.check_outcomes(
        [inv.Answer("k1", "e1", 5, "r1", "ack"), inv.Answer("k1", "e1", 6, "r2", "again")], rows
    )
    assert violation.invariant == inv.OUTCOME and "again of k1" in violation.detail


def test_sequential_runs_do_not_overlap() -> None:
    runs = [run("a", 1.0, 2.0), run("b", 2.0, 3.0, pid=2), run("c", 3.5, None, pid=2)]
    kill = [inv.Interruption(2, "kill", 4.0, 4.0)]
    assert inv.check_overlaps(runs, {}, kill) == ([], [])


def test_an_overlap_without_an_interruption_is_a_violation() -> None:
    violations, allowed = inv.check_overlaps(
        [run("a", 1.0, 2.0), run("b", 1.5, 2.5, pid=2)], {}, []
    )
    assert [v.invariant for v in violations] == [inv.OVERLAP] and allowed == []


def test_a_fenced_run_of_a_stopped_runner_may_overlap_within_the_window() -> None:
    # pid 1 was SIGSTOPped from 1.2 to 6.0; pid 2 took the entity over at 4.5;
    # pid 1 finished its run just after SIGCONT, and its reply was refused.
    runs = [run("a", 1.0, 6.05), run("b", 4.5, 4.6, pid=2)]
    stop = [inv.Interruption(1, "stop", 1.2, 6.0)]
    rows = {"k-a": stored("k-a", Outcome(2, "other-run"))}
    violations, allowed = inv.check_overlaps(runs, rows, stop)
    assert violations == [] and len(allowed) == 1


def test_an_overlap_is_not_allowed_when_the_old_runs_reply_was_stored() -> None:
    runs = [run("a", 1.0, 6.05), run("b", 4.5, 4.6, pid=2)]
    stop = [inv.Interruption(1, "stop", 1.2, 6.0)]
    rows = {"k-a": stored("k-a", Outcome(1, "a"))}
    violations, _ = inv.check_overlaps(runs, rows, stop)
    assert len(violations) == 1


def test_an_overlap_is_not_allowed_past_the_fencing_window() -> None:
    runs = [run("a", 1.0, 6.0 + inv.FENCING_WINDOW_S + 0.5), run("b", 4.5, 4.6, pid=2)]
    stop = [inv.Interruption(1, "stop", 1.2, 6.0)]
    violations, _ = inv.check_overlaps(runs, {}, stop)
    assert len(violations) == 1


def test_an_overlap_is_not_allowed_when_the_interruption_came_later() -> None:
    # The new run began before the old runner lost anything: two owners at once.
    runs = [run("a", 1.0, 3.0), run("b", 1.5, 1.6, pid=2)]
    cut = [inv.Interruption(1, "lockcut", 2.0, 2.0)]
    violations, _ = inv.check_overlaps(runs, {}, cut)
    assert len(violations) == 1


def test_an_unfinished_run_ends_at_its_first_interruption() -> None:
    killed = run("a", 1.0, None)
    assert inv.end_of(killed, [inv.Interruption(1, "kill", 3.0, 3.0)]) == 3.0
    assert inv.end_of(killed, [inv.Interruption(2, "kill", 3.0, 3.0)]) is None
    # Cut short by its lost lease, then taken over: no overlap.
    cut = [inv.Interruption(1, "lockcut", 2.0, 2.0)]
    assert inv.check_overlaps([killed, run("b", 2.5, 2.6, pid=2)], {}, cut) == ([], [])
    # The new owner entered while the old run was still going: an overlap.
    violations, _ = inv.check_overlaps([killed, run("b", 1.5, 1.6, pid=2)], {}, cut)
    assert len(violations) == 1


def test_an_unfinished_run_that_nothing_interrupted_is_a_violation() -> None:
    [violation], _ = inv.check_overlaps([run("a", 1.0, None)], {}, [])
    assert "never finished" in violation.detail


def test_a_crash_signature_names_the_raise_and_the_escape() -> None:
    tail = """\
  + Exception Group Traceback (most recent call last):
  |   File "/x/trio_cluster/postgres/storage.py", line 82, in session
  | ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)
  +-+---------------- 1 ----------------
    | Exception Group Traceback (most recent call last):
    |   File "/x/trio_cluster/postgres/leases.py", line 131, in run
    | ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)
    +-+---------------- 1 ----------------
      | Traceback (most recent call last):
      |   File "/x/trio_cluster/postgres/leases.py", line 210, in _heartbeat
      |   File "/x/trio_cluster/pgdriver/connection.py", line 402, in _collect_results
      | trio_cluster.pgdriver.errors.ConnectionLost: terminating connection [57P01]
"""
    assert crash_signature(tail) == (
        "pgdriver/connection.py:402 in _collect_results: trio_cluster.pgdriver.errors."
        "ConnectionLost: terminating connection [57P01] (escaped via postgres/leases.py:131 in run)"
    )


# -- the CI seeds, on real processes -------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("seed", CI_SEEDS)
async def test_fault_schedule(seed: int, fault_pg: ThrowawayPostgres) -> None:
    result = await run_schedule(fault_pg, generate(seed))
    print(result.details())
    if not result.passed:
        pytest.fail(result.details(), pytrace=False)
