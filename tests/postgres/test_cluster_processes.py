"""Many runners: real runner processes, real PostgreSQL, real sockets on 127.0.0.1.

Acceptance of the many-runners issue. The runners are
``tests.postgres.cluster_app`` processes; the tests send through an
in-test client runner that hosts nothing (so every request crosses to a
process: volatile ones over TCP, persisted ones through the database).

- a. a volatile ask reaches the process owning the entity's shard; persisted
  asks and tells run exactly once;
- b. a runner joins and another leaves (SIGTERM) under ask traffic: every
  ask is answered, every key runs exactly once;
- c. a runner is SIGKILLed under tell traffic: every acknowledged tell runs,
  and no two runs of one entity ever overlap in time (measured failover is
  printed);
- d. a rolling restart of every runner under ask traffic: nothing lost,
  nothing run twice;
- e. a stream runs in the process owning its entity, every chunk in order,
  and a caller that leaves it ends the handler there (its ``finally`` row).

Each handler run leaves an ``entry`` and an ``exit`` row (server clock) in
``{prefix}runs``, announced by NOTIFY. Nothing here sleeps to synchronise:
processes are waited for by their ``ready`` line or their exit, handler runs
by their NOTIFY, replies by the client; the one condition with no event
(which runner's lock connection holds which shard) is polled from the
server. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import attrs
import trio

from trio_cluster import ClusterError, Runner, SendTimeout, ShardId, open_runner
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.schema import lock_namespace
from trio_cluster.postgres.storage import PostgresStorage, open_postgres_storage

from .cluster_app import (
    CONFIG,
    ENTRY,
    EXIT,
    SHARDS,
    Echo,
    Post,
    Ticks,
    Worker,
    create_runs,
    echo,
    post,
    runs_channel,
    runs_table,
    ticks,
    transport,
)

ROOT = Path(__file__).resolve().parents[2]
START_S = 15.0
"""Bound on a runner process getting ready (an interpreter start and a few queries)."""
WAIT_S = 15.0
"""Bound on any other cross-process wait."""
ASK_TIMEOUT_S = 5.0
"""An ask that takes longer is asked again, with the same key."""
MAX_ATTEMPTS = 5
SENDERS = 4
"""Concurrent senders of traffic."""
TELL_WINDOW = 40
"""Tells acknowledged but not yet run, at most: the tell sender's flow control."""
POLL_S = 0.02


def entities_per_shard(per_shard: int) -> list[list[str]]:
    """``per_shard`` entity ids for each shard, by shard index."""
    buckets: list[list[str]] = [[] for _ in range(SHARDS)]
    number = 0
    while any(len(bucket) < per_shard for bucket in buckets):
        entity_id = f"w{number}"
        bucket = buckets[shard_of(entity_id).index]
        if len(bucket) < per_shard:
            bucket.append(entity_id)
        number += 1
    return buckets


def shard_of(entity_id: str) -> ShardId:
    return Worker.shard_of(entity_id, SHARDS)


TRAFFIC_ENTITIES = [e for bucket in entities_per_shard(2) for e in bucket]


# -- runner processes --------------------------------------------------------


