"""The cluster demo's moving parts, and child processes that are certain to end.

:func:`run_demo` is ``python -m trio_cluster.demo`` once PostgreSQL is known
to be available (see ``__main__``): the server, three runner processes, a
client in this process, traffic, a SIGKILL and its takeover, and the status
view (``python -m trio_cluster status``) once the cluster is up and again
after the takeover.

:class:`Child` and :class:`Children` (also used by the cluster benchmark)
start processes, read their lines, signal and reap them.
Children are started with :class:`subprocess.Popen` from the calling thread
(Trio's own ``open_process`` forks from a worker thread, which would break
the parent-death signal below), their stdout is read through Trio, and
:class:`Children` kills whatever is still running when its block exits,
whatever ends it: an error, a cancellation, Ctrl-C.

On Linux a child also asks the kernel to SIGKILL it when its parent dies
(``PR_SET_PDEATHSIG``), so not even a SIGKILL of the parent leaves a runner
behind. Elsewhere that step is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import msgspec
import trio

from trio_cluster import (
    ClusterError,
    Runner,
    ShardId,
    ShardingConfig,
    TransportConfig,
    open_runner,
)
from trio_cluster.pgdriver import open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.storage import PostgresStorage, open_postgres_storage
from trio_cluster.status_view import render_text

from .bank import Account, AccountState, Balance, Deposit, balance, deposit

__all__ = ["Child", "ChildExited", "Children", "python_module", "run_demo"]

# Run inside the child before the module: die with the parent (Linux), or at
# once if the parent already died before the request took effect.
_BOOTSTRAP = """\
import ctypes, os, runpy, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != parent:
    sys.exit("parent gone before start")
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

POLL_INTERVAL = 0.01
"""How often a waited-for child is polled for its exit."""


def python_module(module: str, *args: str) -> list[str]:
    """The argv running ``python -m module args...`` as a child that dies with its parent."""
    return [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), module, *args]


class ChildExited(RuntimeError):
    """A child's stdout ended (it exited) before the line we were waiting for."""


class Child:
    """One child process with line-oriented stdout (and stdin, when asked for)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        stdin: bool = False,
        stderr: IO[bytes] | int | None = None,
    ) -> None:
        self.name = name
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        self.started = time.monotonic()
        assert self.process.stdout is not None
        self._stdout = trio.lowlevel.FdStream(os.dup(self.process.stdout.fileno()))
        self.process.stdout.close()
        self._stdin: trio.lowlevel.FdStream | None = None
        if self.process.stdin is not None:
            self._stdin = trio.lowlevel.FdStream(os.dup(self.process.stdin.fileno()))
            self.process.stdin.close()
        self._buffer = bytearray()
        self._eof = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal)."""
        return self.process.poll()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def readline(self) -> str | None:
        """The next line of stdout without its newline; None once stdout has ended."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.decode(errors="replace")
            if self._eof:
                if self._buffer:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line.decode(errors="replace")
                return None
            try:
                data = await self._stdout.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                data = b""
            if not data:
                self._eof = True
            self._buffer += data

    async def expect(self, prefix: str, *, echo: Callable[[str], None] | None = None) -> str:
        """Read lines until one starts with ``prefix`` and return it; others go to ``echo``."""
        while True:
            line = await self.readline()
            if line is None:
                raise ChildExited(
                    f"{self.name} (pid {self.pid}) ended before printing {prefix!r}"
                    f" (exit status {self.process.poll()})"
                )
            if line.startswith(prefix):
                return line
            if echo is not None:
                echo(line)

    async def send_line(self, line: str) -> None:
        if self._stdin is None:
            raise RuntimeError(f"{self.name} was started without a stdin pipe")
        await self._stdin.send_all(line.encode() + b"\n")

    async def ask(self, command: str) -> str:
        """Send one command line and return the reply: the next line starting with its word."""
        await self.send_line(command)
        return await self.expect(command.split(maxsplit=1)[0] + " ")

    def send_signal(self, signum: int) -> None:
        if self.alive:
            self.process.send_signal(signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float | None = None) -> int | None:  # noqa: ASYNC109
        """Wait for the exit and return its status; None if ``timeout`` passes first."""
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while True:
                status = self.process.poll()
                if status is not None:
                    return status
                await trio.sleep(POLL_INTERVAL)
        return None

    async def stop(self, grace: float) -> int:
        """SIGTERM, up to ``grace`` seconds for a graceful exit, then SIGKILL."""
        self.send_signal(signal.SIGTERM)
        status = await self.wait(grace)
        if status is None:
            self.kill()
            status = self.process.wait()
        return status

    def close_pipes(self) -> None:
        """Close our ends of its pipes (outside Trio, they close when garbage collected)."""
        for stream in (self._stdout, self._stdin):
            if stream is not None:
                with contextlib.suppress(RuntimeError):  # not in async context
                    stream.close()

    def reap_now(self) -> None:
        """Synchronous last resort: SIGKILL if still running, then reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Children:
    """Every child started here is killed and reaped when the ``with`` block exits.

    A plain (synchronous) context manager on purpose: its exit must run even
    after ``trio.run`` was interrupted, and needs no event loop.
    """

    def __init__(self) -> None:
        self.all: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        stdin: bool = False,
        stderr: IO[bytes] | int | None = None,
    ) -> Child:
        child = Child(name, argv, cwd=cwd, stdin=stdin, stderr=stderr)
        self.all.append(child)
        return child

    def running(self) -> list[Child]:
        return [child for child in self.all if child.alive]

    def kill_all(self) -> None:
        for child in self.all:
            child.reap_now()
            child.close_pipes()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()


