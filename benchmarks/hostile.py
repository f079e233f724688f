"""What a flood of unauthenticated 16 MiB frames costs a runner, and its legitimate callers.

Run from the repository root::

    python -m benchmarks.hostile [--mode plain|secret|tls] [--connections 200]
        [--seconds S] [--quick] [--repeats N] [--json PATH] [--test-limits]

Every repeat starts a fresh target process (``tests.hostile.target``: an owner
runner hosting the test entity and a client-only caller runner, both on one
MemoryStorage, talking over their real socket on 127.0.0.1), warms it up, then
measures two windows of ``--seconds`` each (5, or 2 with ``--quick``):

* **baseline**: nobody attacks; the caller asks the owner volatile echoes one
  at a time, back to back. Each ask's latency is measured in the target around
  ``ask``; the target's RSS growth is its peak (``VmHWM``, reset before the
  window) over its RSS before the window.
* **attack**: ``--connections`` (200) attacker tasks in this process each open
  a connection to the owner and, before any handshake, send the 4-byte header
  of a 16 MiB frame and then its body in 64 KiB chunks; a connection the target
  drops is opened again at once, so the pressure lasts the whole window. Once
  every attacker has made its first attempt, the same echoes are asked again.
  Recorded: the latencies, the RSS growth over the whole attack, how many bytes
  and connections the attackers got out, and failed asks.

The printed Markdown table gives the median, min and max over the repeats of
each figure, and for the attack's p50 and p99 the median multiple of the same
repeat's baseline. The target runs with the library's default limits (and
ping interval) unless ``--test-limits`` gives it the hostile tests' small ones.
An attack that drives the target's RSS up by more than ``--max-growth-mib``
(default 3072) is cut short, so that a library without the pre-authentication
frame limit does not take the machine down with it; the report says so.

Nothing here asserts: ``tests/hostile`` asserts behaviour, this prints figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import (
    MEASUREMENT_ALIGNMENT,
    MEASUREMENT_COLUMNS,
    Values,
    bench_parser,
    log,
    markdown_table,
    measurement_cells,
    multiples_against,
    package_versions,
    percentile,
    repeats_of,
    series_summary,
    utc_now,
    write_json,
)
from tests.hostile.app import MODES, Limits, Mode, Probe, ProbeResult
from tests.hostile.harness import MiB, TargetProcess, open_target
from tests.hostile.peer import start_of_huge_frame
from trio_cluster import ShardingConfig, TransportConfig

_TRANSPORT, _SHARDING = TransportConfig(), ShardingConfig()
LIBRARY_DEFAULTS = Limits(
    ping_interval=_TRANSPORT.ping_interval,
    handshake_timeout=_TRANSPORT.handshake_timeout,
    max_unsent=_TRANSPORT.max_unsent,
    max_inbound_connections=_TRANSPORT.max_inbound_connections,
    max_handshakes=_TRANSPORT.max_handshakes,
    max_frame_size=_TRANSPORT.max_frame_size,
    max_scheduled_per_shard=_SHARDING.max_scheduled_per_shard,
    mailbox_capacity=_SHARDING.entity_defaults.mailbox_capacity,
    max_idle_time=_SHARDING.entity_defaults.max_idle_time,
)
"""The library's own defaults, as a deployment would run it."""
ASK_TIMEOUT_S = 10.0
ASKS_PER_BATCH = 250
RAMP_UP_S = 30.0
"""Bound on every attacker making its first connection attempt before the window opens."""


@dataclass
class Attack:
    """What the attackers did, summed over their tasks."""

    bytes_sent: int = 0
    connections: int = 0
    refused: int = 0
    first_attempts: int = 0
    cut_short: bool = False
    ramped_up: trio.Event = field(default_factory=trio.Event)

    def add(self, size: int) -> None:
        self.bytes_sent += size