@attrs.define
class Node:
    process: trio.Process
    address: str
    machine_id: int

    @property
    def pid(self) -> int:
        return self.process.pid


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    """The next line of ``stream`` (``buffer`` keeps what was read past it)."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(f"stream ended before a full line: {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


class Cluster:
    """The runner processes of one test; whatever is still alive at the end is killed."""

    def __init__(
        self,
        dsn: str,
        prefix: str,
        app: str = "tests.postgres.cluster_app",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.app = app
        """The runner app's module: it takes ``DSN PREFIX`` and prints ``ready ADDRESS ID``."""
        self.env = None if env is None else {**os.environ, **env}
        """The processes' environment: this process's, with ``env`` on top."""
        self.processes: list[trio.Process] = []

    async def start(self) -> Node:
        """A new runner process, once it serves the shards assigned to it."""
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", self.app, self.dsn, self.prefix],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        self.processes.append(process)
        assert process.stdout is not None
        with trio.fail_after(START_S):
            line = await read_line(process.stdout, bytearray())
        word, address, machine_id = line.split(" ")
        assert word == "ready", line
        return Node(process, address, int(machine_id))

    async def start_many(self, count: int) -> list[Node]:
        nodes: list[Node] = []

        async def start_one() -> None:
            nodes.append(await self.start())

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(start_one)
        return nodes

    @staticmethod
    async def stop(node: Node) -> None:
        """SIGTERM: the runner hands its shards off and exits 0."""
        node.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):
            assert await node.process.wait() == 0

    @staticmethod
    async def kill(node: Node) -> None:
        node.process.kill()
        with trio.fail_after(WAIT_S):
            assert await node.process.wait() == -signal.SIGKILL

    async def cleanup(self) -> None:
        with trio.CancelScope(shield=True):
            for process in self.processes:
                if process.returncode is None:
                    process.kill()
                await process.wait()
                assert process.stdout is not None
                await process.stdout.aclose()


# -- observing handler runs ----------------------------------------------------


class Runs:
    """Handler runs as their NOTIFYs announce them."""

    def __init__(self) -> None:
        self.exits: dict[str, list[int]] = defaultdict(list)
        """Request key -> pids of the runs that completed it."""
        self.exit_events: list[tuple[str, str, int]] = []
        """``(entity_id, key, pid)`` of each completed run, in order."""
        self._changed = trio.Event()

    async def follow(
        self, listener: Connection, prefix: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await listener.listen(runs_channel(prefix))
        task_status.started()
        while True:
            notification = await listener.wait_notification()
            phase, entity_id, key, pid = notification.payload.split(":")
            if phase == EXIT:
                self.exits[key].append(int(pid))
                self.exit_events.append((entity_id, key, int(pid)))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], bound_s: float = WAIT_S) -> None:
        with trio.fail_after(bound_s):
            while not condition():
                await self._changed.wait()


@attrs.frozen
class Run:
    """One handler run, from the runs table; ``exit`` is None if it never finished."""

    entity_id: str
    key: str
    pid: int
    entry: datetime
    exit: datetime | None


async def load_runs(conn: Connection, prefix: str) -> list[Run]:
    """Every run, by its entry row's order; entries and exits paired by (key, pid)."""
    rows = await conn.fetch(
        f"SELECT entity_id, request_key, pid, phase, at FROM {runs_table(prefix)} ORDER BY seq"
    )
    started: dict[tuple[str, int], list[tuple[str, datetime]]] = defaultdict(list)
    done: list[Run] = []
    for entity_id, key, pid, phase, at in rows:
        if phase == ENTRY:
            started[key, pid].append((entity_id, at))
        else:
            assert phase == EXIT
            assert started[key, pid], f"exit without entry: {key} on {pid}"
            entity, entry = started[key, pid].pop(0)
            assert entity == entity_id
            done.append(Run(entity_id, key, int(pid), entry, at))
    unfinished = [
        Run(entity_id, key, pid, entry, None)
        for (key, pid), runs in started.items()
        for entity_id, entry in runs
    ]
    return sorted(done + unfinished, key=lambda run: run.entry)


def overlaps(runs: Iterable[Run], killed_at: dict[int, datetime]) -> list[str]:
    """Runs of one entity whose [entry, exit] intervals overlap.

    A run of a killed process that never finished ends when its process was
    killed (``killed_at``); an unfinished run of any other process is itself
    a violation, as every live process was stopped gracefully.
    """
    by_entity: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_entity[run.entity_id].append(run)
    violations = []
    for entity_id, entity_runs in by_entity.items():
        busy_until: tuple[datetime, Run] | None = None
        for run in sorted(entity_runs, key=lambda r: r.entry):
            if run.exit is not None:
                end = run.exit
            elif run.pid in killed_at:
                end = max(run.entry, killed_at[run.pid])
            else:
                violations.append(f"{entity_id}: unfinished run on live process: {run}")
                continue
            if busy_until is not None and run.entry < busy_until[0]:
                violations.append(f"{entity_id}: {run} began during {busy_until[1]}")
            if busy_until is None or end > busy_until[0]:
                busy_until = (end, run)
    return violations