# -- the demo ---------------------------------------------------------------------

PREFIX = "demo_"
RUNNERS = 3
STARTUP_TIMEOUT = 60.0
STOP_GRACE = 20.0
"""Seconds a runner gets to hand its shards off after SIGTERM before it is killed."""
PROBE_TIMEOUT = 0.1


def say(message: str) -> None:
    print(message, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:6.1f}"


# -- traffic ------------------------------------------------------------------------


@dataclass
class Window:
    """What happened since the last progress line."""

    deposits: list[float] = field(default_factory=list)
    balances: list[float] = field(default_factory=list)
    errors: int = 0


@dataclass
class Traffic:
    window: Window = field(default_factory=Window)
    turns: int = 0
    deposits_acknowledged: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    stop: trio.Event = field(default_factory=trio.Event)

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window

    async def customer(self, client: Runner, number: int, accounts: int) -> None:
        """Deposit 1 into an account (persisted, keyed by transfer id), then read its balance."""
        i = 0
        while not self.stop.is_set():
            account = f"acct-{(number * 7919 + i) % accounts}"
            await self._one(client, account, f"c{number}-{i}")
            i += 1

    async def _one(self, client: Runner, account: str, transfer_id: str) -> None:
        start = time.perf_counter()
        try:
            await client.ask(deposit, account, Deposit(1, transfer_id))
            self.deposits_acknowledged += 1
            self.window.deposits.append(time.perf_counter() - start)
            start = time.perf_counter()
            await client.ask(balance, account, Balance())
            self.window.balances.append(time.perf_counter() - start)
        except ClusterError as error:
            self.errors[type(error).__name__] += 1
            self.window.errors += 1
        finally:
            self.turns += 1


def quantiles(samples: list[float]) -> str:
    """'p50 / p99 ms' of the samples, or dashes."""
    if len(samples) < 2:
        return "   -   /    -  "
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return f"{ms(cuts[49])} / {ms(cuts[98])}"


# -- the cluster --------------------------------------------------------------------


@dataclass
class Node:
    name: str
    child: Child
    address: str = ""
    killed: bool = False