@dataclass
class Phase:
    """One measured window of a repeat: the legitimate asks' latencies and the memory cost."""

    latencies_ns: list[int]
    errors: list[str]
    rss_growth: int
    attack: Attack = field(default_factory=Attack)

    def p(self, q: float) -> float:
        """A latency percentile in milliseconds (nan when no ask succeeded)."""
        if not self.latencies_ns:
            return float("nan")
        return percentile(sorted(self.latencies_ns), q) / 1e6


async def measure(target: TargetProcess, asks: int) -> tuple[list[int], list[str]]:
    """``asks`` sequential echoes from the caller to the owner, each timed in the target."""
    tag = target.new_tag("bench")
    await target.send(Probe(tag, count=asks, size=0, senders=1, timeout=ASK_TIMEOUT_S))
    result = await target.result(tag, ProbeResult, timeout=asks * ASK_TIMEOUT_S)
    return result.latencies_ns, result.errors


async def traffic(target: TargetProcess, seconds: float) -> tuple[list[int], list[str]]:
    """Sequential legitimate asks, back to back, for a window of ``seconds`` (the measurement)."""
    latencies: list[int] = []
    errors: list[str] = []
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline and target.alive:
        batch, failed = await measure(target, ASKS_PER_BATCH)
        latencies += batch
        errors += failed
    return latencies, errors


async def flood(
    target: TargetProcess,
    connections: int,
    attack: Attack,
    over: Callable[[], bool],
) -> None:
    """``connections`` attackers, each reconnecting as soon as the target drops it; until cancelled.

    A connection whose whole frame went out is held open until the target
    closes it, as an attacker waiting out the handshake timeout would.
    ``attack.ramped_up`` is set once every attacker has made its first attempt.
    """

    async def attacker() -> None:
        first = True

        def opened(header_sent: bool) -> None:
            nonlocal first
            attack.connections += 1
            attack.refused += not header_sent
            if first:
                first = False
                attack.first_attempts += 1
                if attack.first_attempts == connections:
                    attack.ramped_up.set()

        while not over():
            peer = await start_of_huge_frame(
                target.ready.owner, target.credentials, over, sent=attack.add, opened=opened
            )
            if peer is None:
                continue
            try:
                if not peer.closed and not over():
                    await peer.wait_closed(3600)
            finally:
                await peer.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(attacker)


async def one_repeat(
    mode: Mode, limits: Limits, connections: int, seconds: float, max_growth: int
) -> tuple[Phase, Phase]:
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as workdir:
        async with open_target(mode, Path(workdir), limits) as target:
            # Warm up: the first asks of a process pay for imports and first activations.
            await measure(target, 200)

            before = target.rss()
            target.reset_peak()
            latencies, errors = await traffic(target, seconds)
            baseline = Phase(latencies, errors, target.peak() - before)

            attack = Attack()
            before = target.rss()
            target.reset_peak()
            checks = 0

            def over() -> bool:
                nonlocal checks
                checks += 1
                # /proc is read every 16 chunks (1 MiB) sent, not every chunk.
                if checks % 16 == 0 and target.alive and target.peak() - before > max_growth:
                    attack.cut_short = True
                return attack.cut_short or not target.alive

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood, target, connections, attack, over)
                with trio.move_on_after(RAMP_UP_S):
                    await attack.ramped_up.wait()
                latencies, errors = await traffic(target, seconds)
                nursery.cancel_scope.cancel()
            if not target.alive:
                errors.append(f"target died: exit code {target.process.returncode}")
                attacked = Phase(latencies, errors, 0, attack)
            else:
                attacked = Phase(latencies, errors, target.peak() - before, attack)
                await target.stop()
            return baseline, attacked


METRICS = (
    ("baseline_p50", "Legitimate ask p50, no attack", "ms"),
    ("baseline_p99", "Legitimate ask p99, no attack", "ms"),
    ("attack_p50", "Legitimate ask p50, under attack", "ms"),
    ("attack_p99", "Legitimate ask p99, under attack", "ms"),
    ("baseline_rss", "Target RSS growth, no attack", "MiB"),
    ("attack_rss", "Target RSS growth, under attack", "MiB"),
    ("attack_bytes", "Attack bytes sent, before any handshake", "MiB"),
    ("attack_connections", "Attack connections opened", "count"),
    ("asks", "Legitimate asks answered, under attack", "count"),
    ("errors", "Legitimate asks failed, under attack", "count"),
)


