"""Local runtime benchmark: one runner, the in-memory storage (the embedded default).

Run from the repository root::

    python -m benchmarks.local [--quick] [--repeats N] [--json PATH]

What it measures, each repeated (5 times by default, 3 with ``--quick``):

* ``ask`` latency p50/p99: sequential asks to one already-active entity,
  after a warm-up, for a volatile RPC and for a persisted RPC with a unique
  primary key per request;
* throughput with 100 entities and 100 concurrent sender tasks: volatile
  ``ask``, persisted ``ask``, and volatile ``tell``-then-drain (each sender
  tells its own entity N messages, then asks it once: FIFO order means the
  reply comes after all of them);
* activation rate: first messages to 100,000 distinct ids (20,000 with
  ``--quick``) from 100 concurrent senders, and the memory each resident
  idle entity keeps: resident set size (RSS) growth divided by the count,
  in every repeat; and, once per full run (they are deterministic and
  tracing is slow; ``--quick`` skips them), traced Python allocations
  (tracemalloc) divided by the count. Each of these runs in a fresh
  interpreter, so one run's freed memory cannot hide the next one's
  growth, and tracing cannot slow a timed run.

Every figure is set against a baseline measured in the same repeat: the
same payload making a bare Trio round trip between two tasks (a request
memory channel, the reply through a ``trio.Event``) with msgspec encoding
and decoding of payload and reply: the cost floor of an in-process actor
call. Activation and memory are set against the same floor for a fresh
task: its own memory channel, a task draining it, and a first round trip.
The "x baseline" column is a cost multiple: how many times the floor's
time (or memory) one operation costs, so higher means more overhead.
Ratios are paired per repeat and their median reported.

Timing uses ``time.perf_counter_ns``; nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import msgspec
import trio
import trio.testing

from trio_cluster import (
    Entity,
    EntityContext,
    EntityOptions,
    Runner,
    ShardingConfig,
    open_runner,
)

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
    measurement_cells,
    package_versions,
    percentile,
    repeats_of,
    utc_now,
    write_json,
)
from .common import concurrently as _concurrently_among
from .common import markdown_table as _markdown_table

ROOT: Final = Path(__file__).resolve().parent.parent
SENDERS: Final = 100
"""Concurrent sender tasks, and entities, in the throughput and activation runs."""
MAILBOX: Final = EntityOptions().mailbox_capacity
"""The baseline's channel capacity: the same bound as an entity's mailbox."""


# -- the protocol under test ------------------------------------------------------


class Payload(msgspec.Struct, frozen=True):
    n: int
    key: str


Bench = Entity("Bench")
bump = Bench.rpc("bump", Payload, int)
bump_persisted = Bench.rpc(
    "bump_persisted", Payload, int, persisted=True, primary_key=lambda p: p.key
)


class BenchHandler:
    def __init__(self, ctx: EntityContext) -> None:
        self.count = 0

    @bump.handler
    async def on_bump(self, payload: Payload) -> int:
        self.count += payload.n
        return self.count

    @bump_persisted.handler
    async def on_bump_persisted(self, payload: Payload) -> int:
        self.count += payload.n
        return self.count


Send = Callable[[Payload], Awaitable[int]]


# -- the baseline: a bare Trio round trip with msgspec on both sides --------------

_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(Payload)
_reply_decoder = msgspec.msgpack.Decoder(int)


class _Call:
    __slots__ = ("data", "done", "reply")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = trio.Event()
        self.reply = b""


async def _bare_server(receive: trio.MemoryReceiveChannel[_Call]) -> None:
    count = 0
    async with receive:
        async for call in receive:
            payload = _payload_decoder.decode(call.data)
            count += payload.n
            call.reply = _encoder.encode(count)
            call.done.set()


async def _bare_call(send: trio.MemorySendChannel[_Call], payload: Payload) -> int:
    call = _Call(_encoder.encode(payload))
    try:
        send.send_nowait(call)
    except trio.WouldBlock:
        await send.send(call)
    await call.done.wait()
    reply: int = _reply_decoder.decode(call.reply)
    return reply


def _bare_sender(send: trio.MemorySendChannel[_Call]) -> Send:
    async def call(payload: Payload) -> int:
        return await _bare_call(send, payload)

    return call


# -- helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    warmup: int
    latency_samples: int
    throughput_messages: int
    activations: int


FULL: Final = Sizes(warmup=2_000, latency_samples=20_000, throughput_messages=50_000,
                    activations=100_000)  # fmt: skip
QUICK: Final = Sizes(warmup=500, latency_samples=4_000, throughput_messages=10_000,
                     activations=20_000)  # fmt: skip


def rss_bytes() -> int | None:
    """Current resident set size, where /proc says (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


async def _latency(send: Send, sizes: Sizes, prefix: str) -> tuple[float, float]:
    """p50 and p99 in microseconds of ``sizes.latency_samples`` sequential calls."""
    for i in range(sizes.warmup):
        await send(Payload(1, f"{prefix}w{i}"))
    samples: list[int] = []
    append = samples.append
    gc.collect()  # no garbage pending at the start; the collector stays on
    for i in range(sizes.latency_samples):
        payload = Payload(1, f"{prefix}{i}")
        start = clock()
        await send(payload)
        append(clock() - start)
    samples.sort()
    return percentile(samples, 0.50) / 1e3, percentile(samples, 0.99) / 1e3


async def _concurrently(per_sender: Callable[[int], Awaitable[None]]) -> int:
    """Run ``per_sender(i)`` for each of the SENDERS senders; the elapsed nanoseconds."""
    return await _concurrently_among(per_sender, SENDERS)


def _bench_runner(options: EntityOptions | None = None) -> AbstractAsyncContextManager[Runner]:
    return open_runner(Bench.implement(BenchHandler, options))


async def _activate_all(runner: Runner) -> None:
    for i in range(SENDERS):
        await runner.ask(bump, f"e{i}", Payload(1, "warm"))


# -- in-process measurements --------------------------------------------------------


async def baseline_latency(sizes: Sizes) -> tuple[float, float]:
    send, receive = trio.open_memory_channel[_Call](MAILBOX)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_bare_server, receive)
        async with send:
            return await _latency(_bare_sender(send), sizes, "b")