def run_counts(runs: Iterable[Run]) -> tuple[Counter[str], Counter[str]]:
    """Per key: how many runs finished, and how many did not."""
    finished: Counter[str] = Counter()
    unfinished: Counter[str] = Counter()
    for run in runs:
        (finished if run.exit is not None else unfinished)[run.key] += 1
    return finished, unfinished


# -- the cluster as a client sees it -------------------------------------------


async def wait_settled(
    conn: Connection, prefix: str, client: Runner, nodes: list[Node]
) -> dict[ShardId, str]:
    """Until the assignment spans exactly ``nodes`` and each holds its shards' leases.

    The client's assignment changes by event; which lock connection holds a
    shard's advisory lock has none, so that part polls the server.
    """
    addresses = {node.address for node in nodes}
    namespace = await lock_namespace(conn, f"{prefix}:group:default")
    with trio.fail_after(WAIT_S):
        while True:
            while set(client.assignment.values()) != addresses:
                await client.changed()
            expected = dict(client.assignment)
            rows = await conn.fetch(
                f"SELECT l.objid::int8, r.address FROM pg_locks AS l JOIN {prefix}runners AS r"
                " ON r.lock_pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.objsubid = 2 AND l.classid = $1::int::oid",
                [namespace],
            )
            held = {ShardId("default", int(index)): address for index, address in rows}
            if held == expected and len(held) == SHARDS:
                return expected
            await trio.sleep(POLL_S)


class Traffic:
    """Senders of persisted requests with unique keys, until told to stop.

    An ask that times out, or fails, is asked again with the same key (at
    most ``MAX_ATTEMPTS`` times): a timeout is the contract's way to say
    "still stored, ask again"; any other failure is recorded for the test
    to report. A tell is acknowledged once it returns.
    """

    def __init__(self, client: Runner, *, tell: bool = False, runs: Runs | None = None) -> None:
        assert not tell or runs is not None, "tells are paced by the runs they cause"
        self.client = client
        self.tell = tell
        self.runs = runs
        self.answers: dict[str, int] = {}
        """Key -> pid that answered (ask) or 0 (tell, acknowledged)."""
        self.entity_of: dict[str, str] = {}
        self.timeouts: list[str] = []
        self.failures: list[str] = []
        self.finished = trio.Event()
        self._stopping = False
        self._changed = trio.Event()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for first in range(SENDERS):
                    nursery.start_soon(self._sender, first)
        finally:
            self.finished.set()

    async def stop(self) -> None:
        """Let every request under way finish, then stop sending."""
        self._stopping = True
        with trio.fail_after(WAIT_S + ASK_TIMEOUT_S * MAX_ATTEMPTS):
            await self.finished.wait()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not condition():
                await self._changed.wait()

    async def wait_for_more(self, count: int) -> None:
        """Until ``count`` more requests are answered (or acknowledged) than now."""
        target = len(self.answers) + count
        await self.wait_until(lambda: len(self.answers) >= target)

    def _unexited(self) -> int:
        assert self.runs is not None
        return sum(1 for key in self.answers if key not in self.runs.exits)

    async def _sender(self, number: int) -> None:
        while not self._stopping:
            if self.tell:
                assert self.runs is not None
                await self.runs.wait_until(lambda: self._unexited() < TELL_WINDOW)
            key = f"k{number}"
            entity_id = TRAFFIC_ENTITIES[number % len(TRAFFIC_ENTITIES)]
            self.entity_of[key] = entity_id
            await self._send(key, entity_id)
            number += SENDERS

    async def _send(self, key: str, entity_id: str) -> None:
        for _ in range(MAX_ATTEMPTS):
            try:
                if self.tell:
                    await self.client.tell(post, entity_id, Post(key, 1))
                    answer = 0
                else:
                    answer = await self.client.ask(
                        post, entity_id, Post(key, 1), timeout=ASK_TIMEOUT_S
                    )
            except SendTimeout:
                self.timeouts.append(key)
            except ClusterError as error:
                self.failures.append(f"{key}: {error!r}")
                # A backoff before asking again, not a synchronisation.
                await trio.sleep(0.1)
            else:
                self.answers[key] = answer
                self._changed.set()
                self._changed = trio.Event()
                return
        self.failures.append(f"{key}: no answer after {MAX_ATTEMPTS} attempts")

    def report(self, name: str) -> None:
        print(
            f"{name}: {len(self.answers)} requests, {len(self.timeouts)} timeouts "
            f"re-asked {self.timeouts[:10]}, {len(self.failures)} failures {self.failures[:10]}"
        )


