"""Cross-runner benchmark: runner processes on PostgreSQL, talking over sockets.

Run from the repository root::

    python -m benchmarks.cluster [--quick] [--repeats N] [--json PATH] [--markdown PATH]
                                 [--no-durability]

It starts a throwaway PostgreSQL server (``trio_cluster.pgdriver.server``)
with stock durability (fsync, synchronous_commit and full_page_writes on:
what users run; ``--no-durability`` turns them off, as the tests run it,
and the report's header says which), with pg_stat_statements loaded, then
in every repeat
(5 by default, 3 with ``--quick``), on fresh tables:

* two runner processes (``benchmarks/bench_node.py``) hosting a small entity
  with a volatile ``echo`` RPC and a persisted ``persist`` RPC with a
  primary key;
* a client: a client-only runner (no implementations, so it owns no shard)
  inside this benchmark process, on the same storage and transport. Every
  request it sends is therefore cross-process: the benchmark checks, in
  the client's ``.assignment``, that each entity it measures is owned by
  one of the runner processes. A volatile request goes over the client's
  socket to the owner and its reply comes back on it; a persisted one is
  stored by the client, announced to the owner by NOTIFY, and its reply
  stored and announced back.

What it measures, each repeat:

* the raw baseline, first: a bare Trio loopback TCP round trip of the
  cluster's own frames (a ``Request`` carrying an ``Envelope``, answered by
  a ``Reply``; msgspec on both sides) between this process and a bare echo
  process (``bench_node --echo``): sequential p50/p99, and frames per
  second with 100 sender tasks sharing one connection (100 in flight),
  with the echo process's CPU time per frame;
* cross-runner ``ask`` latency p50/p95/p99/max, sequential, after a
  warm-up, volatile and persisted, round-robin over 10 entities;
* throughput with 100 entities and 100 concurrent senders, volatile and
  persisted, with the p99 each message saw under that load, and the CPU
  time per message: each runner's ``time.process_time()`` (asked for over
  its stdin) divided by the messages it processed, this process's for the
  client, and the PostgreSQL server's (``/proc``, every process of that
  server) divided by the messages, and their sum, with the cores it kept
  busy over the run (all of them at 2.0 on this machine: the rate is then
  bounded by CPU); for persisted messages also the statements, plans,
  transactions and WAL flushes PostgreSQL counted (``benchmarks/pgstats.py``),
  per message;
* failover: SIGKILL one runner, then the time until the client's
  assignment no longer names it, until every one of its shards answers a
  volatile ask again (one probe entity per shard, re-asked every few
  milliseconds), and until a persisted ask sent right after the kill is
  answered; once without restarting the killed runner, and once with a
  replacement started straight after the kill.

Ratios ("x baseline") are cost multiples against the same repeat's raw
baseline: latency / raw latency, raw rate / rate, CPU / raw CPU; the
median of the per-repeat ratios. Every process (the server, two runners,
the client, the echo process) shares one machine. Nothing here asserts on
a time; the targets are reported PASS or MISS.
"""

from __future__ import annotations

import gc
import operator
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from trio_cluster import (
    ClusterError,
    Rpc,
    Runner,
    ShardId,
    ShardingConfig,
    TransportConfig,
    open_runner,
)
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.frames import FrameDecoder, Reply, Request, encode_into
from trio_cluster.demo.orchestrate import Child, Children, python_module
from trio_cluster.pgdriver import open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.schema import lock_namespace
from trio_cluster.postgres.storage import open_postgres_storage

from .bench_node import Bench, Payload, echo, persist
from .common import (
    MEASUREMENT_ALIGNMENT,
    MEASUREMENT_COLUMNS,
    Metric,
    Values,
    bench_parser,
    clock,
    cost_multiples,
    cost_summary,
    log,
    markdown_table,
    measurement_cells,
    package_versions,
    percentile,
    repeats_of,
    utc_now,
    write_json,
)
from .common import concurrently as _concurrently_among
from .pgstats import SERVER_SETTINGS, SETTLE_S, enable_statements, server_cpu, snapshot
from .plot import write_latency_plot

ROOT: Final = Path(__file__).resolve().parent.parent
SHARDS: Final = 100
SENDERS: Final = 100
"""Concurrent sender tasks, and entities, in the throughput runs."""
LATENCY_ENTITIES: Final = 10
ASK_TIMEOUT: Final = 5.0
"""Seconds before a measured ask is counted as failed (it then leaves no sample)."""
PROBE_TIMEOUT: Final = 0.1
"""A failover probe gives up and asks again after this: the measuring granularity."""
OUTAGE_TIMEOUT: Final = 60.0
LOCK_POLL: Final = 0.005
"""How often failover reads pg_locks for the dead runner's shards held again."""
STARTUP_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class Sizes:
    warmup: int
    volatile_samples: int
    persisted_samples: int
    volatile_messages: int
    persisted_messages: int