async def baseline_throughput(sizes: Sizes) -> float:
    per_sender = sizes.throughput_messages // SENDERS
    async with trio.open_nursery() as nursery:
        channels: list[trio.MemorySendChannel[_Call]] = []
        for _ in range(SENDERS):
            send, receive = trio.open_memory_channel[_Call](MAILBOX)
            channels.append(send)
            nursery.start_soon(_bare_server, receive)
        for send in channels:  # the first call to each, as for the entities
            await _bare_call(send, Payload(1, "warm"))

        async def sender(i: int) -> None:
            for j in range(per_sender):
                await _bare_call(channels[(i + j) % SENDERS], Payload(1, f"{i}-{j}"))

        elapsed = await _concurrently(sender)
        for send in channels:
            await send.aclose()
    return per_sender * SENDERS / (elapsed / 1e9)


async def ask_latency(sizes: Sizes, *, persisted: bool) -> tuple[float, float]:
    rpc = bump_persisted if persisted else bump
    async with _bench_runner() as runner:

        async def send(payload: Payload) -> int:
            return await runner.ask(rpc, "one", payload)

        return await _latency(send, sizes, "k")


async def ask_throughput(sizes: Sizes, *, persisted: bool) -> float:
    rpc = bump_persisted if persisted else bump
    per_sender = sizes.throughput_messages // SENDERS
    async with _bench_runner() as runner:
        await _activate_all(runner)

        async def sender(i: int) -> None:
            for j in range(per_sender):
                await runner.ask(rpc, f"e{(i + j) % SENDERS}", Payload(1, f"{i}-{j}"))

        elapsed = await _concurrently(sender)
    return per_sender * SENDERS / (elapsed / 1e9)


async def tell_throughput(sizes: Sizes) -> float:
    """Sender i tells entity i its share, then asks it once; counts every message."""
    per_sender = sizes.throughput_messages // SENDERS
    # A volatile tell is accepted into the mailbox without waiting, so a
    # sender outruns its entity: the mailbox must hold a sender's whole share.
    options = EntityOptions(mailbox_capacity=per_sender + 1)
    async with _bench_runner(options) as runner:
        await _activate_all(runner)

        async def sender(i: int) -> None:
            entity_id = f"e{i}"
            for j in range(per_sender - 1):
                await runner.tell(bump, entity_id, Payload(1, f"{i}-{j}"))
            await runner.ask(bump, entity_id, Payload(1, f"{i}-last"))

        elapsed = await _concurrently(sender)
    return per_sender * SENDERS / (elapsed / 1e9)


# -- activation and memory: each in a fresh interpreter ---------------------------


class ProbeResult(msgspec.Struct):
    count: int
    elapsed_ns: int
    rss_delta: int | None = None
    traced_delta: int | None = None


Report = Callable[[ProbeResult], None]


