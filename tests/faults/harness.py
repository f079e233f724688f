"""Playing one fault schedule against real processes, then checking it from outside.

The harness is the one process no fault reaches. It owns a PostgreSQL
server (a ``ThrowawayPostgres`` it may stop and start), starts three
``runner_app`` processes and one ``client_app`` process, plays the
schedule's faults at their times, heals everything, and then checks the
invariants of ``invariants`` against the database and against what the
client printed. Everything the runners do is seen from outside: their
stdout (the ``ready`` line), their exit status and stderr, their rows in
the database.

How a schedule goes:

1. fresh tables (a prefix of their own), the runners started and ready,
   then the client, whose traffic starts at once;
2. the faults, each at its start time, each undoing itself (restart after
   a kill or a SIGTERM, SIGCONT after a SIGSTOP, PostgreSQL started again);
   every process exit is watched, and one the schedule did not cause is a
   crash: recorded with its stderr tail, then the process is restarted so
   the schedule goes on;
3. healing: whatever is still down is brought up; from that moment every
   traffic entity must answer a volatile and a persisted ask within 5 s;
4. the client drains (every request under way is answered), the runners
   process every stored request (waited for by the replies' NOTIFYs), and
   everything is stopped with SIGTERM;
5. the checks.

Nothing sleeps to synchronise: processes are waited for by their lines and
their exits, stored replies by NOTIFY. The sleeps that remain are the
schedule itself (start times, how long something stays down or stopped).
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import attrs
import trio

from trio_cluster.core import reply as replies
from trio_cluster.pgdriver import Connection, PgError, open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.schema import migrate

from . import invariants as inv
from .client_app import PROBE_BOUND_S
from .common import ENTITIES, Outcome, create_runs, post, runs_table
from .schedule import (
    CLIENT,
    CUT,
    KILL,
    LOCKCUT,
    PGRESTART,
    RUNNERS,
    STOP,
    TERM,
    Fault,
    Schedule,
)

ROOT = Path(__file__).resolve().parents[2]
START_S = 30.0
"""Bound on a process getting ready (an interpreter start, and shards freed by a stopped peer)."""
EXIT_S = 30.0
"""Bound on a process exiting after SIGTERM (handoff included) or SIGKILL."""
PROBE_WAIT_S = PROBE_BOUND_S + 10.0
"""Bound on the client reporting its probes (each probe is bounded by 5 s itself)."""
DRAIN_S = 60.0
"""Bound on the client getting an answer to every request it has under way."""
PROCESSED_S = 30.0
"""Bound on the runners processing every stored request once everything is healed."""
PG_START_ATTEMPTS = 5
HEAL_ATTEMPTS = 3
"""Healing again when the client dies while probing or draining, at most this often."""
LOCK_BACKEND_POLL_S = 0.05
"""A lock cut waits for the target's lock connection to exist (no event says it does)."""
CUT_REPEAT_S = 0.25
"""A ``cut`` fault kills the target's links again this often while it lasts."""
STDERR_TAIL_LINES = 60
SIGNATURE_LINES = 1000
"""How much of a crashed process's stderr is read to find where its exception escaped."""
MAX_CRASH_RESTARTS = 5
"""Per slot: a process that keeps crashing is left down after this many restarts."""
WORK_ROOT = Path(tempfile.gettempdir()) / "trio_cluster_faults"


class HarnessError(Exception):
    """The harness itself could not go on (PostgreSQL would not start again)."""


# -- mutual exclusion of process starts and PostgreSQL restarts --------------------


class PgGate:
    """Process starts (and lock cuts) need PostgreSQL; a restart waits for them to finish.

    A runner that starts while the server is down exits at once (it cannot
    prepare its schema), which is documented start-up behaviour, not the
    failure under test; so starts and restarts exclude each other.
    """

    def __init__(self) -> None:
        self._users = 0
        self._restarting = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @asynccontextmanager
    async def using(self) -> AsyncIterator[None]:
        while self._restarting:
            await self._changed.wait()
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            self._notify()

    @asynccontextmanager
    async def restarting(self) -> AsyncIterator[None]:
        while self._restarting or self._users:
            await self._changed.wait()
        self._restarting = True
        try:
            yield
        finally:
            self._restarting = False
            self._notify()


# -- processes -----------------------------------------------------------------------