FULL: Final = Sizes(warmup=500, volatile_samples=10_000, persisted_samples=2_000,
                    volatile_messages=100_000, persisted_messages=6_000)  # fmt: skip
QUICK: Final = Sizes(warmup=100, volatile_samples=1_000, persisted_samples=300,
                     volatile_messages=5_000, persisted_messages=1_000)  # fmt: skip

Record = Callable[[str, float], None]


# -- processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    cpu: float
    processed: int
    shards: int
    refused: int


class Node:
    """A ``bench_node`` process: a runner, or the raw echo server."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.address = ""

    async def ready(self) -> None:
        with trio.fail_after(STARTUP_TIMEOUT):
            line = await self.child.expect("ready ", echo=log)
        self.address = line.split()[1]

    async def status(self) -> Status:
        _, cpu, processed, shards, refused = (await self.child.ask("status")).split()
        return Status(float(cpu), int(processed), int(shards), int(refused))


_names = count(1)


def start_node(children: Children, dsn: str, prefix: str, shards: int = SHARDS) -> Node:
    args = [dsn, "--prefix", prefix, "--shards", str(shards)]
    child = children.start(
        f"runner-{next(_names)}",
        python_module("benchmarks.bench_node", *args),
        cwd=ROOT,
        stdin=True,
    )
    return Node(child)


# -- the raw baseline: the cluster's frames over a bare Trio TCP connection ---------

_encode = msgspec.msgpack.Encoder().encode
_decode_int = msgspec.msgpack.Decoder(int).decode


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply = b""


class RawLink:
    """One connection, a reader and a writer task: what a PeerLink does, without the runtime."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._wake = trio.Event()
        self._waiting: dict[int, _Slot] = {}
        self._ids = count(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            task_status.started()
            await self._read()
            nursery.cancel_scope.cancel()

    async def call(self, payload: Payload) -> int:
        request_id = next(self._ids)
        envelope = Envelope(
            request_id=request_id,
            entity_type=Bench.name,
            entity_id="raw",
            shard_group="default",
            shard_index=0,
            rpc=echo.name,
            payload=_encode(payload),
        )
        slot = self._waiting[request_id] = _Slot()
        encode_into(Request(envelope), self._out)
        self._wake.set()
        await slot.event.wait()
        reply: int = _decode_int(slot.reply)
        return reply

    async def _read(self) -> None:
        while True:
            data = await self._stream.receive_some(256 * 1024)
            if not data:
                return
            for message in self._decoder.feed(data):
                if isinstance(message, Reply):
                    slot = self._waiting.pop(message.request_id)
                    slot.reply = message.reply
                    slot.event.set()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if self._out:
                data = bytes(self._out)
                self._out.clear()
                await self._stream.send_all(data)


Keep = Callable[[str, list[int]], None]
"""Hands the sorted nanosecond samples of one latency run to the plot."""


async def raw_baseline(echo_node: Node, sizes: Sizes, record: Record, keep: Keep) -> None:
    host, _, port = echo_node.address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream, trio.open_nursery() as nursery:
        link = RawLink(stream)
        await nursery.start(link.run)

        async def send(i: int) -> bool:
            await link.call(Payload(1, f"r{i}"))
            return True

        samples = await sequential(send, sizes.warmup, sizes.volatile_samples)
        keep("raw Trio loopback round trip (baseline)", samples)
        record("raw.p50", percentile(samples, 0.50) / 1e3)
        record("raw.p99", percentile(samples, 0.99) / 1e3)
        per_sender = sizes.volatile_messages // SENDERS

        async def sender(i: int) -> None:
            for j in range(per_sender):
                await link.call(Payload(1, f"{i}-{j}"))

        before = await echo_node.status()
        client_before = time.process_time()
        elapsed = await concurrently(sender)
        client_cpu = time.process_time() - client_before
        after = await echo_node.status()
        frames = per_sender * SENDERS
        record("raw.rate", frames / (elapsed / 1e9))
        record(
            "raw.cpu_server", (after.cpu - before.cpu) / (after.processed - before.processed) * 1e6
        )
        record("raw.cpu_client", client_cpu / frames * 1e6)
        nursery.cancel_scope.cancel()


# -- measuring helpers -------------------------------------------------------------


async def sequential(send: Callable[[int], Awaitable[bool]], warmup: int, n: int) -> list[int]:
    """Sorted nanosecond samples of ``n`` sequential sends after ``warmup`` untimed ones.

    A send returning False failed (it is counted by the caller) and leaves no sample.
    """
    for i in range(warmup):
        await send(-1 - i)
    samples: list[int] = []
    gc.collect()
    for i in range(n):
        start = clock()
        if await send(i):
            samples.append(clock() - start)
    samples.sort()
    if not samples:
        raise RuntimeError("every measured call failed")
    return samples


async def concurrently(per_sender: Callable[[int], Awaitable[None]]) -> int:
    """Run ``per_sender(i)`` for each of the SENDERS senders; the elapsed nanoseconds."""
    return await _concurrently_among(per_sender, SENDERS)


def ids_for_shards(
    prefix: str, shards: set[ShardId], per_group: int = SHARDS
) -> dict[ShardId, str]:
    """One entity id per shard in ``shards`` (of a layout of ``per_group`` shards)."""
    found: dict[ShardId, str] = {}
    for n in count():
        if len(found) == len(shards):
            return found
        entity_id = f"{prefix}{n}"
        shard = Bench.shard_of(entity_id, per_group)
        if shard in shards and shard not in found:
            found[shard] = entity_id
    raise AssertionError("unreachable")


# -- one repeat's cluster ------------------------------------------------------------


@dataclass
class Cluster:
    children: Children
    server: ThrowawayPostgres
    dsn: str
    prefix: str
    client: Runner
    nodes: list[Node] = field(default_factory=list)
    failed_asks: int = 0
    statements: bool = False
    """Whether the server counts statements (pg_stat_statements is loaded)."""
    shards: int = SHARDS

    def owner(self, entity_id: str) -> str | None:
        return self.client.assignment.get(Bench.shard_of(entity_id, self.shards))

    def check_cross_process(self, entity_ids: list[str]) -> None:
        """Every measured entity lives in a runner process other than this one."""
        addresses = {node.address for node in self.nodes}
        for entity_id in entity_ids:
            owner = self.owner(entity_id)
            if owner not in addresses or owner == self.client.address:
                raise RuntimeError(f"{entity_id} is owned by {owner}, not a runner process")

    async def settled(self) -> None:
        """Wait until each runner process owns exactly what the client's assignment says."""
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                counts = Counter(self.client.assignment.values())
                if set(counts) == {node.address for node in self.nodes}:
                    statuses = [await node.status() for node in self.nodes]
                    if all(
                        s.shards == counts[n.address]
                        for s, n in zip(statuses, self.nodes, strict=True)
                    ):
                        return
                await trio.sleep(0.05)

    async def ask(self, rpc: Rpc[Payload, int], entity_id: str, payload: Payload) -> bool:
        try:
            await self.client.ask(rpc, entity_id, payload, timeout=ASK_TIMEOUT)
        except ClusterError as error:
            self.failed_asks += 1
            log(f"ask {rpc.name} {entity_id} failed: {error!r}")
            return False
        return True

    async def statuses(self) -> list[Status]:
        return [await node.status() for node in self.nodes]


@asynccontextmanager
async def open_cluster(
    children: Children,
    server: ThrowawayPostgres,
    prefix: str,
    *,
    runners: int = 2,
    shards: int = SHARDS,
) -> AsyncIterator[Cluster]:
    """``runners`` runner processes and a client here, on ``shards`` shards, settled."""
    dsn = server.dsn
    nodes = [start_node(children, dsn, prefix, shards) for _ in range(runners)]
    for node in nodes:
        await node.ready()
    config = ShardingConfig(shards_per_group=shards)
    async with (
        open_postgres_storage(dsn, prefix=prefix) as storage,
        open_runner(
            storage=storage, config=config, transport=TransportConfig(cluster=prefix)
        ) as client,
    ):
        async with open_connection(dsn) as conn:
            statements = await enable_statements(conn)
        cluster = Cluster(
            children, server, dsn, prefix, client, nodes, statements=statements, shards=shards
        )
        await cluster.settled()
        try:
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    for node in cluster.nodes:
                        nursery.start_soon(node.child.stop, 30.0)


# -- cross-runner measurements -------------------------------------------------------


async def ask_latency(
    cluster: Cluster, sizes: Sizes, record: Record, keep: Keep, *, persisted: bool
) -> None:
    name = "persisted" if persisted else "volatile"
    rpc = persist if persisted else echo
    entities = [f"lat-{i}" for i in range(LATENCY_ENTITIES)]
    cluster.check_cross_process(entities)

    async def send(i: int) -> bool:
        return await cluster.ask(rpc, entities[i % len(entities)], Payload(1, f"{name}-{i}"))

    n = sizes.persisted_samples if persisted else sizes.volatile_samples
    samples = await sequential(send, sizes.warmup if not persisted else sizes.warmup // 2, n)
    keep(f"{name} ask, cross-runner", samples)
    for q, label in ((0.50, "p50"), (0.95, "p95"), (0.99, "p99"), (1.0, "max")):
        record(f"{name}.{label}", percentile(samples, q) / 1e3)


async def throughput(cluster: Cluster, sizes: Sizes, record: Record, *, persisted: bool) -> None:
    name = "persisted" if persisted else "volatile"
    rpc = persist if persisted else echo
    entities = [f"t-{i}" for i in range(SENDERS)]
    cluster.check_cross_process(entities)
    for entity_id in entities:  # activate them all first
        await cluster.ask(echo, entity_id, Payload(0, "warm"))
    per_sender = (sizes.persisted_messages if persisted else sizes.volatile_messages) // SENDERS
    latencies: list[int] = []

    async def sender(i: int) -> None:
        for j in range(per_sender):
            start = clock()
            if await cluster.ask(rpc, entities[(i + j) % SENDERS], Payload(1, f"{name}{i}-{j}")):
                latencies.append(clock() - start)

    async with open_connection(cluster.dsn) as stats:
        if persisted:
            await trio.sleep(SETTLE_S)
        counters_before = await snapshot(stats, statements=cluster.statements)
        before = await cluster.statuses()
        client_before = time.process_time()
        server_before = server_cpu(cluster.server)
        elapsed = await concurrently(sender)
        client_cpu = time.process_time() - client_before
        server_after = server_cpu(cluster.server)
        after = await cluster.statuses()
        if persisted:
            await trio.sleep(SETTLE_S)
        counters_after = await snapshot(stats, statements=cluster.statements)
    messages = per_sender * SENDERS
    if persisted:
        for key, value in counters_after.per_message(counters_before, messages).items():
            record(f"pg.{name}.{key}", value)
    processed = sum(a.processed - b.processed for a, b in zip(after, before, strict=True))
    runner_cpu = sum(a.cpu - b.cpu for a, b in zip(after, before, strict=True))
    latencies.sort()
    record(f"throughput.{name}", messages / (elapsed / 1e9))
    record(f"load.{name}.p99", percentile(latencies, 0.99) / 1e3)
    record(f"cpu.{name}.runner", runner_cpu / max(processed, 1) * 1e6)
    each = [
        (a.cpu - b.cpu) / max(a.processed - b.processed, 1) * 1e6
        for a, b in zip(after, before, strict=True)
    ]
    record(f"cpu.{name}.runner_max", max(each))
    record(f"cpu.{name}.client", client_cpu / messages * 1e6)
    if server_before is not None and server_after is not None:
        server = server_after - server_before
        record(f"cpu.{name}.server", server / messages * 1e6)
        # What the whole machine spent: against its cores, it says whether the
        # rate is bounded by CPU (every process of the run shares them).
        total = runner_cpu + client_cpu + server
        record(f"cpu.{name}.total", total / messages * 1e6)
        record(f"busy.{name}", total / (elapsed / 1e9))


@dataclass
class Outage:
    killed_at: int
    assignment: float | None = None
    first_shard: float | None = None
    all_shards: float | None = None
    persisted: float | None = None
    held: float | None = None
    """When every one of its shards' locks was held again (by a survivor), seen in pg_locks."""
    first_held: float | None = None
    """When the first of them was: the death noticed, plus one acquisition."""


async def held_again(
    dsn: str, namespace: int, shards: set[ShardId], victim_pid: int, first: Callable[[], None]
) -> None:
    """Return once every one of ``shards`` has its lock held by a backend not ``victim_pid``;
    ``first()`` is called when the first of them is."""
    indexes = ",".join(str(shard.index) for shard in shards)
    any_held = False
    async with open_connection(dsn) as conn:
        # Polled: the server has no event for a lock being taken.
        while True:
            held = await conn.fetchval(
                "SELECT count(DISTINCT objid) FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND objsubid = 2 AND classid = $1::int::oid AND pid <> $3"
                " AND objid::int8 = ANY (string_to_array($2, ',')::int8[])",
                [namespace, indexes, victim_pid],
            )
            if held and not any_held:
                any_held = True
                first()
            if held == len(shards):
                return
            await trio.sleep(LOCK_POLL)


async def failover(
    cluster: Cluster, victim: Node, *, restart: bool, tag: str
) -> tuple[Outage, Node | None]:
    """SIGKILL ``victim`` and time its shards' return; with ``restart``, start a replacement."""
    client = cluster.client
    shards = {s for s, owner in client.assignment.items() if owner == victim.address}
    probes = ids_for_shards(f"{tag}-p", shards, cluster.shards)
    outage_entity = ids_for_shards(f"{tag}-o", {min(shards)}, cluster.shards)[min(shards)]
    served: list[float] = []
    (group,) = {shard.group for shard in shards}
    async with open_connection(cluster.dsn) as conn:
        namespace = await lock_namespace(conn, f"{cluster.prefix}:group:{group}")
        victim_pid = await conn.fetchval(
            f"SELECT lock_pid FROM {cluster.prefix}runners WHERE address = $1", [victim.address]
        )
    victim.child.kill()
    killed = clock()
    result = Outage(killed)
    await victim.child.wait()

    def since_kill() -> float:
        return (clock() - killed) / 1e9

    replacement = None
    if restart:
        replacement = start_node(cluster.children, cluster.dsn, cluster.prefix, cluster.shards)

    async def watch_assignment() -> None:
        while victim.address in client.assignment.values():
            await client.changed()
        result.assignment = since_kill()

    async def probe(entity_id: str) -> None:
        while True:
            try:
                await client.ask(echo, entity_id, Payload(1, "probe"), timeout=PROBE_TIMEOUT)
            except ClusterError:
                await trio.sleep(0.002)
            else:
                served.append(since_kill())
                return

    async def persisted_during_outage() -> None:
        await client.ask(
            persist, outage_entity, Payload(1, f"{tag}-outage"), timeout=OUTAGE_TIMEOUT
        )
        result.persisted = since_kill()

    def first_held() -> None:
        result.first_held = since_kill()

    async def watch_locks() -> None:
        await held_again(cluster.dsn, namespace, shards, victim_pid, first_held)
        result.held = since_kill()

    with trio.fail_after(OUTAGE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_assignment)
            nursery.start_soon(watch_locks)
            nursery.start_soon(persisted_during_outage)
            for entity_id in probes.values():
                nursery.start_soon(probe, entity_id)
    result.first_shard = min(served)
    result.all_shards = max(served)
    cluster.nodes.remove(victim)
    kind = "restart" if restart else "failover"
    log(
        f"  {kind}: {len(shards)} shards; assignment {result.assignment:.3f} s, first shard "
        f"{result.first_shard:.3f} s, all {result.all_shards:.3f} s, persisted ask "
        f"{result.persisted:.3f} s, first held again {result.first_held:.3f} s,"
        f" all held again {result.held:.3f} s"
    )
    return result, replacement


async def run_repeat(
    children: Children, server: ThrowawayPostgres, echo_node: Node, *, repeat: int,
    sizes: Sizes, record: Record, keep: Keep,
) -> int:  # fmt: skip
    """One repeat on fresh tables; the number of failed asks."""
    log(f"repeat {repeat}: raw baseline")
    await raw_baseline(echo_node, sizes, record, keep)
    prefix = f"cbench{os.getpid() % 100000}_{repeat}_"
    log(f"repeat {repeat}: starting two runners ({prefix})")
    async with open_cluster(children, server, prefix) as cluster:
        log(f"repeat {repeat}: latency")
        await ask_latency(cluster, sizes, record, keep, persisted=False)
        await ask_latency(cluster, sizes, record, keep, persisted=True)
        log(f"repeat {repeat}: throughput")
        await throughput(cluster, sizes, record, persisted=False)
        await throughput(cluster, sizes, record, persisted=True)

        log(f"repeat {repeat}: failover")
        killed, _ = await failover(cluster, cluster.nodes[1], restart=False, tag=f"f{repeat}")
        back = start_node(children, cluster.dsn, prefix)
        await back.ready()
        cluster.nodes.append(back)
        await cluster.settled()
        restarted, replacement = await failover(
            cluster, cluster.nodes[1], restart=True, tag=f"r{repeat}"
        )
        assert replacement is not None
        await replacement.ready()
        cluster.nodes.append(replacement)
        await cluster.settled()
        record("restart.settled", (clock() - restarted.killed_at) / 1e9)
        for kind, result in (("failover", killed), ("restart", restarted)):
            for key in ("assignment", "all_shards", "persisted"):
                value = getattr(result, key)
                if value is not None:
                    record(f"{kind}.{key}", value * 1e3)
        return cluster.failed_asks


# -- the report ---------------------------------------------------------------------


METRICS: Final = (
    Metric("raw.p50", "Raw TCP round trip p50 (baseline)", "µs"),
    Metric("raw.p99", "Raw TCP round trip p99 (baseline)", "µs"),
    Metric("raw.rate", "Raw pipelined frames, 100 in flight (baseline)", "frames/s", rate=True),
    Metric("raw.cpu_server", "Raw echo process CPU per frame (baseline)", "µs"),
    Metric("raw.cpu_client", "Raw sender CPU per frame (baseline)", "µs"),
    Metric("volatile.p50", "Cross-runner ask p50, volatile", "µs", baseline="raw.p50"),
    Metric("volatile.p95", "Cross-runner ask p95, volatile", "µs", baseline="raw.p50"),
    Metric("volatile.p99", "Cross-runner ask p99, volatile", "µs", baseline="raw.p99"),
    Metric("volatile.max", "Cross-runner ask max, volatile", "µs"),
    Metric("persisted.p50", "Cross-runner ask p50, persisted + primary key", "µs",
           baseline="raw.p50"),
    Metric("persisted.p95", "Cross-runner ask p95, persisted + primary key", "µs",
           baseline="raw.p50"),
    Metric("persisted.p99", "Cross-runner ask p99, persisted + primary key", "µs",
           baseline="raw.p99"),
    Metric("persisted.max", "Cross-runner ask max, persisted + primary key", "µs"),
    Metric("throughput.volatile", "Throughput, volatile ask, 100 senders x 100 entities",
           "msg/s", rate=True, baseline="raw.rate"),
    Metric("throughput.persisted", "Throughput, persisted ask, 100 senders x 100 entities",
           "msg/s", rate=True, baseline="raw.rate"),
    Metric("load.volatile.p99", "Ask p99 under that load, volatile", "µs"),
    Metric("load.persisted.p99", "Ask p99 under that load, persisted", "µs"),
    Metric("cpu.volatile.runner", "Runner CPU per volatile message, both runners", "µs",
           baseline="raw.cpu_server"),
    Metric("cpu.volatile.runner_max", "Runner CPU per volatile message, costlier runner",
           "µs", baseline="raw.cpu_server"),
    Metric("cpu.volatile.client", "Client CPU per volatile message", "µs",
           baseline="raw.cpu_client"),
    Metric("cpu.volatile.server", "PostgreSQL CPU per volatile message", "µs"),
    Metric("cpu.volatile.total", "CPU per volatile message, all processes", "µs"),
    Metric("busy.volatile", "Cores busy during the volatile run, all processes", "count"),
    Metric("cpu.persisted.runner", "Runner CPU per persisted message, both runners", "µs",
           baseline="raw.cpu_server"),
    Metric("cpu.persisted.runner_max", "Runner CPU per persisted message, costlier runner",
           "µs", baseline="raw.cpu_server"),
    Metric("cpu.persisted.client", "Client CPU per persisted message", "µs",
           baseline="raw.cpu_client"),
    Metric("cpu.persisted.server", "PostgreSQL CPU per persisted message", "µs"),
    Metric("cpu.persisted.total", "CPU per persisted message, all processes", "µs"),
    Metric("busy.persisted", "Cores busy during the persisted run, all processes", "count"),
    Metric("pg.persisted.statements", "PostgreSQL statements per persisted message", "count"),
    Metric("pg.persisted.plans", "PostgreSQL plans made per persisted message", "count"),
    Metric("pg.persisted.transactions", "PostgreSQL transactions per persisted message",
           "count"),
    Metric("pg.persisted.wal_flushes", "PostgreSQL WAL flushes per persisted message",
           "count"),
    Metric("failover.assignment", "Failover: client's assignment drops the killed runner",
           "ms"),
    Metric("failover.all_shards", "Failover: all its shards serve again", "ms"),
    Metric("failover.persisted", "Failover: persisted ask sent during the outage answered",
           "ms"),
    Metric("restart.all_shards", "Kill + restart: all its shards serve again", "ms"),
    Metric("restart.persisted", "Kill + restart: persisted ask sent during the outage answered",
           "ms"),
    Metric("restart.settled", "Kill + restart: replacement serving its share, since the kill",
           "s"),
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    label: str
    key: str
    op: str
    """``<``, ``<=`` or ``>=``, applied to the median (or to the median cost multiple)."""
    threshold: float
    unit: str
    multiple: bool = False


TARGETS: Final = (
    Target("Volatile p50 within 2x raw round trip", "volatile.p50", "<=", 2.0, "x", True),
    Target("Volatile p99 < 0.5 ms", "volatile.p99", "<", 500, "µs"),
    Target("Persisted p99 < 4 ms", "persisted.p99", "<", 4000, "µs"),
    Target("Persisted p99 <= 3 ms (issue 11)", "persisted.p99", "<=", 3000, "µs"),
    Target("Persisted p99 at saturation <= 50 ms (issue 11)", "load.persisted.p99", "<=",
           50_000, "µs"),
    Target("PostgreSQL CPU per persisted message <= 300 µs (issue 11)",
           "cpu.persisted.server", "<=", 300, "µs"),
    Target("WAL flushes per persisted message <= 0.3 (issue 11)", "pg.persisted.wal_flushes",
           "<=", 0.3, "count"),
    Target(">= 30,000 msg/s volatile", "throughput.volatile", ">=", 30_000, "msg/s"),
    Target(">= 5,000 msg/s persisted", "throughput.persisted", ">=", 5_000, "msg/s"),
    Target("< 0.1 ms CPU per volatile message, each runner", "cpu.volatile.runner_max", "<",
           100, "µs"),
    Target("Failover < 2 s: shards serve again", "failover.all_shards", "<", 2000, "ms"),
    Target("Failover < 2 s: persisted ask answered", "failover.persisted", "<", 2000, "ms"),
    Target("Kill + restart < 2 s: shards serve again", "restart.all_shards", "<", 2000, "ms"),
    Target("Kill + restart < 2 s: persisted ask answered", "restart.persisted", "<", 2000, "ms"),
)  # fmt: skip
SLA_KEYS: Final = ("volatile.p99", "persisted.p99")
LOADED_KEYS: Final = ("load.volatile.p99", "load.persisted.p99")
SLA_LIMIT_US: Final = 100_000


def format_figure(value: float, unit: str) -> str:
    if unit in ("s", "count"):
        return f"{value:,.2f}"
    if unit in ("µs", "ms") and value < 100:
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def results_table(values: Values) -> str:
    def rows() -> Iterator[list[str]]:
        for metric in METRICS:
            series = values.get(metric.key, [])
            if not series:
                continue
            multiples = cost_multiples(metric, values)
            if metric.key.startswith("raw."):
                ratio = "(baseline)"
            else:
                ratio = f"{statistics.median(multiples):.1f}" if multiples else ""
            fmt = partial(format_figure, unit=metric.unit)
            yield [*measurement_cells(metric.label, metric.unit, series, fmt), ratio]

    return markdown_table(
        [*MEASUREMENT_COLUMNS, "x baseline"], [*MEASUREMENT_ALIGNMENT, True], rows()
    )


def evaluate(target: Target, values: dict[str, list[float]]) -> tuple[float | None, bool | None]:
    """The measured median (or median multiple), and whether it meets the target."""
    if target.multiple:
        metric = next(m for m in METRICS if m.key == target.key)
        series = cost_multiples(metric, values)
    else:
        series = values.get(target.key, [])
    if not series:
        return None, None
    measured = statistics.median(series)
    compare = {"<": operator.lt, "<=": operator.le, ">=": operator.ge}[target.op]
    return measured, compare(measured, target.threshold)


def targets_table(values: Values) -> str:
    def rows() -> Iterator[list[str]]:
        for target in TARGETS:
            measured, met = evaluate(target, values)
            shown = (
                "-" if measured is None else f"{format_figure(measured, target.unit)} {target.unit}"
            )
            if target.multiple and measured is not None:
                shown = f"{measured:.1f}x"
            result = "n/a" if met is None else ("PASS" if met else "MISS")
            yield [target.label, shown, result]

    columns = ("Target", "Measured (median)", "Result")
    return markdown_table(columns, (False, True, False), rows())


def sla(values: dict[str, list[float]]) -> tuple[bool, str]:
    """The seed SLA, on the worst repeat of the sequential cross-runner p99s.

    The p99s under the throughput runs are shown beside it but not judged:
    with 100 senders always in flight at saturation, each ask waits behind
    the others (Little's law: 100 / rate on average), so they measure the
    queue the benchmark builds, not delivery.
    """
    worst = {key: max(values[key]) for key in SLA_KEYS if values.get(key)}
    met = bool(worst) and all(value < SLA_LIMIT_US for value in worst.values())
    parts = ", ".join(f"{key} {value / 1e3:.2f} ms" for key, value in worst.items())
    loaded = ", ".join(
        f"{key} {max(values[key]) / 1e3:.1f} ms" for key in LOADED_KEYS if values.get(key)
    )
    line = (
        f"Seed SLA, p99 cross-runner delivery < 100 ms: {'PASS' if met else 'MISS'} "
        f"(worst repeat, sequential asks: {parts}; not judged, at saturation with "
        f"{SENDERS} asks in flight: {loaded})"
    )
    return met, line


def environment(server_version: str) -> dict[str, Any]:
    return {
        "date": utc_now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "postgresql": server_version,
        "versions": package_versions(("trio", "msgspec", "psycopg", "trio-cluster")),
    }


def report_json(
    values: dict[str, list[float]], sizes: Sizes, *, repeats: int, elapsed_s: float,
    failed_asks: int, env: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        if values.get(metric.key):
            metrics[metric.key] = cost_summary(metric, values)
    targets = []
    for target in TARGETS:
        measured, met = evaluate(target, values)
        targets.append(
            {"label": target.label, "key": target.key, "op": target.op,
             "threshold": target.threshold, "unit": target.unit, "multiple": target.multiple,
             "measured": measured, "met": met}
        )  # fmt: skip
    met, line = sla(values)
    return {
        "environment": env,
        "sizes": vars(sizes) | {"senders": SENDERS, "repeats": repeats, "shards": SHARDS},
        "elapsed_s": elapsed_s,
        "failed_asks": failed_asks,
        "metrics": metrics,
        "targets": targets,
        "sla": {"met": met, "line": line},
    }


def durability_label(durable: bool) -> str:
    """How the report names the server's durability: every figure depends on it."""
    if durable:
        return "stock durability: fsync, synchronous_commit, full_page_writes on"
    return "durability OFF: fsync, synchronous_commit, full_page_writes off"


async def server_version(dsn: str) -> str:
    async with open_connection(dsn) as conn:
        return str(await conn.fetchval("SHOW server_version"))


async def measure_all(
    children: Children,
    server: ThrowawayPostgres,
    sizes: Sizes,
    repeats: int,
    distributions: dict[str, list[int]],
) -> tuple[dict[str, list[float]], int]:
    values: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        values.setdefault(key, []).append(value)

    def keep(label: str, samples: list[int]) -> None:
        distributions[label] = samples  # the last repeat's

    echo_node = Node(
        children.start("echo", python_module("benchmarks.bench_node", "--echo"), cwd=ROOT,
                       stdin=True)
    )  # fmt: skip
    await echo_node.ready()
    failed = 0
    for repeat in range(1, repeats + 1):
        failed += await run_repeat(
            children, server, echo_node, repeat=repeat, sizes=sizes, record=record, keep=keep
        )
    await echo_node.child.stop(5.0)
    return values, failed


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(
        "python -m benchmarks.cluster",
        "Benchmark trio_cluster runner processes on PostgreSQL over sockets.",
        repeats_help="repeats (default 5, or 3 with --quick)",
    )
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables")
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", help="also draw the latency distributions (PNG)"
    )
    parser.add_argument(
        "--no-durability",
        action="store_true",
        help="run PostgreSQL with fsync, synchronous_commit and full_page_writes off"
        " (the default is stock durability, as users run it)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = repeats_of(parser, args)
    durable = not args.no_durability

    started = clock()
    # Children exit first: every runner is gone before the server stops.
    server = ThrowawayPostgres(durable=durable, settings=SERVER_SETTINGS)
    with server, Children() as children:
        version = trio.run(server_version, server.dsn)
        distributions: dict[str, list[int]] = {}
        values, failed = trio.run(measure_all, children, server, sizes, repeats, distributions)
    elapsed_s = (clock() - started) / 1e9
    env = environment(version) | {"durability": durability_label(durable)}
    header = (
        f"trio_cluster cross-runner benchmark: Python {env['python']}, {env['cpus']} CPUs, "
        f"PostgreSQL {version} ({env['durability']}), 2 runner processes + client-only "
        "runner in the benchmark "
        f"process, {repeats} repeats, median (min, max); {elapsed_s:.0f} s; "
        f"failed asks: {failed}"
    )
    _, sla_line = sla(values)
    text = "\n\n".join([header, results_table(values), targets_table(values), sla_line])
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.plot is not None:
        if write_latency_plot(distributions, args.plot):
            print(f"latency plot: {args.plot}")
        else:
            print("latency plot skipped: matplotlib is not installed (pip install '.[bench]')")
    if args.json is not None:
        report = report_json(
            values, sizes, repeats=repeats, elapsed_s=elapsed_s, failed_asks=failed, env=env
        )
        write_json(args.json, report)


if __name__ == "__main__":
    main()
