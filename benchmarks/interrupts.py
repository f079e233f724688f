"""What issue 14's interrupts and acknowledged tells cost, across runner processes.

Run from the repository root::

    python -m benchmarks.interrupts [--quick] [--repeats N] [--json PATH] [--markdown PATH]

It reuses the cross-runner harness of ``benchmarks.cluster``: a throwaway
PostgreSQL server with stock durability, two ``bench_node`` runner processes
and a client-only runner in this process, so that every request crosses to
another process. Each repeat, on fresh tables:

* interrupt latency: an ``ask`` of the ``hang`` RPC (its handler waits until
  cancelled) is cancelled a fixed delay after it was sent (long enough for
  its handler to have started); the time from the caller's
  ``CancelScope.cancel()`` to the handler's ``finally`` on the other
  runner, both read on the system-wide ``CLOCK_MONOTONIC`` (one machine), so
  the two processes' timestamps compare. Volatile (an ``Interrupt`` frame
  on the link) and persisted with ``interrupt=True`` (the mark stored, its
  NOTIFY to the owner). A request cancelled before its handler started
  leaves no sample and is counted as missed;
* ``tell`` throughput with 100 senders to 100 entities, acknowledged
  (``ack=True``, the default: each waits for the owner's queued-or-refused
  reply) and fire-and-forget (``ack=False``): the rate at which the senders'
  calls return, the rate at which the runners handled them (their processed
  counts, asked over stdin, until they reach every tell sent and not
  refused, or stop moving), how many were refused (raised ``MailboxFull``),
  how many were lost unheard, and how many the owners counted as refused
  (``MailboxFull`` and others, heard or not); and the client's and runners'
  CPU per tell. A volatile ``ask`` of the same RPC by the same senders is
  measured beside them, for reference.

Medians over the repeats (5, or 3 with ``--quick``). Nothing here asserts on a time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Literal, get_args

import trio

from trio_cluster import ClusterError, Rpc
from trio_cluster.demo.orchestrate import Children
from trio_cluster.pgdriver.server import ThrowawayPostgres

from .bench_node import Payload, echo, hang, hang_persisted
from .cluster import (
    ASK_TIMEOUT,
    LATENCY_ENTITIES,
    SENDERS,
    Cluster,
    Status,
    concurrently,
    durability_label,
    environment,
    format_figure,
    open_cluster,
    server_version,
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
    markdown_table,
    measurement_cells,
    percentile,
    repeats_of,
    write_json,
)
from .pgstats import SERVER_SETTINGS


@dataclass(frozen=True)
class Sizes:
    interrupts: int
    """Interrupted asks per kind per repeat."""
    tells: int
    """Tells per kind per repeat."""


FULL: Final = Sizes(interrupts=200, tells=20_000)
QUICK: Final = Sizes(interrupts=50, tells=5_000)
CANCEL_AFTER_S: Final = {False: 0.02, True: 0.1}
"""Volatile, persisted: how long after sending an ask is cancelled (its handler is running)."""
DRAIN_POLL_S: Final = 0.02
DRAIN_IDLE_S: Final = 1.0
"""The runners' processed counts not moving for this long: what was not handled is lost."""