# -- a test's world --------------------------------------------------------------


@attrs.define
class World:
    prefix: str
    conn: Connection
    storage: PostgresStorage
    runs: Runs
    cluster: Cluster
    client: Runner

    async def settled(self, nodes: list[Node]) -> dict[ShardId, str]:
        return await wait_settled(self.conn, self.prefix, self.client, nodes)

    async def unprocessed(self) -> int:
        count = await self.conn.fetchval(
            f"SELECT count(*) FROM {self.prefix}messages WHERE NOT processed"
        )
        return int(count)


@asynccontextmanager
async def open_world(dsn: str, name: str) -> AsyncIterator[World]:
    """Tables for a fresh prefix, a runs listener, a client-only runner, and a process pool."""
    prefix = f"procs_{name}_{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(dsn, prefix)
    runs = Runs()
    try:
        async with (
            open_connection(dsn) as conn,
            open_connection(dsn) as listener,
            open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
        ):
            await create_runs(conn, prefix)
            async with trio.open_nursery() as nursery:
                await nursery.start(runs.follow, listener, prefix)
                # Hosts nothing: a client, which owns no shard.
                async with open_runner(
                    storage=storage, transport=transport(prefix), config=CONFIG
                ) as client:
                    yield World(prefix, conn, storage, runs, cluster, client)
                nursery.cancel_scope.cancel()
    finally:
        await cluster.cleanup()


def check_exactly_once(runs: list[Run], traffic: Traffic) -> None:
    """Every key ran once, to completion, on the process that answered it."""
    finished, unfinished = run_counts(runs)
    assert not unfinished, unfinished
    assert {key for key, count in finished.items() if count != 1} == set()
    assert set(finished) == set(traffic.answers)
    ran_on = {run.key: run.pid for run in runs}
    if not traffic.tell:
        assert ran_on == traffic.answers
    assert {run.key: run.entity_id for run in runs} == {
        key: traffic.entity_of[key] for key in ran_on
    }


# -- the tests ---------------------------------------------------------------------