async def _probe_entities(count: int, traced: bool, report: Report) -> None:
    # Room for every id (and the warm-up's), so none is passivated on the way.
    config = ShardingConfig(max_resident_entities=count + SENDERS)
    async with open_runner(Bench.implement(BenchHandler), config=config) as runner:
        # Warm the paths (and the shards' structures) on ids outside the range.
        for i in range(SENDERS):
            await runner.ask(bump, f"warm{i}", Payload(1, "warm"))

        async def sender(i: int) -> None:
            for entity in range(i, count, SENDERS):
                await runner.ask(bump, f"a{entity}", Payload(1, "first"))

        report(await _measure_activation(runner, sender, count, traced, SENDERS))


async def _probe_bare(count: int, traced: bool, report: Report) -> None:
    """The floor: per id, its own channel and a task draining it, then a first call."""
    async with trio.open_nursery() as nursery:
        tasks: dict[str, trio.MemorySendChannel[_Call]] = {}

        async def call(entity_id: str, payload: Payload) -> int:
            send = tasks.get(entity_id)
            if send is None:
                send, receive = trio.open_memory_channel[_Call](MAILBOX)
                tasks[entity_id] = send
                nursery.start_soon(_bare_server, receive)
            return await _bare_call(send, payload)

        for i in range(SENDERS):
            await call(f"warm{i}", Payload(1, "warm"))

        async def sender(i: int) -> None:
            for entity in range(i, count, SENDERS):
                await call(f"a{entity}", Payload(1, "first"))

        report(await _measure_activation(None, sender, count, traced, SENDERS))
        for send in tasks.values():
            send.close()


async def _measure_activation(
    runner: Runner | None,
    sender: Callable[[int], Awaitable[None]],
    count: int,
    traced: bool,
    already: int,
) -> ProbeResult:
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    rss_before = rss_bytes()
    traced_before = tracemalloc.get_traced_memory()[0] if traced else 0
    elapsed = await _concurrently(sender)
    # Let every task reach its idle wait before weighing it.
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    rss_after = rss_bytes()
    traced_after = tracemalloc.get_traced_memory()[0] if traced else 0
    if runner is not None:
        resident = runner.snapshot().resident_entities
        if resident != count + already:
            raise RuntimeError(f"expected {count + already} resident entities, found {resident}")
    rss_delta = None if rss_before is None or rss_after is None else rss_after - rss_before
    return ProbeResult(
        count=count,
        elapsed_ns=elapsed,
        rss_delta=None if traced else rss_delta,
        traced_delta=traced_after - traced_before if traced else None,
    )


def run_probe(spec: str, count: int) -> None:
    """The child side: one probe, its result as one JSON line on stdout."""
    target, _, mode = spec.partition(":")
    if target not in ("entity", "bare") or mode not in ("timed", "traced"):
        raise SystemExit(f"unknown probe {spec!r}")
    traced = mode == "traced"
    if traced:
        tracemalloc.start()
    probe = _probe_entities if target == "entity" else _probe_bare

    def report(result: ProbeResult) -> None:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        sys.stdout.flush()
        # This process is thrown away: skip tearing down the tasks just weighed.
        os._exit(0)

    trio.run(probe, count, traced, report)