class Demo:
    def __init__(self, children: Children, dsn: str, args: argparse.Namespace) -> None:
        self.children = children
        self.dsn = dsn
        self.args = args
        self.nodes: list[Node] = []

    def shard_map(self, client: Runner) -> str:
        counts = Counter(client.assignment.values())
        parts = []
        for node in self.nodes:
            if node.address in counts or not node.killed:
                mark = " (killed)" if node.killed else ""
                parts.append(f"{node.name} {counts.get(node.address, 0):>3}{mark}")
        return "  ".join(parts)

    async def start_nodes(self) -> None:
        for i in range(1, RUNNERS + 1):
            argv = python_module(
                "trio_cluster.demo.node",
                self.dsn,
                "--prefix",
                PREFIX,
                "--port",
                "0",
                "--shards",
                str(self.args.shards),
            )
            self.nodes.append(Node(f"runner-{i}", self.children.start(f"runner-{i}", argv)))
        with trio.fail_after(STARTUP_TIMEOUT):
            for node in self.nodes:
                line = await node.child.expect("ready ", echo=say)
                _, node.address, machine = line.split()
                say(
                    f"  {node.name}: pid {node.child.pid}, listening on {node.address}, "
                    f"machine id {machine}"
                )

    async def wait_until_served(
        self, client: Runner, shards: set[ShardId], *, stop: trio.Event | None = None
    ) -> list[float]:
        """Ask a volatile balance of one account per shard until each answers; when each did."""
        started = time.monotonic()
        answered: list[float] = []

        async def probe(account: str) -> None:
            while stop is None or not stop.is_set():
                try:
                    await client.ask(balance, account, Balance(), timeout=PROBE_TIMEOUT)
                except ClusterError:
                    await trio.sleep(0.005)
                else:
                    answered.append(time.monotonic() - started)
                    return

        async with trio.open_nursery() as nursery:
            for account in accounts_for(shards, self.args.shards).values():
                nursery.start_soon(probe, account)
        return answered

    async def run(self) -> None:
        args = self.args
        say(f"starting {RUNNERS} runner processes (python -m trio_cluster.demo.node) ...")
        await self.start_nodes()
        config = ShardingConfig(shards_per_group=args.shards)
        async with (
            open_postgres_storage(self.dsn, prefix=PREFIX) as storage,
            open_runner(
                storage=storage, config=config, transport=TransportConfig(cluster=PREFIX)
            ) as client,
        ):
            say(f"client: a runner hosting nothing, in this process, on {client.address}")
            with trio.fail_after(STARTUP_TIMEOUT):
                while set(client.assignment.values()) != {n.address for n in self.nodes}:
                    await client.changed()
                await self.wait_until_served(client, set(client.assignment))
            say(f"every shard answers; shard map: {self.shard_map(client)}")
            await self.show_status(storage, "with the cluster up")
            await self.show_idempotency(client)
            traffic = await self.traffic(client, storage)
        await self.stop_nodes()
        await self.summary(traffic)

    async def show_idempotency(self, client: Runner) -> None:
        first = await client.ask(deposit, "alice", Deposit(100, "welcome-alice"))
        again = await client.ask(deposit, "alice", Deposit(100, "welcome-alice"))
        now = await client.ask(balance, "alice", Balance())
        say(
            f"deposit 100 to alice as transfer 'welcome-alice': balance {first}; the same "
            f"transfer again is answered from storage ({again}), not re-run: balance {now}"
        )

    async def show_status(self, storage: PostgresStorage, when: str) -> None:
        """The status view an operator gets from ``python -m trio_cluster status``."""
        status = await storage.read_status(shards_per_group=self.args.shards)
        say(
            f"\nstatus view {when} (python -m trio_cluster status --dsn {self.dsn}"
            f" --prefix {PREFIX}); the client is a runner too, hosting no group:"
        )
        say(textwrap.indent(render_text(status), "  ") + "\n")

    async def traffic(self, client: Runner, storage: PostgresStorage) -> Traffic:
        args = self.args
        traffic = Traffic()
        say(
            f"\ntraffic for {args.seconds:g} s: {args.senders} customers, each in turn a "
            f"persisted deposit then a volatile balance read, over {args.accounts} accounts"
        )
        say("   t   req/s   deposit p50 / p99 ms   balance p50 / p99 ms   errors   shard map")
        async with trio.open_nursery() as nursery:
            for n in range(args.senders):
                nursery.start_soon(traffic.customer, client, n, args.accounts)
            nursery.start_soon(self.kill_one_later, client, storage, traffic)
            started = trio.current_time()
            for second in range(1, math.ceil(args.seconds) + 1):
                await trio.sleep_until(started + second)
                window = traffic.take_window()
                count = len(window.deposits) + len(window.balances) + window.errors
                say(
                    f"{second:4d}s  {count:6,d}   {quantiles(window.deposits)}"
                    f"         {quantiles(window.balances)}        {window.errors:5d}   "
                    f"{self.shard_map(client)}"
                )
            # Each customer finishes the request in hand; none may hang the exit.
            traffic.stop.set()
            nursery.cancel_scope.deadline = trio.current_time() + client.config.send_timeout + 1
        return traffic

    async def kill_one_later(
        self, client: Runner, storage: PostgresStorage, traffic: Traffic
    ) -> None:
        with trio.move_on_after(self.args.kill_after):
            await traffic.stop.wait()
        if traffic.stop.is_set():
            return
        victim = self.nodes[1]
        shards = {s for s, owner in client.assignment.items() if owner == victim.address}
        if not shards or not victim.child.alive:
            say(f">>> {victim.name} owns no shard now: nothing to kill and take over")
            return
        victim.child.kill()
        killed = time.monotonic()
        victim.killed = True
        say(
            f">>> SIGKILL {victim.name} (pid {victim.child.pid}), owner of {len(shards)} shards "
            f"and of the accounts in them; their balances live on in PostgreSQL, committed with "
            f"each deposit's reply"
        )
        await victim.child.wait()

        async def reassigned() -> None:
            while victim.address in client.assignment.values():
                await client.changed()
            say(
                f">>> +{time.monotonic() - killed:.2f} s: the client's shard map no longer "
                f"names {victim.name}: {self.shard_map(client)}"
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reassigned)
            answered = await self.wait_until_served(client, shards, stop=traffic.stop)
        if len(answered) == len(shards):
            say(
                f">>> +{time.monotonic() - killed:.2f} s: all {len(shards)} shards of "
                f"{victim.name} answer again (the first after {min(answered):.2f} s): "
                "taken over by the survivors"
            )
            await self.show_status(storage, "after the takeover")

    async def stop_nodes(self) -> None:
        alive = [node for node in self.nodes if node.child.alive]
        if not alive:
            return
        say(f"SIGTERM to {', '.join(n.name for n in alive)}: they hand their shards off and exit")
        async with trio.open_nursery() as nursery:
            for node in alive:
                nursery.start_soon(self._stop, node)

    async def _stop(self, node: Node) -> None:
        started = time.monotonic()
        status = await node.child.stop(STOP_GRACE)
        how = "exited" if status == 0 else f"ended with status {status}"
        say(f"  {node.name} {how} after {time.monotonic() - started:.2f} s")

    async def summary(self, traffic: Traffic) -> None:
        errors = ", ".join(f"{count} {name}" for name, count in traffic.errors.items())
        say(
            f"\n{traffic.turns:,} customer turns; deposits acknowledged: "
            f"{traffic.deposits_acknowledged:,}; errors: {errors or 'none'}"
        )
        async with open_connection(self.dsn) as conn:
            row = await conn.fetchrow(
                f"SELECT count(*), count(*) FILTER (WHERE processed) FROM {PREFIX}messages"
                " WHERE rpc = 'deposit' AND primary_key LIKE 'c%'"
            )
        assert row is not None
        stored, processed = int(row[0]), int(row[1])
        unanswered = stored - traffic.deposits_acknowledged
        say(
            f"deposits stored in PostgreSQL: {stored:,}, processed: {processed:,}"
            + (
                f" ({unanswered:,} stored, not acknowledged: in hand when traffic stopped)"
                if unanswered > 0
                else ""
            )
        )
        if traffic.errors["RunnerUnavailable"]:
            say(
                "RunnerUnavailable: volatile balance reads in flight to the killed runner; "
                "they may or may not have run there, so the client does not resend them"
            )
        await self.check_balances()

    async def check_balances(self) -> None:
        """Every account's stored balance against the deposits PostgreSQL says it processed."""
        async with open_connection(self.dsn) as conn:
            counts = await conn.fetch(
                f"SELECT entity_id, count(*) FROM {PREFIX}messages WHERE rpc = 'deposit'"
                " AND processed AND primary_key LIKE 'c%' GROUP BY entity_id"
            )
            states = await conn.fetch(
                f"SELECT entity_id, data FROM {PREFIX}states WHERE entity_type = 'Account'"
            )
        expected = {str(account): int(count) for account, count in counts}
        expected["alice"] = expected.get("alice", 0) + 100  # the welcome transfer
        balances = {
            str(account): msgspec.msgpack.decode(data, type=AccountState).balance
            for account, data in states
        }
        wrong = {a: (balances.get(a, 0), n) for a, n in expected.items() if balances.get(a, 0) != n}
        if wrong:
            say(f"balances NOT equal to their processed deposits: {sorted(wrong.items())[:5]}")
        else:
            say(
                f"every balance survived: all {len(expected)} accounts' stored balances equal "
                "their processed deposits, each applied exactly once, the killed runner's "
                "accounts included (the state was committed with each deposit's reply)"
            )