async def test_requests_cross_to_the_owning_process(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "route") as world:
        nodes = await world.cluster.start_many(3)
        assignment = await world.settled(nodes)
        pid_at = {node.address: node.pid for node in nodes}
        client = world.client
        entities = [bucket[0] for bucket in entities_per_shard(1)]

        # Volatile: over TCP, to the process owning the entity's shard.
        seen_pids = set()
        for entity_id in entities:
            with trio.fail_after(WAIT_S):
                echoed = await client.ask(echo, entity_id, Echo(f"hi {entity_id}"))
            owner = assignment[shard_of(entity_id)]
            assert (echoed.text, echoed.entity_id) == (f"hi {entity_id}", entity_id)
            assert echoed.address == owner
            assert echoed.pid == pid_at[owner]
            seen_pids.add(echoed.pid)
        assert seen_pids == set(pid_at.values())

        # Persisted ask: through the database, run once by the owner; a
        # duplicate is answered from storage.
        for entity_id in entities:
            owner_pid = pid_at[assignment[shard_of(entity_id)]]
            with trio.fail_after(WAIT_S):
                assert await client.ask(post, entity_id, Post(f"ask-{entity_id}", 1)) == owner_pid
                assert await client.ask(post, entity_id, Post(f"ask-{entity_id}", 9)) == owner_pid

        # Tell: acknowledged once stored, then run once by the owner.
        tells = {f"tell-{entity_id}": entity_id for entity_id in entities}
        for key, entity_id in tells.items():
            await client.tell(post, entity_id, Post(key, 1))
        await world.runs.wait_until(lambda: all(key in world.runs.exits for key in tells))
        # Duplicate tells are stored once, so they never run.
        for key, entity_id in tells.items():
            await client.tell(post, entity_id, Post(key, 1))

        for node in nodes:
            await world.cluster.stop(node)
        runs = await load_runs(world.conn, world.prefix)
        assert sorted((run.key, run.pid, run.exit is not None) for run in runs) == sorted(
            (f"{kind}-{entity_id}", pid_at[assignment[shard_of(entity_id)]], True)
            for kind in ("ask", "tell")
            for entity_id in entities
        )
        assert overlaps(runs, {}) == []
        assert await world.unprocessed() == 0


async def test_a_stream_crosses_to_the_owning_process_and_leaving_it_ends_the_handler(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "stream") as world:
        nodes = await world.cluster.start_many(2)
        assignment = await world.settled(nodes)
        pid_at = {node.address: node.pid for node in nodes}
        client = world.client

        async def check(entity_id: str) -> None:
            owner_pid = pid_at[assignment[shard_of(entity_id)]]
            with trio.fail_after(WAIT_S):
                async with client.stream(
                    ticks, entity_id, Ticks(f"all-{entity_id}", 200), window=8
                ) as chunks:
                    received = [(tick.i, tick.pid) async for tick in chunks]
            assert received == [(i, owner_pid) for i in range(200)]
            # An endless stream left after 20 chunks: its handler's finally ran there.
            key = f"left-{entity_id}"
            with trio.fail_after(WAIT_S):
                async with client.stream(ticks, entity_id, Ticks(key, -1), window=8) as chunks:
                    async for tick in chunks:
                        if tick.i == 19:
                            break
            await world.runs.wait_until(lambda: key in world.runs.exits)
            assert world.runs.exits[key] == [owner_pid]

        for entity_id in [bucket[0] for bucket in entities_per_shard(1)][:4]:
            await check(entity_id)
        for node in nodes:
            await world.cluster.stop(node)


async def test_join_and_leave_under_traffic(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "churn") as world:
        cluster = world.cluster
        nodes = await cluster.start_many(2)
        await world.settled(nodes)
        traffic = Traffic(world.client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)
            await traffic.wait_for_more(20)

            joined = await cluster.start()
            # Serving: it answers requests.
            await traffic.wait_until(lambda: joined.pid in traffic.answers.values())
            await world.settled([*nodes, joined])

            leaving, staying = nodes
            await cluster.stop(leaving)
            await world.settled([staying, joined])
            await traffic.wait_for_more(20)
            await traffic.stop()
        traffic.report("join and leave")
        for node in (staying, joined):
            await cluster.stop(node)

        runs = await load_runs(world.conn, world.prefix)
        check_exactly_once(runs, traffic)
        assert {run.pid for run in runs} == {leaving.pid, staying.pid, joined.pid}
        assert overlaps(runs, {}) == []
        assert traffic.failures == []
        assert await world.unprocessed() == 0


