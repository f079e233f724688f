"""Soak: play any number of fault schedules and sum up what broke.

Run from the repository root::

    python -m tests.faults.soak --schedules 200 [--seed N] [--jobs 1] [--length 16]

Schedules use seeds N, N+1, ... (N defaults to a number drawn from the
clock, printed first), so any failed schedule is replayed with ``--seed
<its seed> --schedules 1``. Each job owns a PostgreSQL server (schedules
restart it, so two jobs must not share one). Prints one line per
schedule (and the details of a failed one), then a summary: schedules
passed, runner crashes by where the exception escaped, lost acknowledged
messages, overlapping runs, every invariant's count, and the wall time.
Exits 1 if any schedule failed. ``--json FILE`` keeps every result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import trio

from trio_cluster.pgdriver import PgError
from trio_cluster.pgdriver.server import ThrowawayPostgres

from . import invariants as inv
from .harness import HarnessError, Result, run_schedule, socket_kill_supported
from .schedule import DEFAULT_LENGTH_S, generate


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--schedules", type=int, default=30, help="how many schedules (30)")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: from clock)")
    parser.add_argument("--jobs", type=int, default=1, help="schedules played at once (1)")
    parser.add_argument(
        "--length", type=float, default=DEFAULT_LENGTH_S, help="seconds of faults per schedule"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument("--quiet", action="store_true", help="no details for failed schedules")
    args = parser.parse_args(argv)
    if args.schedules < 1 or args.jobs < 1:
        parser.error("--schedules and --jobs must be at least 1")
    return args


def as_json(result: Result) -> dict[str, Any]:
    return {
        "seed": result.seed,
        "passed": result.passed,
        "faults": result.schedule.describe(),
        "kinds": sorted(result.schedule.kinds),
        "violations": [{"invariant": v.invariant, "detail": v.detail} for v in result.violations],
        "crashes": [
            {
                "slot": c.slot,
                "pid": c.pid,
                "code": c.code,
                "at": round(c.at, 2),
                "during": c.during,
                "signature": c.signature,
                "tail": c.tail,
            }
            for c in result.crashes
        ],
        "figures": result.figures,
        "notes": result.notes,
        "timeline": result.timeline,
        "wall_s": round(result.wall_s, 2),
    }


class Soak:
    def __init__(self, args: argparse.Namespace, first_seed: int) -> None:
        self.args = args
        self.seeds = list(range(first_seed, first_seed + args.schedules))
        self.results: list[Result] = []
        self.harness_errors: list[str] = []
        self.cut_supported = socket_kill_supported()

    def say(self, text: str) -> None:
        print(text, flush=True)

    async def run(self) -> None:
        send, receive = trio.open_memory_channel[int](len(self.seeds))
        for seed in self.seeds:
            send.send_nowait(seed)
        send.close()
        async with trio.open_nursery() as nursery:
            for _ in range(min(self.args.jobs, len(self.seeds))):
                nursery.start_soon(self.job, receive.clone())

    async def job(self, seeds: trio.MemoryReceiveChannel[int]) -> None:
        server = ThrowawayPostgres()
        await trio.to_thread.run_sync(server.start)
        try:
            async for seed in seeds:
                await self.play(server, seed)
        finally:
            await trio.to_thread.run_sync(server.stop)

    async def play(self, server: ThrowawayPostgres, seed: int) -> None:
        schedule = generate(seed, self.args.length)
        try:
            result = await run_schedule(
                server, schedule, log=self.say, cut_supported=self.cut_supported
            )
        except (HarnessError, PgError, OSError, BaseExceptionGroup) as error:
            # The harness could not play this seed (PostgreSQL would not come
            # back, say): reported apart from the library's failures.
            text = "".join(traceback.format_exception(error)[-8:])
            self.harness_errors.append(f"seed={seed}: {error!r}")
            self.say(f"seed={seed} HARNESS ERROR {error!r}\n{text}")
            return
        self.results.append(result)
        self.say(result.summary_line() if self.args.quiet or result.passed else result.details())

    def summary(self, wall: float) -> str:
        results = sorted(self.results, key=lambda r: r.seed)
        passed = sum(result.passed for result in results)
        counts: Counter[str] = Counter()
        for result in results:
            counts.update(result.counts())
        signatures: dict[str, list[str]] = defaultdict(list)
        for result in results:
            for crash in result.crashes:
                signatures[crash.signature].append(f"{result.seed}:{crash.slot}")
        failing_kinds: Counter[str] = Counter()
        all_kinds: Counter[str] = Counter()
        for result in results:
            all_kinds.update(result.schedule.kinds)
            if not result.passed:
                failing_kinds.update(result.schedule.kinds)
        lines = [
            "== soak summary ==",
            f"schedules passed: {passed}/{len(results)}"
            + (f" ({len(self.harness_errors)} harness errors)" if self.harness_errors else ""),
            f"runner crashes: {sum(len(r.crashes) for r in results)} "
            f"in {sum(1 for r in results if r.crashes)} schedules",
            f"lost acknowledged messages: {counts[inv.LOST]}",
            f"overlapping runs beyond the fencing window: {counts[inv.OVERLAP]}",
            "violations by invariant: "
            + ", ".join(f"{name}={counts[name]}" for name in inv.INVARIANTS),
            f"overlaps allowed by fencing: "
            f"{sum(r.figures.get('allowed_overlaps', 0) for r in results)}",
            "schedules failed / played, by fault kind present: "
            + ", ".join(
                f"{kind}={failing_kinds[kind]}/{all_kinds[kind]}" for kind in sorted(all_kinds)
            ),
            f"failed seeds: {[r.seed for r in results if not r.passed]}",
            f"wall time: {wall:.1f}s ({wall / max(len(results), 1):.1f}s per schedule, "
            f"{self.args.jobs} job(s))",
        ]
        if signatures:
            lines.append("crashes by where the exception was raised and escaped:")
            for signature, where in sorted(signatures.items(), key=lambda item: -len(item[1])):
                lines.append(f"  {len(where)}x {signature}")
                lines.append(f"     seeds:slots {where[:12]}")
        lines.extend(f"harness error: {error}" for error in self.harness_errors)
        return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse(argv)
    first_seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    print(
        f"soak: {args.schedules} schedules from seed {first_seed}, {args.jobs} job(s), "
        f"{args.length:.0f}s of faults each",
        flush=True,
    )
    soak = Soak(args, first_seed)
    if not soak.cut_supported:
        print("note: ss -K cannot kill sockets here; socket cuts are skipped", flush=True)
    started = time.monotonic()
    trio.run(soak.run)
    wall = time.monotonic() - started
    print(soak.summary(wall), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps([as_json(r) for r in soak.results], indent=1))
    failed = any(not result.passed for result in soak.results) or soak.harness_errors
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