def monotonic_ns() -> int:
    """System-wide on Linux: comparable with the runner process's reading."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


async def interrupt_latency(
    cluster: Cluster, sizes: Sizes, values: Values, *, persisted: bool
) -> None:
    name = "persisted" if persisted else "volatile"
    rpc: Rpc[Payload, int] = hang_persisted if persisted else hang
    entities = [f"int-{i}" for i in range(LATENCY_ENTITIES)]
    cluster.check_cross_process(entities)
    cancelled_at: dict[str, int] = {}
    failed = 0
    for i in range(sizes.interrupts):
        key = f"{name}-{i}"
        scope = trio.CancelScope()

        async def ask(
            entity_id: str = entities[i % len(entities)],
            key: str = key,
            scope: trio.CancelScope = scope,
        ) -> None:
            nonlocal failed
            with scope:
                try:
                    await cluster.client.ask(
                        rpc, entity_id, Payload(1, key), timeout=ASK_TIMEOUT, interrupt=True
                    )
                except ClusterError as error:
                    failed += 1
                    log(f"interrupted ask {key} failed: {error!r}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(CANCEL_AFTER_S[persisted])  # pacing, not synchronisation
            cancelled_at[key] = monotonic_ns()
            scope.cancel()
    observed = await handler_cancellations(cluster, set(cancelled_at))
    samples = sorted(observed[key] - cancelled_at[key] for key in observed)
    if not samples:
        raise RuntimeError(f"no {name} handler was seen cancelled")
    add(values, f"interrupt.{name}.p50", percentile(samples, 0.50) / 1e3)
    add(values, f"interrupt.{name}.p99", percentile(samples, 0.99) / 1e3)
    add(values, f"interrupt.{name}.missed", sizes.interrupts - len(samples) + failed)


async def handler_cancellations(cluster: Cluster, keys: set[str]) -> dict[str, int]:
    """Key -> when its handler was cancelled, for each of ``keys`` the runners saw cancelled.

    A handler is cancelled a little after its caller withdrew it, so the
    runners are asked until every key is in, or nothing new came for a while.
    """
    seen: dict[str, int] = {}
    idle_since = clock()
    while len(seen) < len(keys) and clock() - idle_since < DRAIN_IDLE_S * 1e9:
        before = len(seen)
        for node in cluster.nodes:
            _, _, *noted = (await node.child.ask("cancelled")).split()
            for item in noted:
                key, _, ns = item.rpartition(":")
                if key in keys:
                    seen[key] = int(ns)
        if len(seen) > before:
            idle_since = clock()
        await trio.sleep(DRAIN_POLL_S)
    return seen


SendKind = Literal["fire", "ack", "ask"]
"""``tell(ack=False)``, ``tell()`` (acknowledged), and ``ask`` for reference."""


async def send_throughput(cluster: Cluster, sizes: Sizes, values: Values, name: SendKind) -> None:
    entities = [f"tell-{i}" for i in range(SENDERS)]
    cluster.check_cross_process(entities)
    for entity_id in entities:  # activate them all first
        await cluster.ask(echo, entity_id, Payload(0, "warm"))
    per_sender = sizes.tells // SENDERS
    refused = 0

    async def sender(i: int) -> None:
        nonlocal refused
        for j in range(per_sender):
            entity_id = entities[(i + j) % SENDERS]
            try:
                if name == "ask":
                    await cluster.client.ask(echo, entity_id, Payload(1, ""))
                else:
                    await cluster.client.tell(echo, entity_id, Payload(1, ""), ack=name == "ack")
            except ClusterError:
                refused += 1

    before = await cluster.statuses()
    client_before = time.process_time()
    started = clock()
    elapsed = await concurrently(sender)
    client_cpu = time.process_time() - client_before
    sent = per_sender * SENDERS
    processed, handled_ns = await drain(cluster, before, sent - refused, started)
    after = await cluster.statuses()
    runner_cpu = sum(a.cpu - b.cpu for a, b in zip(after, before, strict=True))
    add(values, f"tell.{name}.sent", sent / (elapsed / 1e9))
    add(values, f"tell.{name}.handled", processed / (handled_ns / 1e9))
    add(values, f"tell.{name}.refused", refused)
    add(values, f"tell.{name}.lost", sent - refused - processed)
    add(
        values,
        f"tell.{name}.owner_refused",
        sum(a.refused - b.refused for a, b in zip(after, before, strict=True)),
    )
    add(values, f"tell.{name}.cpu_client", client_cpu / sent * 1e6)
    add(values, f"tell.{name}.cpu_runner", runner_cpu / max(processed, 1) * 1e6)


async def drain(
    cluster: Cluster, before: list[Status], expected: int, started: int
) -> tuple[int, int]:
    """Tells the runners handled since ``before``, and the ns from ``started`` to the last one."""
    base = sum(s.processed for s in before)
    processed, last = 0, clock()
    while processed < expected and clock() - last < DRAIN_IDLE_S * 1e9:
        now = sum(s.processed for s in await cluster.statuses()) - base
        if now > processed:
            processed, last = now, clock()
        else:
            await trio.sleep(DRAIN_POLL_S)
    return processed, last - started


def add(values: Values, key: str, value: float) -> None:
    values.setdefault(key, []).append(value)


async def measure_all(
    children: Children, server: ThrowawayPostgres, sizes: Sizes, repeats: int
) -> Values:
    values: Values = {}
    for repeat in range(1, repeats + 1):
        prefix = f"ibench{os.getpid() % 100000}_{repeat}_"
        log(f"repeat {repeat}: starting two runners ({prefix})")
        async with open_cluster(children, server, prefix) as cluster:
            log(f"repeat {repeat}: interrupts")
            await interrupt_latency(cluster, sizes, values, persisted=False)
            await interrupt_latency(cluster, sizes, values, persisted=True)
            log(f"repeat {repeat}: tells")
            for kind in get_args(SendKind):
                await send_throughput(cluster, sizes, values, kind)
    return values


METRICS: Final = (
    Metric("interrupt.volatile.p50", "Interrupt latency p50, volatile ask", "µs"),
    Metric("interrupt.volatile.p99", "Interrupt latency p99, volatile ask", "µs"),
    Metric("interrupt.volatile.missed", "Interrupted before the handler started (or failed)",
           "count"),
    Metric("interrupt.persisted.p50", "Interrupt latency p50, persisted ask (interrupt=True)",
           "µs"),
    Metric("interrupt.persisted.p99", "Interrupt latency p99, persisted ask (interrupt=True)",
           "µs"),
    Metric("interrupt.persisted.missed", "Interrupted before the handler started (or failed)",
           "count"),
    Metric("tell.fire.sent", "Tell ack=False: calls returned, 100 senders (baseline)",
           "msg/s", rate=True),
    Metric("tell.fire.handled", "Tell ack=False: handled by the runners", "msg/s", rate=True),
    Metric("tell.fire.refused", "Tell ack=False: refusals raised", "count"),
    Metric("tell.fire.lost", "Tell ack=False: lost unheard", "count"),
    Metric("tell.fire.owner_refused", "Tell ack=False: refused by the owners", "count"),
    Metric("tell.fire.cpu_client", "Tell ack=False: client CPU per tell", "µs"),
    Metric("tell.fire.cpu_runner", "Tell ack=False: runner CPU per handled tell", "µs"),
    Metric("tell.ack.sent", "Tell ack=True: calls returned, 100 senders", "msg/s", rate=True,
           baseline="tell.fire.sent"),
    Metric("tell.ack.handled", "Tell ack=True: handled by the runners", "msg/s", rate=True,
           baseline="tell.fire.handled"),
    Metric("tell.ack.refused", "Tell ack=True: refusals raised (MailboxFull)", "count"),
    Metric("tell.ack.lost", "Tell ack=True: lost unheard", "count"),
    Metric("tell.ack.owner_refused", "Tell ack=True: refused by the owners", "count"),
    Metric("tell.ack.cpu_client", "Tell ack=True: client CPU per tell", "µs",
           baseline="tell.fire.cpu_client"),
    Metric("tell.ack.cpu_runner", "Tell ack=True: runner CPU per handled tell", "µs",
           baseline="tell.fire.cpu_runner"),
    Metric("tell.ask.sent", "Volatile ask, same senders (reference)", "msg/s", rate=True,
           baseline="tell.fire.sent"),
    Metric("tell.ask.refused", "Volatile ask: refusals raised", "count"),
    Metric("tell.ask.cpu_client", "Volatile ask: client CPU per ask", "µs",
           baseline="tell.fire.cpu_client"),
    Metric("tell.ask.cpu_runner", "Volatile ask: runner CPU per ask", "µs",
           baseline="tell.fire.cpu_runner"),
)  # fmt: skip


def results_table(values: Values) -> str:
    def rows() -> Iterator[list[str]]:
        for metric in METRICS:
            series = values.get(metric.key, [])
            if not series:
                continue
            multiples = cost_multiples(metric, values)
            ratio = f"{statistics.median(multiples):.2f}" if multiples else ""
            fmt = partial(format_figure, unit=metric.unit)
            yield [*measurement_cells(metric.label, metric.unit, series, fmt), ratio]

    return markdown_table(
        [*MEASUREMENT_COLUMNS, "x ack=False"], [*MEASUREMENT_ALIGNMENT, True], rows()
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(
        "python -m benchmarks.interrupts",
        "Benchmark interrupts and acknowledged tells across runner processes on PostgreSQL.",
        repeats_help="repeats (default 5, or 3 with --quick)",
    )
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = repeats_of(parser, args)
    started = clock()
    server = ThrowawayPostgres(durable=True, settings=SERVER_SETTINGS)
    with server, Children() as children:
        version = trio.run(server_version, server.dsn)
        values = trio.run(measure_all, children, server, sizes, repeats)
    elapsed_s = (clock() - started) / 1e9
    env = environment(version) | {"durability": durability_label(True)}
    header = (
        f"trio_cluster interrupts and tells: Python {env['python']}, {env['cpus']} CPUs, "
        f"PostgreSQL {version} ({env['durability']}), 2 runner processes + client-only "
        f"runner in the benchmark process, {repeats} repeats, median (min, max); "
        f"{elapsed_s:.0f} s"
    )
    text = "\n\n".join([header, results_table(values)])
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.json is not None:
        metrics = {m.key: cost_summary(m, values) for m in METRICS if values.get(m.key)}
        write_json(args.json, {"environment": env, "sizes": vars(sizes), "metrics": metrics})


if __name__ == "__main__":
    main()