def accounts_for(shards: set[ShardId], shards_per_group: int) -> dict[ShardId, str]:
    """One account id in each of ``shards``."""
    found: dict[ShardId, str] = {}
    n = 0
    while len(found) < len(shards):
        account = f"probe-{n}"
        shard = Account.shard_of(account, shards_per_group)
        if shard in shards:
            found.setdefault(shard, account)
        n += 1
    return found


# -- entry point --------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> None:
    """The demo on a throwaway PostgreSQL server; everything is stopped on the way out."""
    started = time.monotonic()
    try:
        # Leaving the block: every child is killed (if still running) before the server stops.
        with ThrowawayPostgres() as server, Children() as children:
            say(f"PostgreSQL: a throwaway server at {server.dsn} (data in {server.directory})")
            trio.run(Demo(children, server.dsn, args).run)
            say("stopping PostgreSQL and deleting its data ...")
    except BaseException as error:
        # Trio hands a Ctrl-C back inside the groups of the nurseries it crossed.
        interrupted = isinstance(error, KeyboardInterrupt) or (
            isinstance(error, BaseExceptionGroup) and error.subgroup(KeyboardInterrupt) is not None
        )
        if not interrupted:
            raise
        say("\ninterrupted: every runner killed, PostgreSQL stopped and deleted")
        sys.exit(128 + signal.SIGINT)
    say(f"done in {time.monotonic() - started:.1f} s")