def probe(spec: str, count: int) -> ProbeResult:
    """The parent side: run one probe in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.local", "--probe", spec, "--count", str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe {spec} failed:\n{done.stderr}")
    return msgspec.json.decode(done.stdout.strip().splitlines()[-1], type=ProbeResult)


# -- the report ---------------------------------------------------------------------


METRICS: Final = (
    Metric("baseline.rtt_p50", "Baseline round trip p50", "µs", rate=False),
    Metric("baseline.rtt_p99", "Baseline round trip p99", "µs", rate=False),
    Metric("baseline.throughput", "Baseline throughput (100 tasks x 100 senders)", "msg/s",
           rate=True),
    Metric("baseline.spawn_rate", "Baseline fresh task + channel + first call", "tasks/s",
           rate=True),
    Metric("baseline.task_traced", "Baseline idle task + channel, traced", "B", rate=False),
    Metric("baseline.task_rss", "Baseline idle task + channel, RSS", "B", rate=False),
    Metric("ask.volatile.p50", "ask latency p50, volatile", "µs", False, "baseline.rtt_p50"),
    Metric("ask.volatile.p99", "ask latency p99, volatile", "µs", False, "baseline.rtt_p99"),
    Metric("ask.persisted.p50", "ask latency p50, persisted + primary key", "µs", False,
           "baseline.rtt_p50"),
    Metric("ask.persisted.p99", "ask latency p99, persisted + primary key", "µs", False,
           "baseline.rtt_p99"),
    Metric("throughput.ask_volatile", "Throughput, ask, volatile", "msg/s", True,
           "baseline.throughput"),
    Metric("throughput.ask_persisted", "Throughput, ask, persisted + primary key", "msg/s",
           True, "baseline.throughput"),
    Metric("throughput.tell_drain", "Throughput, tell then drain, volatile", "msg/s", True,
           "baseline.throughput"),
    Metric("activation.rate", "Activation rate (first message to a new id)", "entities/s",
           True, "baseline.spawn_rate"),
    Metric("memory.entity_traced", "Memory per idle resident entity, traced", "B", False,
           "baseline.task_traced"),
    Metric("memory.entity_rss", "Memory per idle resident entity, RSS", "B", False,
           "baseline.task_rss"),
)  # fmt: skip


def measure(
    sizes: Sizes, repeats: int, *, traced_memory: bool, log: Callable[[str], None]
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {m.key: [] for m in METRICS}
    count = sizes.activations

    def record(key: str, value: float) -> None:
        values[key].append(value)

    for repeat in range(1, repeats + 1):
        log(f"repeat {repeat}/{repeats}: latency")
        p50, p99 = trio.run(baseline_latency, sizes)
        record("baseline.rtt_p50", p50)
        record("baseline.rtt_p99", p99)
        for persisted, name in ((False, "volatile"), (True, "persisted")):
            p50, p99 = trio.run(partial(ask_latency, sizes, persisted=persisted))
            record(f"ask.{name}.p50", p50)
            record(f"ask.{name}.p99", p99)

        log(f"repeat {repeat}/{repeats}: throughput")
        record("baseline.throughput", trio.run(baseline_throughput, sizes))
        for persisted, name in ((False, "volatile"), (True, "persisted")):
            rate = trio.run(partial(ask_throughput, sizes, persisted=persisted))
            record(f"throughput.ask_{name}", rate)
        record("throughput.tell_drain", trio.run(tell_throughput, sizes))

        log(f"repeat {repeat}/{repeats}: activation and RSS ({count:,} ids)")
        for target, rate_key, rss_key in (
            ("bare", "baseline.spawn_rate", "baseline.task_rss"),
            ("entity", "activation.rate", "memory.entity_rss"),
        ):
            timed = probe(f"{target}:timed", count)
            record(rate_key, count / (timed.elapsed_ns / 1e9))
            if timed.rss_delta is not None:
                record(rss_key, timed.rss_delta / count)

    if traced_memory:
        # Traced allocations are deterministic (equal to the byte across
        # repeats in trial runs) and tracing is slow: measured once.
        log(f"traced memory ({count:,} ids)")
        for target, traced_key in (
            ("bare", "baseline.task_traced"),
            ("entity", "memory.entity_traced"),
        ):
            traced = probe(f"{target}:traced", count)
            if traced.traced_delta is not None:
                record(traced_key, traced.traced_delta / count)
    return values


def _format(value: float, unit: str) -> str:
    if unit == "µs":
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def markdown_table(values: Values) -> str:
    def rows() -> Iterator[list[str]]:
        for metric in METRICS:
            series = values[metric.key]
            if not series:
                continue
            multiples = cost_multiples(metric, values)
            ratio = f"{statistics.median(multiples):.1f}" if multiples else "(baseline)"
            fmt = partial(_format, unit=metric.unit)
            yield [*measurement_cells(metric.label, metric.unit, series, fmt), ratio]

    return _markdown_table(
        [*MEASUREMENT_COLUMNS, "x baseline"], [*MEASUREMENT_ALIGNMENT, True], rows()
    )


def environment() -> dict[str, Any]:
    return {
        "date": utc_now(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": package_versions(("trio", "msgspec", "trio-cluster")),
    }


def report_json(values: Values, sizes: Sizes, repeats: int, elapsed_s: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        if values[metric.key]:
            metrics[metric.key] = cost_summary(metric, values)
    return {
        "environment": environment(),
        "sizes": vars(sizes) | {"senders": SENDERS, "repeats": repeats},
        "elapsed_s": elapsed_s,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(
        "python -m benchmarks.local",
        "Benchmark one trio_cluster runner with the in-memory storage.",
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        run_probe(args.probe, args.count)
        return

    sizes = QUICK if args.quick else FULL
    repeats = repeats_of(parser, args)
    started = clock()
    values = measure(sizes, repeats, traced_memory=not args.quick, log=log)
    elapsed_s = (clock() - started) / 1e9
    env = environment()
    print(
        f"trio_cluster local benchmark: Python {env['python']}, {env['cpus']} CPUs, "
        f"{repeats} repeats, median (min, max); {elapsed_s:.0f} s\n"
    )
    print(markdown_table(values))
    if args.json is not None:
        write_json(args.json, report_json(values, sizes, repeats, elapsed_s))


if __name__ == "__main__":
    main()