def record(values: Values, baseline: Phase, attacked: Phase) -> None:
    figures = {
        "baseline_p50": baseline.p(0.50),
        "baseline_p99": baseline.p(0.99),
        "attack_p50": attacked.p(0.50),
        "attack_p99": attacked.p(0.99),
        "baseline_rss": baseline.rss_growth / MiB,
        "attack_rss": attacked.rss_growth / MiB,
        "attack_bytes": attacked.attack.bytes_sent / MiB,
        "attack_connections": float(attacked.attack.connections),
        "asks": float(len(attacked.latencies_ns)),
        "errors": float(len(attacked.errors)),
    }
    for key, value in figures.items():
        values.setdefault(key, []).append(value)


def table(values: Values) -> str:
    rows = []
    for key, label, unit in METRICS:
        cells = measurement_cells(label, unit, values[key], lambda v: f"{v:,.2f}")
        multiple = ""
        base = {"attack_p50": "baseline_p50", "attack_p99": "baseline_p99"}.get(key)
        if base is not None:
            multiples = multiples_against(values, key, base, rate=False)
            if multiples:
                multiple = f"{sorted(multiples)[len(multiples) // 2]:.1f}x"
        rows.append([*cells, multiple])
    return markdown_table(
        [*MEASUREMENT_COLUMNS, "x baseline"], [*MEASUREMENT_ALIGNMENT, True], rows
    )


async def run(args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    limits = Limits() if args.test_limits else LIBRARY_DEFAULTS
    values: Values = {}
    notes: list[str] = []
    for repeat in range(repeats):
        log(f"repeat {repeat + 1}/{repeats}: {args.mode}, {args.connections} connections")
        baseline, attacked = await one_repeat(
            args.mode, limits, args.connections, args.seconds, args.max_growth_mib * MiB
        )
        record(values, baseline, attacked)
        if attacked.attack.cut_short:
            notes.append(f"repeat {repeat + 1}: attack cut short at {args.max_growth_mib} MiB")
        notes.extend(f"repeat {repeat + 1}: {error}" for error in attacked.errors[:3])
    return {"values": values, "notes": notes}


def main(argv: list[str]) -> None:
    parser = bench_parser(
        "python -m benchmarks.hostile",
        "Memory and latency cost of 200 unauthenticated connections sending 16 MiB frames.",
        repeats_help="repeats (default 5, 3 with --quick)",
    )
    parser.add_argument("--mode", choices=MODES, default="plain")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument(
        "--seconds", type=float, help="length of each measured window (default 5, 2 quick)"
    )
    parser.add_argument("--max-growth-mib", type=int, default=3072)
    parser.add_argument(
        "--test-limits", action="store_true", help="the hostile tests' small limits"
    )
    args = parser.parse_args(argv)
    repeats = repeats_of(parser, args)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    result = trio.run(run, args, repeats)
    values: Values = result["values"]
    print(
        f"## Hostile peers: {args.connections} pre-authentication connections sending"
        f" 16 MiB frames ({args.mode} mode, {repeats} repeats,"
        f" {'test' if args.test_limits else 'library default'} limits)\n"
    )
    print(table(values))
    for note in result["notes"]:
        print(f"\n- {note}")
    if args.json is not None:
        write_json(
            args.json,
            {
                "when": utc_now(),
                "mode": args.mode,
                "connections": args.connections,
                "seconds": args.seconds,
                "repeats": repeats,
                "versions": package_versions(["trio", "msgspec"]),
                "metrics": {
                    key: series_summary(label, unit, values[key]) for key, label, unit in METRICS
                },
                "notes": result["notes"],
            },
        )


if __name__ == "__main__":
    main(sys.argv[1:])