@attrs.define(eq=False)
class Proc:
    """One incarnation of a slot's process."""

    slot: str
    process: trio.Process
    incarnation: int
    stderr_path: Path
    address: str = ""
    ready: trio.Event = attrs.Factory(trio.Event)
    is_ready: bool = False
    expected: str | None = None
    """Why the harness is ending it (``kill``, ``term``), so its exit is no crash."""
    stopped: bool = False
    exited: trio.Event = attrs.Factory(trio.Event)
    code: int | None = None
    exit_wall: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    @property
    def serving(self) -> bool:
        return self.is_ready and self.alive and not self.stopped


@attrs.define(eq=False)
class Slot:
    name: str
    lock: trio.Lock = attrs.Factory(trio.Lock)
    """Held by whatever acts on the slot (a fault, a restart), so those never interleave."""
    proc: Proc | None = None
    incarnations: int = 0
    crash_restarts: int = 0

    @property
    def is_client(self) -> bool:
        return self.name == CLIENT


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str | None:
    """The next line of ``stream``, or None at its end (``buffer`` keeps what was read past it)."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode(errors="replace")


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_FRAME = re.compile(r'File "([^"]*trio_cluster/[^"]+)", line (\d+), in (\S+)')
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")


def crash_signature(tail: str) -> str:
    """Where an exception was raised in the library, and where it escaped unhandled.

    The raise point is the last library frame of the traceback; the escape
    point is the innermost library frame that let an ExceptionGroup out (a
    nursery whose ``except`` clause did not match the group).
    """
    last_frame: str | None = None
    escaped: str | None = None
    raised: str | None = None
    error = "no exception line"
    for line in tail.splitlines():
        frame = _FRAME.search(line)
        if frame is not None and "/tests/" not in frame.group(1):
            path, number, function = frame.groups()
            last_frame = raised = f"{path.split('trio_cluster/', 1)[1]}:{number} in {function}"
            continue
        exception = _EXCEPTION_LINE.match(line.lstrip(" |+-"))
        if exception is None or not exception.group(1).split(".")[-1][:1].isupper():
            continue
        if exception.group(1).endswith("ExceptionGroup"):
            escaped = last_frame or escaped
            last_frame = None
        else:
            error = f"{exception.group(1)}: {exception.group(2)}"[:160]
    where = raised or "no trio_cluster frame"
    via = f" (escaped via {escaped})" if escaped is not None and escaped != raised else ""
    return f"{where}: {error}{via}"


@attrs.define
class Crash:
    slot: str
    pid: int
    code: int | None
    at: float
    """Seconds after the schedule started."""
    during: str
    """What the harness was doing to it (``term`` for a failed graceful stop), or ``-``."""
    tail: str
    signature: str


# -- results -------------------------------------------------------------------------


@attrs.define
class Result:
    seed: int
    schedule: Schedule
    violations: list[inv.Violation]
    crashes: list[Crash]
    figures: dict[str, Any]
    notes: list[str]
    timeline: list[str]
    wall_s: float
    workdir: Path | None

    @property
    def passed(self) -> bool:
        return not self.violations

    def counts(self) -> Counter[str]:
        return Counter(violation.invariant for violation in self.violations)

    def summary_line(self) -> str:
        counts = self.counts()
        violations = ", ".join(f"{name}={counts[name]}" for name in inv.INVARIANTS if counts[name])
        figures = self.figures
        return (
            f"seed={self.seed} {'PASS' if self.passed else 'FAIL'} "
            f"wall={self.wall_s:.1f}s faults=[{self.schedule.describe()}] "
            f"acked={figures.get('acked_asks', 0)}+{figures.get('acked_tells', 0)}t "
            f"runs={figures.get('runs', 0)} rerun_keys={figures.get('keys_run_twice', 0)} "
            f"fenced_overlaps={figures.get('allowed_overlaps', 0)} "
            f"crashes={len(self.crashes)} violations={len(self.violations)}"
            + (f" ({violations})" if violations else "")
        )

    def details(self, limit: int = 15) -> str:
        lines = [self.summary_line(), f"  figures: {json.dumps(self.figures, sort_keys=True)}"]
        lines.extend(f"  note: {note}" for note in self.notes)
        by_kind: dict[str, list[inv.Violation]] = {}
        for violation in self.violations:
            by_kind.setdefault(violation.invariant, []).append(violation)
        for name, found in by_kind.items():
            lines.append(f"  {name}: {len(found)} violation(s)")
            lines.extend(f"    {violation.detail}" for violation in found[:limit])
        for crash in self.crashes:
            lines.append(
                f"  crash: {crash.slot} pid {crash.pid} exit {crash.code} at {crash.at:.2f}s "
                f"({crash.during}): {crash.signature}"
            )
            lines.extend(f"    | {line}" for line in crash.tail.splitlines()[-25:])
        if not self.passed:
            lines.append("  timeline:")
            lines.extend(f"    {event}" for event in self.timeline)
            if self.workdir is not None:
                lines.append(f"  stderr files kept in {self.workdir}")
        lines.append(f"  replay: python -m tests.faults.soak --schedules 1 --seed {self.seed}")
        return "\n".join(lines)


# -- the socket cut ------------------------------------------------------------------


@functools.cache
def socket_kill_supported() -> bool:
    """Whether ``ss -K`` can kill a TCP connection here (needs INET_DIAG_DESTROY and root)."""
    if shutil.which("ss") is None:
        return False
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as dialled:
            accepted, _ = listener.accept()
            with accepted:
                local = dialled.getsockname()[1]
                subprocess.run(
                    [
                        "ss",
                        "-K",
                        "-tnH",
                        "state",
                        "established",
                        f"( sport = :{local} and dport = :{port} )",
                    ],
                    capture_output=True,
                    check=False,
                    timeout=10,
                )
                accepted.settimeout(2.0)
                try:
                    return accepted.recv(1) == b""
                except OSError:
                    return True


_SS_LINE = re.compile(r"^\s*\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)\s+.*\bpid=(\d+),")


async def kill_links(pid: int, keep_port: int) -> int:
    """Kill every TCP connection of process ``pid`` on 127.0.0.1 except those to ``keep_port``.

    Only the process's own end is destroyed; its peer sees a reset. Returns
    how many were killed.
    """
    listing = await trio.run_process(
        ["ss", "-tnpH", "state", "established"], capture_stdout=True, check=False
    )
    pairs = []
    for line in listing.stdout.decode(errors="replace").splitlines():
        match = _SS_LINE.match(line)
        if match is None or int(match.group(5)) != pid:
            continue
        local_host, local_port, peer_host, peer_port = match.group(1, 2, 3, 4)
        if "127.0.0.1" not in local_host or "127.0.0.1" not in peer_host:
            continue
        if keep_port in (int(local_port), int(peer_port)):
            continue
        pairs.append((local_port, peer_port))
    if not pairs:
        return 0
    expression = " or ".join(f"( sport = :{local} and dport = :{peer} )" for local, peer in pairs)
    await trio.run_process(
        ["ss", "-K", "-tnH", "state", "established", expression],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return len(pairs)


# -- one schedule --------------------------------------------------------------------


def decode_outcome(reply: bytes | None) -> tuple[Outcome | None, str | None]:
    if reply is None:
        return None, "no reply"
    try:
        value = replies.decode(bytes(reply), post.success_decoder, post.errors_by_name)
    except Exception as error:  # a stored error reply is a finding, whatever its type
        return None, repr(error)
    if not isinstance(value, Outcome):
        return None, f"not an Outcome: {value!r}"
    return value, None


class ScheduleRun:
    """The state of one schedule being played; see the module docstring for the steps."""

    def __init__(
        self,
        server: ThrowawayPostgres,
        schedule: Schedule,
        *,
        cut_supported: bool,
    ) -> None:
        self.server = server
        self.schedule = schedule
        self.cut_supported = cut_supported
        self.dsn = server.dsn
        self.pg_port = urlparse(self.dsn).port or 5432
        self.prefix = f"f{schedule.seed % 10**8}_{uuid.uuid4().hex[:6]}_"
        self.workdir = WORK_ROOT / self.prefix.rstrip("_")
        self.slots = {name: Slot(name) for name in (*RUNNERS, CLIENT)}
        self.gate = PgGate()
        self.t0 = trio.current_time()
        self.t0_wall = time.time()
        """The schedule's start on the wall clock, which server timestamps share."""
        self.heal_at: float | None = None
        self.final = False
        self.nursery: trio.Nursery | None = None
        # observations
        self.violations: list[inv.Violation] = []
        self.crashes: list[Crash] = []
        self.notes: list[str] = []
        self.timeline: list[str] = []
        self.interruptions: list[inv.Interruption] = []
        self.acked: dict[str, str] = {}
        self.answers: list[inv.Answer] = []
        self.gave_up: list[str] = []
        self.probes: dict[tuple[str, str], tuple[bool, float, float, str]] = {}
        self.probed = trio.Event()
        self.drained = trio.Event()
        self.client_stats: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}
        self.lateness = 0.0

    # -- bookkeeping ----------------------------------------------------------

    def now(self) -> float:
        return trio.current_time() - self.t0

    def event(self, text: str) -> None:
        self.timeline.append(f"{self.now():7.2f}s {text}")

    def violate(self, invariant: str, detail: str) -> None:
        self.violations.append(inv.Violation(invariant, detail))
        self.event(f"VIOLATION [{invariant}] {detail.splitlines()[0]}")

    # -- the whole schedule ---------------------------------------------------

    async def play(self) -> Result:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await self._play_in(nursery)
                finally:
                    self.final = True
                    with trio.CancelScope(shield=True):
                        await self._kill_everything()
                    nursery.cancel_scope.cancel()
        finally:
            wall = time.monotonic() - started
        passed = not self.violations
        if passed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            with contextlib.suppress(PgError, OSError):
                await self._drop_tables()
        return Result(
            seed=self.schedule.seed,
            schedule=self.schedule,
            violations=self.violations,
            crashes=self.crashes,
            figures=self.figures,
            notes=self.notes,
            timeline=self.timeline,
            wall_s=wall,
            workdir=None if passed else self.workdir,
        )

    async def _play_in(self, nursery: trio.Nursery) -> None:
        if not self.server.running:
            await self._pg_start()
        async with open_connection(self.dsn, application_name="faults harness") as conn:
            await migrate(conn, self.prefix)
            await create_runs(conn, self.prefix)
        self.t0 = trio.current_time()
        async with trio.open_nursery() as starting:
            for name in RUNNERS:
                starting.start_soon(self._start, self.slots[name])
        await self._start(self.slots[CLIENT])
        self.t0 = trio.current_time()
        self.t0_wall = time.time()
        self.event(f"traffic started; schedule: {self.schedule.describe()}")
        async with trio.open_nursery() as faults:
            for fault in self.schedule.faults:
                faults.start_soon(self._play_fault, fault)
            faults.start_soon(trio.sleep, self.schedule.length)
        self.event("schedule over: healing")
        await self._heal()
        self.heal_at = trio.current_time()
        self.event("healed")
        await self._probe()
        await self._drain()
        await self._wait_processed()
        await self._stop_everything()
        await self._check()

    # -- processes ------------------------------------------------------------

    def _argv(self, slot: Slot) -> list[str]:
        if slot.is_client:
            return [
                sys.executable,
                "-m",
                "tests.faults.client_app",
                self.dsn,
                self.prefix,
                str(slot.incarnations),
                str(self.schedule.seed),
            ]
        return [sys.executable, "-m", "tests.faults.runner_app", self.dsn, self.prefix]

    async def _start(self, slot: Slot) -> bool:
        """A new process in ``slot``, once it printed ``ready``; False if it never did."""
        assert self.nursery is not None
        async with self.gate.using():
            slot.incarnations += 1
            stderr_path = self.workdir / f"{slot.name}.{slot.incarnations}.stderr"
            with stderr_path.open("wb") as stderr:
                process = await trio.lowlevel.open_process(
                    self._argv(slot),
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                )
            proc = Proc(slot.name, process, slot.incarnations, stderr_path)
            slot.proc = proc
            self.nursery.start_soon(self._read_stdout, proc)
            self.nursery.start_soon(self._watch_exit, slot, proc)
            began = trio.current_time()
            with trio.move_on_after(START_S):
                await proc.ready.wait()
            if proc.is_ready:
                self.event(
                    f"{slot.name} #{proc.incarnation} pid {proc.pid} ready at {proc.address} "
                    f"({trio.current_time() - began:.2f}s)"
                )
                return True
            if proc.alive:
                self.violate(
                    inv.EXIT,
                    f"{slot.name} pid {proc.pid} did not get ready within {START_S:.0f}s:\n"
                    + stderr_tail(stderr_path),
                )
                proc.expected = KILL
                process.kill()
            return False

    async def _read_stdout(self, proc: Proc) -> None:
        stdout = proc.process.stdout
        assert stdout is not None
        buffer = bytearray()
        try:
            while (line := await read_line(stdout, buffer)) is not None:
                self._on_line(proc, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            proc.ready.set()

    def _on_line(self, proc: Proc, line: str) -> None:
        word, _, rest = line.partition(" ")
        fields = rest.split()
        if word == "ready" and len(fields) == 2:
            proc.address = fields[0]
            proc.is_ready = True
            proc.ready.set()
        elif word in ("ack", "again") and len(fields) == 4:
            key, entity_id, pid, run = fields
            if word == "ack":
                self.acked[key] = entity_id
            if pid != "0":
                self.answers.append(inv.Answer(key, entity_id, int(pid), run, word))
        elif word == "probe" and len(fields) >= 4:
            kind, entity_id, status, elapsed = fields[:4]
            since_heal = trio.current_time() - (self.heal_at or trio.current_time())
            error = " ".join(fields[4:])
            self.probes[kind, entity_id] = (status == "ok", float(elapsed), since_heal, error)
        elif word == "probed":
            self.probed.set()
        elif word == "drained":
            self.client_stats = json.loads(rest)
            self.drained.set()
        elif word == "gaveup":
            self.gave_up.append(rest)
        elif word == "bad":
            self.violate(inv.OUTCOME, f"wrong volatile answer: {rest}")
        else:
            self.notes.append(f"{proc.slot} printed {line[:200]!r}")

    async def _watch_exit(self, slot: Slot, proc: Proc) -> None:
        """Every exit is seen here; one the schedule did not cause is a crash."""
        code = await proc.process.wait()
        proc.code = code
        proc.exit_wall = time.time()
        proc.exited.set()
        self.event(f"{slot.name} pid {proc.pid} exited with {code} ({proc.expected or 'unasked'})")
        if proc.expected == KILL:
            return
        if proc.expected == TERM and code == 0:
            return
        tail = stderr_tail(proc.stderr_path)
        signature = crash_signature(stderr_tail(proc.stderr_path, SIGNATURE_LINES))
        crash = Crash(slot.name, proc.pid, code, self.now(), proc.expected or "-", tail, signature)
        self.crashes.append(crash)
        what = "after SIGTERM" if proc.expected == TERM else "unasked"
        self.violate(
            inv.EXIT, f"{slot.name} pid {proc.pid} exited with {code} {what}: {crash.signature}"
        )
        if proc.expected is None:
            self.interruptions.append(
                inv.Interruption(proc.pid, "crash", proc.exit_wall, proc.exit_wall)
            )
            if not self.final and self.nursery is not None:
                self.nursery.start_soon(self._restart_crashed, slot, proc)

    async def _restart_crashed(self, slot: Slot, proc: Proc) -> None:
        async with slot.lock:
            if self.final or slot.proc is not proc:
                return
            if slot.crash_restarts >= MAX_CRASH_RESTARTS:
                self.notes.append(f"{slot.name} crashed too often: left down")
                return
            slot.crash_restarts += 1
            self.event(f"restarting {slot.name} after its crash")
            await self._start(slot)

    async def _end(self, proc: Proc, how: str) -> int | None:
        """SIGKILL or SIGTERM ``proc`` and wait for its exit (bounded)."""
        proc.expected = how
        if not proc.alive:
            return proc.code
        started = time.time()
        if how == KILL:
            self.interruptions.append(inv.Interruption(proc.pid, KILL, started, started))
            proc.process.kill()
        else:
            if proc.stopped:
                proc.process.send_signal(signal.SIGCONT)
                proc.stopped = False
            proc.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(EXIT_S):
            await proc.exited.wait()
        if proc.alive:
            self.violate(
                inv.EXIT, f"{proc.slot} pid {proc.pid} still running {EXIT_S:.0f}s after {how}"
            )
            proc.expected = KILL
            proc.process.kill()
            with trio.move_on_after(EXIT_S):
                await proc.exited.wait()
        if how == TERM:
            self.interruptions.append(inv.Interruption(proc.pid, TERM, started, proc.exit_wall))
        return proc.code

    async def _kill_everything(self) -> None:
        for slot in self.slots.values():
            proc = slot.proc
            if proc is not None and proc.alive:
                proc.expected = KILL
                proc.process.kill()
        for slot in self.slots.values():
            proc = slot.proc
            if proc is not None:
                with trio.move_on_after(EXIT_S):
                    await proc.exited.wait()
                for stream in (proc.process.stdin, proc.process.stdout):
                    if stream is not None:
                        with contextlib.suppress(trio.BrokenResourceError, OSError):
                            await stream.aclose()

    # -- PostgreSQL -----------------------------------------------------------

    async def _pg_start(self) -> None:
        for attempt in range(PG_START_ATTEMPTS):
            try:
                await trio.to_thread.run_sync(self.server.start)
            except RuntimeError as error:
                self.notes.append(f"PostgreSQL start attempt {attempt + 1} failed: {error}")
                # A pause between attempts (the port may be briefly taken), not a sync.
                await trio.sleep(0.5)
            else:
                return
        raise HarnessError("PostgreSQL did not start again")

    # -- faults ---------------------------------------------------------------

    async def _play_fault(self, fault: Fault) -> None:
        await trio.sleep_until(self.t0 + fault.start)
        if fault.kind == PGRESTART:
            await self._pg_restart(fault)
            return
        assert fault.target is not None
        slot = self.slots[fault.target]
        async with slot.lock:
            late = self.now() - fault.start
            self.lateness = max(self.lateness, late)
            proc = slot.proc
            if proc is None or not proc.serving:
                self.notes.append(f"skipped {fault.describe()}: {slot.name} was not serving")
                self.event(f"skipped {fault.describe()}")
                return
            self.event(f"fault {fault.describe()} on pid {proc.pid} (late {late:.2f}s)")
            if fault.kind in (KILL, TERM):
                code = await self._end(proc, fault.kind)
                self.event(f"{slot.name} pid {proc.pid} down (exit {code})")
                await trio.sleep(fault.duration)
                await self._start(slot)
            elif fault.kind == STOP:
                started = time.time()
                proc.process.send_signal(signal.SIGSTOP)
                proc.stopped = True
                await trio.sleep(fault.duration)
                proc.process.send_signal(signal.SIGCONT)
                proc.stopped = False
                self.interruptions.append(inv.Interruption(proc.pid, STOP, started, time.time()))
                self.event(f"{slot.name} pid {proc.pid} continued")
            elif fault.kind == LOCKCUT:
                await self._cut_lock(proc)
            elif fault.kind == CUT:
                await self._cut_sockets(proc, fault.duration)
            else:
                raise AssertionError(fault.kind)

    async def _cut_lock(self, proc: Proc) -> None:
        name = f"trio_cluster lock {proc.address}"[:63]
        ended = 0
        started = time.time()
        with trio.move_on_after(START_S):
            async with (
                self.gate.using(),
                open_connection(self.dsn, application_name="faults harness") as conn,
            ):
                # The lock connection may be between reconnects (after a
                # PostgreSQL restart): its existence announces nothing, so poll.
                while proc.serving:
                    started = time.time()
                    ended = int(
                        await conn.fetchval(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                            " FROM pg_stat_activity WHERE application_name = $1",
                            [name],
                        )
                    )
                    if ended:
                        break
                    await trio.sleep(LOCK_BACKEND_POLL_S)
        if ended:
            self.interruptions.append(inv.Interruption(proc.pid, LOCKCUT, started, started))
            self.event(f"{proc.slot} pid {proc.pid}: lock backend terminated")
        else:
            self.notes.append(f"{proc.slot}: no lock backend to terminate (reconnecting?)")

    async def _cut_sockets(self, proc: Proc, duration: float) -> None:
        if not self.cut_supported:
            self.notes.append("socket cut skipped: ss -K is not supported on this machine")
            return
        deadline = trio.current_time() + duration
        killed = 0
        while True:
            killed += await kill_links(proc.pid, self.pg_port)
            if trio.current_time() >= deadline:
                break
            await trio.sleep(CUT_REPEAT_S)
        self.event(f"{proc.slot} pid {proc.pid}: {killed} runner links killed")

    async def _pg_restart(self, fault: Fault) -> None:
        async with self.gate.restarting():
            late = self.now() - fault.start
            self.lateness = max(self.lateness, late)
            pids = [
                slot.proc.pid
                for slot in self.slots.values()
                if slot.proc is not None and slot.proc.alive
            ]
            self.event(f"fault {fault.describe()} (late {late:.2f}s)")
            started = time.time()
            await trio.to_thread.run_sync(functools.partial(self.server.stop, keep_data=True))
            self.event("PostgreSQL stopped")
            await trio.sleep(fault.duration)
            await self._pg_start()
            ended = time.time()
            self.event("PostgreSQL started")
        self.interruptions.extend(inv.Interruption(pid, PGRESTART, started, ended) for pid in pids)

    # -- healing and the end of traffic -------------------------------------

    async def _heal(self) -> None:
        if not self.server.running:
            await self._pg_start()
        async with trio.open_nursery() as nursery:
            for slot in self.slots.values():
                nursery.start_soon(self._heal_slot, slot)

    async def _heal_slot(self, slot: Slot) -> None:
        async with slot.lock:
            proc = slot.proc
            if proc is not None and proc.alive and proc.stopped:
                proc.process.send_signal(signal.SIGCONT)
                proc.stopped = False
            if proc is None or not proc.alive:
                self.event(f"healing: starting {slot.name}")
                await self._start(slot)

    async def _send_client(self, command: str) -> bool:
        proc = self.slots[CLIENT].proc
        if proc is None or not proc.alive or proc.process.stdin is None:
            return False
        try:
            await proc.process.stdin.send_all(f"{command}\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _until_client_answers(self, event: trio.Event, proc: Proc, bound: float) -> bool:
        """Wait for ``event`` (a line of ``proc``), its exit, or ``bound``; True on the line."""
        with trio.move_on_after(bound):
            async with trio.open_nursery() as nursery:

                async def first_of(done: trio.Event) -> None:
                    await done.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first_of, event)
                nursery.start_soon(first_of, proc.exited)
        return event.is_set()

    async def _probe(self) -> None:
        """Every traffic entity answers a volatile and a persisted ask within 5 s of healing.

        A process that crashes right after healing (a runner resumed by the
        schedule's last SIGCONT, say) is a violation of its own; the harness
        then heals again, and the 5 s count from there.
        """
        for _ in range(HEAL_ATTEMPTS):
            proc = self.slots[CLIENT].proc
            self.probes.clear()
            self.probed = trio.Event()
            if proc is not None and await self._send_client("probe"):
                if await self._until_client_answers(self.probed, proc, PROBE_WAIT_S):
                    break
                if proc.alive:
                    break
            self.event("the client is gone while probing: healing again")
            await self._heal()
            self.heal_at = trio.current_time()
            self.event("healed again")
        for entity_id in ENTITIES:
            for kind in ("volatile", "persisted"):
                probe = self.probes.get((kind, entity_id))
                if probe is None:
                    self.violate(inv.ANSWERS, f"no {kind} answer from {entity_id} after healing")
                    continue
                ok, elapsed, _, error = probe
                if not ok or elapsed > PROBE_BOUND_S:
                    self.violate(
                        inv.ANSWERS,
                        f"{kind} ask of {entity_id} not answered within {PROBE_BOUND_S:.0f}s "
                        f"of healing ({elapsed:.2f}s: {error or 'late'})",
                    )
        if self.probes:
            self.figures["probe_max_s"] = round(max(p[1] for p in self.probes.values()), 3)
            self.figures["probe_max_since_heal_s"] = round(
                max(p[2] for p in self.probes.values()), 3
            )

    async def _drain(self) -> None:
        """The client stops sending and gets an answer to every request it has under way."""
        began = trio.current_time()
        for _ in range(HEAL_ATTEMPTS):
            proc = self.slots[CLIENT].proc
            self.drained = trio.Event()
            if proc is not None and await self._send_client("drain"):
                if await self._until_client_answers(self.drained, proc, DRAIN_S):
                    break
                if proc.alive:
                    self.violate(
                        inv.ANSWERS,
                        f"the client's requests under way were not all answered within "
                        f"{DRAIN_S:.0f}s",
                    )
                    break
            self.event("the client is gone while draining: healing again")
            await self._heal()
        else:
            self.violate(inv.ANSWERS, "the client never drained: it kept dying")
        self.figures["drain_s"] = round(trio.current_time() - began, 3)

    async def _count_unprocessed(self, conn: Connection) -> int:
        return int(
            await conn.fetchval(f"SELECT count(*) FROM {self.prefix}messages WHERE NOT processed")
        )

    async def _wait_processed(self) -> None:
        """Until every stored request has its reply; each stored reply is announced by NOTIFY."""
        began = trio.current_time()
        async with open_connection(self.dsn, application_name="faults harness") as conn:
            await conn.listen(f"{self.prefix}events")
            with trio.move_on_after(PROCESSED_S):
                while await self._count_unprocessed(conn):
                    await conn.wait_notification()
            left = await self._count_unprocessed(conn)
        self.figures["processed_wait_s"] = round(trio.current_time() - began, 3)
        if left:
            self.event(f"{left} stored requests still unprocessed after {PROCESSED_S:.0f}s")

    async def _stop_everything(self) -> None:
        """SIGTERM the client, then every runner: each must exit 0.

        Each slot's lock is taken first, so a restart still under way (after
        a crash just before the end) finishes, and its process has its
        SIGTERM handler, before it is asked to stop.
        """
        self.final = True
        await self._stop_slot(self.slots[CLIENT])
        async with trio.open_nursery() as nursery:
            for name in RUNNERS:
                nursery.start_soon(self._stop_slot, self.slots[name])
        self.event("everything stopped")

    async def _stop_slot(self, slot: Slot) -> None:
        async with slot.lock:
            if slot.proc is not None:
                await self._end(slot.proc, TERM)

    # -- the checks -----------------------------------------------------------

    async def _check(self) -> None:
        p = self.prefix
        async with open_connection(self.dsn, application_name="faults harness") as conn:
            run_rows = await conn.fetch(
                "SELECT run, phase, entity_id, request_key, pid,"
                f" extract(epoch FROM at)::float8 FROM {runs_table(p)}"
            )
            message_rows = await conn.fetch(
                "SELECT primary_key, entity_id, processed, reply,"
                f" extract(epoch FROM replied_at)::float8 FROM {p}messages WHERE rpc = $1",
                [post.name],
            )
            unprocessed = await self._count_unprocessed(conn)
        runs, problems = inv.pair_runs(run_rows)
        for problem in problems:
            self.violate(inv.OVERLAP, problem)
        stored: dict[str, inv.Stored] = {}
        replied_at: dict[str, float] = {}
        for key, entity_id, processed, reply, at in message_rows:
            outcome, error = decode_outcome(reply)
            stored[key] = inv.Stored(key, entity_id, bool(processed), outcome, error)
            if at is not None:
                replied_at[key] = float(at)

        self.violations.extend(inv.check_acknowledged(self.acked, stored, runs))
        self.violations.extend(inv.check_outcomes(self.answers, stored))
        overlaps, allowed = inv.check_overlaps(
            runs, stored, self.interruptions, origin=self.t0_wall
        )
        self.violations.extend(overlaps)
        if unprocessed:
            self.violations.append(
                inv.Violation(
                    inv.UNPROCESSED,
                    f"{unprocessed} stored requests left unprocessed after a graceful stop",
                )
            )

        per_key = Counter(run.key for run in runs)
        figures = self.figures
        figures["acked_asks"] = sum(1 for key in self.acked if key.startswith("a"))
        figures["acked_tells"] = sum(1 for key in self.acked if key.startswith("t"))
        figures["acked_probes"] = sum(1 for key in self.acked if key.startswith("p"))
        figures["duplicate_asks"] = sum(1 for answer in self.answers if answer.source == "again")
        figures["stored"] = len(stored)
        figures["runs"] = len(runs)
        figures["unfinished_runs"] = sum(1 for run in runs if run.exit is None)
        figures["keys_run_twice"] = sum(1 for count in per_key.values() if count > 1)
        figures["runs_after_reply"] = inv.runs_after_reply(runs, replied_at)
        figures["allowed_overlaps"] = len(allowed)
        self.notes.extend(f"allowed overlap: {text}" for text in allowed[:3])
        figures["interruptions"] = len(self.interruptions)
        figures["gave_up"] = len(self.gave_up)
        figures["fault_lateness_s"] = round(self.lateness, 3)
        figures["client"] = self.client_stats
        if self.gave_up:
            self.notes.append(f"client gave up on {len(self.gave_up)}: {self.gave_up[:3]}")

    async def _drop_tables(self) -> None:
        p = self.prefix
        with trio.move_on_after(10):
            async with open_connection(self.dsn, application_name="faults harness") as conn:
                await conn.execute_script(
                    f"DROP TABLE IF EXISTS {runs_table(p)}, {p}messages, {p}runners,"
                    f" {p}shards, {p}schema_version"
                )


async def run_schedule(
    server: ThrowawayPostgres,
    schedule: Schedule,
    *,
    log: Callable[[str], None] = print,
    cut_supported: bool | None = None,
) -> Result:
    """Play ``schedule`` on ``server`` and check it; the seed is printed first, for replay."""
    if cut_supported is None:
        cut_supported = socket_kill_supported()
        if not cut_supported:
            log("note: ss -K cannot kill sockets here; socket cuts are skipped")
    log(f"schedule seed={schedule.seed}: {schedule.describe()}")
    run = ScheduleRun(server, schedule, cut_supported=cut_supported)
    try:
        return await run.play()
    except BaseExceptionGroup as group:
        # Nurseries wrap the harness's own failure; unwrap it for the caller.
        harness, _ = group.split(HarnessError)
        if harness is None:
            raise
        raise HarnessError(f"seed {schedule.seed}: {harness.exceptions[0]}") from group


__all__ = ["HarnessError", "Result", "run_schedule", "socket_kill_supported"]
