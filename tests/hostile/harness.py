"""The test side of a target process: start it, drive its legitimate traffic, watch it.

A :class:`TargetProcess` is one ``python -m tests.hostile.target`` process. It
is waited on by its ``ready`` line and by the result lines its commands
produce, never by time; its memory is read from ``/proc/PID/status`` (the
peak, ``VmHWM``, is reset before an attack through ``/proc/PID/clear_refs``, so
a short burst that is freed again still counts); its death is noticed by
``returncode`` and reported with the tail of its stderr, where a crashed
runner leaves its traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Final, TypeVar

import msgspec
import trio

from .app import (
    Ack,
    Big,
    BigResult,
    Command,
    Limits,
    Mode,
    Probe,
    ProbeResult,
    Ready,
    Release,
    SlowDone,
    SlowInFlight,
    StartSlow,
)
from .peer import Credentials

ROOT: Final = Path(__file__).resolve().parents[2]
START_S: Final = 20.0
"""Bound on the target getting ready: an interpreter, two runners, maybe a CA."""
COMMAND_S: Final = 30.0
"""Bound on any command's result (a probe's own asks time out well before)."""
STOP_S: Final = 15.0
"""Bound on a graceful exit after SIGTERM (drain, release, unregister)."""
MiB: Final = 2**20

R = TypeVar("R", bound=msgspec.Struct)


class _Tagged(msgspec.Struct):
    tag: str


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


class TargetDied(AssertionError):
    """The target process ended while under attack: the one outcome never allowed."""


class TargetProcess:
    def __init__(
        self, process: trio.Process, ready: Ready, limits: Limits, stderr: Path, certs: Path | None
    ) -> None:
        self.process = process
        self.ready = ready
        self.limits = limits
        self.stderr_path = stderr
        self.certs = certs
        self.credentials = Credentials.for_mode(ready.mode, certs)
        self._results: dict[str, bytes] = {}
        self._changed = trio.Event()
        self._tags = count(1)
        self._stdout_closed = False

    # -- process state --

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def stderr_tail(self, size: int = 6000) -> str:
        text = self.stderr_path.read_text(errors="replace")
        return text[-size:]

    def check_alive(self, when: str = "") -> None:
        """Raise TargetDied, with its exit code and traceback, unless the target still runs."""
        code = self.process.returncode
        if code is not None:
            raise TargetDied(
                f"target exited with code {code}{' ' + when if when else ''};"
                f" stderr:\n{self.stderr_tail()}"
            )

    def rss(self) -> int:
        """Resident memory now, in bytes."""
        return _status_kib(self.pid, "VmRSS") * 1024

    def peak(self) -> int:
        """The resident high-water mark since the last :meth:`reset_peak`, in bytes."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    # -- commands --

    async def _read_results(self, *, task_status: trio.TaskStatus[None]) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        buffer = bytearray()
        task_status.started()
        while True:
            try:
                chunk = await stdout.receive_some()
            except trio.ClosedResourceError:
                chunk = b""
            if not chunk:
                self._stdout_closed = True
                self._note()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                self._results[msgspec.json.decode(line, type=_Tagged).tag] = line
            self._note()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def new_tag(self, prefix: str) -> str:
        return f"{prefix}{next(self._tags)}"

    async def send(self, command: Command) -> None:
        self.check_alive("before a command")
        stdin = self.process.stdin
        assert stdin is not None
        await stdin.send_all(msgspec.json.encode(command) + b"\n")

    async def result(self, tag: str, kind: type[R], timeout: float = COMMAND_S) -> R:  # noqa: ASYNC109
        """The result line of ``tag``; TargetDied if the target ends before it."""
        with trio.fail_after(timeout):
            while tag not in self._results:
                if self._stdout_closed:
                    with trio.move_on_after(STOP_S):
                        await self.process.wait()
                    self.check_alive(f"while waiting for {tag}")
                    raise TargetDied("the target closed its stdout")
                await self._changed.wait()
        return msgspec.json.decode(self._results.pop(tag), type=kind)

    async def probe(self, count_: int = 12, size: int = 64 * 1024) -> ProbeResult:
        tag = self.new_tag("probe")
        await self.send(Probe(tag, count=count_, size=size))
        return await self.result(tag, ProbeResult)

    async def check_legit(self, count_: int = 12, size: int = 64 * 1024) -> None:
        """Legitimate traffic gets correct answers, or the assertion says which did not."""
        result = await self.probe(count_, size)
        assert not result.errors, f"legitimate traffic failed: {result.errors[:10]}"
        assert len(result.latencies_ns) == count_

    async def start_slow(
        self, entity_id: str, gate: str, value: str, ask_timeout: float = 10.0
    ) -> tuple[str, SlowInFlight]:
        """A legitimate slow ask (its own timeout ``ask_timeout``), once the owner holds it.

        Returns its tag, for :meth:`slow_done`, and the in-flight report.
        """
        tag = self.new_tag("slow")
        await self.send(StartSlow(tag, entity_id, gate, value, ask_timeout))
        return tag, await self.result(tag, SlowInFlight)

    async def slow_done(self, tag: str) -> SlowDone:
        return await self.result(f"{tag}/done", SlowDone)

    async def release(self, gate: str) -> None:
        tag = self.new_tag("release")
        await self.send(Release(tag, gate))
        await self.result(tag, Ack)

    async def big(self, size: int) -> BigResult:
        tag = self.new_tag("big")
        await self.send(Big(tag, size))
        return await self.result(tag, BigResult)

    async def stop(self) -> int:
        """SIGTERM, and the exit code (0: a graceful exit)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_S):
            return await self.process.wait()


def target_argv(mode: Mode, limits: Limits, certs: Path | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "tests.hostile.target",
        mode,
        "--limits",
        msgspec.json.encode(limits).decode(),
    ]
    if certs is not None:
        argv += ["--certs", str(certs)]
    return argv


def _open_log(path: Path) -> int:
    """A file descriptor for the target's stderr (its own copy is inherited)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


async def _read_ready(stdout: trio.abc.ReceiveStream) -> tuple[Ready, bytes]:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = await stdout.receive_some()
        if not chunk:
            raise EOFError(f"the target ended before its ready line: {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    word, _, body = line.partition(b" ")
    assert word == b"ready", line
    return msgspec.json.decode(body, type=Ready), rest


@asynccontextmanager
async def open_target(
    mode: Mode, workdir: Path, limits: Limits | None = None
) -> AsyncIterator[TargetProcess]:
    """A running target; whatever is left of it is killed on the way out."""
    limits = limits or Limits()
    certs = workdir / "certs" if mode == "tls" else None
    stderr_path = workdir / "target.stderr"
    stderr = _open_log(stderr_path)
    try:
        process = await trio.lowlevel.open_process(
            target_argv(mode, limits, certs),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    finally:
        os.close(stderr)
    try:
        assert process.stdout is not None
        try:
            with trio.fail_after(START_S):
                ready, rest = await _read_ready(process.stdout)
        except (EOFError, trio.TooSlowError) as error:
            raise AssertionError(
                f"target did not start: {error}; stderr:\n{stderr_path.read_text()[-4000:]}"
            ) from error
        assert not rest, rest
        target = TargetProcess(process, ready, limits, stderr_path, certs)
        async with trio.open_nursery() as nursery:
            await nursery.start(target._read_results)
            yield target
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()