async def test_sigkill_under_persisted_traffic(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "kill") as world:
        cluster = world.cluster
        nodes = await cluster.start_many(3)
        assignment = await world.settled(nodes)
        victim = nodes[0]
        victim_shards = {shard for shard, owner in assignment.items() if owner == victim.address}
        traffic = Traffic(world.client, tell=True, runs=world.runs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)
            # Mid-traffic: the victim is busy with requests.
            await world.runs.wait_until(
                lambda: sum(pid == victim.pid for *_, pid in world.runs.exit_events) >= 10
            )
            killed_at = await world.conn.fetchval("SELECT clock_timestamp()")
            await cluster.kill(victim)
            # Another runner takes over the victim's shards.
            await world.runs.wait_until(
                lambda: any(
                    shard_of(entity_id) in victim_shards and pid != victim.pid
                    for entity_id, _, pid in world.runs.exit_events
                )
            )
            await traffic.wait_for_more(20)
            await traffic.stop()
        traffic.report("sigkill")

        # Every acknowledged tell runs; the database's NOTIFYs say when.
        await world.runs.wait_until(
            lambda: all(key in world.runs.exits for key in traffic.answers), bound_s=20
        )
        survivors = nodes[1:]
        for node in survivors:
            await cluster.stop(node)

        runs = await load_runs(world.conn, world.prefix)
        finished, unfinished = run_counts(runs)
        assert set(traffic.answers) <= set(finished), set(traffic.answers) - set(finished)
        assert set(finished) <= set(traffic.answers)
        assert traffic.failures == []
        assert overlaps(runs, {victim.pid: killed_at}) == []
        # A key ran twice only if the victim had it in hand when it died.
        again = {key for key in finished if finished[key] + unfinished[key] > 1}
        for key in again:
            key_runs = [run for run in runs if run.key == key]
            assert [run.pid == victim.pid for run in key_runs] == [True, False], key_runs
        assert {key for key in unfinished} <= again
        assert all(run.pid == victim.pid for run in runs if run.exit is None)
        assert await world.unprocessed() == 0
        # The stored reply is the last run's: a run fenced off never replied.
        # No runner is left, so these are answered from storage alone.
        last_pid = {run.key: run.pid for run in runs if run.exit is not None}
        with trio.fail_after(WAIT_S):
            for key in sorted(again) + sorted(traffic.answers)[:20]:
                entity_id = traffic.entity_of[key]
                assert await world.client.ask(post, entity_id, Post(key, 1)) == last_pid[key]

        taken_over = [
            run
            for run in runs
            if shard_of(run.entity_id) in victim_shards
            and run.pid != victim.pid
            and run.entry > killed_at
        ]
        first = min(taken_over, key=lambda run: run.entry)
        assert first.exit is not None
        print(
            f"sigkill: {len(traffic.answers)} tells, {len(again)} run twice "
            f"({len(unfinished)} cut short); failover: first request of the victim's "
            f"{len(victim_shards)} shards entered "
            f"{(first.entry - killed_at).total_seconds():.3f} s and finished "
            f"{(first.exit - killed_at).total_seconds():.3f} s after SIGKILL"
        )


async def test_rolling_restart_under_traffic(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "roll") as world:
        cluster = world.cluster
        nodes = await cluster.start_many(3)
        await world.settled(nodes)
        pids = {node.pid for node in nodes}
        traffic = Traffic(world.client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)
            await traffic.wait_for_more(20)
            for index, old in enumerate(list(nodes)):
                started = trio.current_time()
                await cluster.stop(old)
                stopped = trio.current_time()
                nodes[index] = replacement = await cluster.start()
                pids.add(replacement.pid)
                await world.settled(nodes)
                print(
                    f"rolling restart {index}: stopped in {stopped - started:.3f} s, "
                    f"replaced and settled in {trio.current_time() - stopped:.3f} s"
                )
                await traffic.wait_for_more(10)
            await traffic.stop()
        traffic.report("rolling restart")
        for node in nodes:
            await cluster.stop(node)

        runs = await load_runs(world.conn, world.prefix)
        check_exactly_once(runs, traffic)
        assert {run.pid for run in runs} <= pids
        assert overlaps(runs, {}) == []
        assert traffic.failures == []
        assert await world.unprocessed() == 0
