"""The floor under a persisted ask: the same commits and notices, with nothing else.

Run from the repository root::

    python -m benchmarks.persisted_floor [--quick] [--repeats N] [--json PATH]

A sequential persisted ``ask`` across runners is two commits, each waiting
for its WAL flush, and two notices, each waking the listening processes:
the caller inserts the request and notifies, the owner (woken by the
notice, which carries the request) writes the reply and notifies, the
caller (woken by that notice, which carries the reply) returns. This
measures that chain bare, on the same throwaway PostgreSQL with stock
durability, in the same layout: two owner processes and a caller, each
with one listening connection and one for its writes, all listening on one
channel (as the runners' lock connections do, so that every notice wakes
every listener), prepared statements, Trio and this project's driver, and
no cluster code. In each repeat it runs beside the cluster's own sequential
persisted ask (``benchmarks.cluster``'s, two runner processes and a
client-only runner here), alternating which goes first, so the two are
measured on the same machine state.

What the cluster costs above the floor is its own; the floor itself is what
this machine gives (fsync, process wake-ups on 2 shared cores). Nothing here
asserts on a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import count
from typing import Any, Final

import trio

from trio_cluster.demo.orchestrate import Children, python_module
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres

from .cluster import FULL, QUICK, ROOT, Sizes, ask_latency, open_cluster, sequential
from .common import bench_parser, log, percentile, repeats_of, utc_now, write_json
from .pgstats import SERVER_SETTINGS

CHANNEL: Final = "floor"
OWNERS: Final = 2
TABLE: Final = "floor_requests"
INSERT: Final = (
    f"WITH stored AS (INSERT INTO {TABLE} (id, owner, body) VALUES ($1, $2, $3) RETURNING id)"
    f" SELECT pg_notify('{CHANNEL}', $4) FROM stored"
)
REPLY: Final = (
    f"WITH done AS (UPDATE {TABLE} SET reply = body WHERE id = $1 AND reply IS NULL"
    f" RETURNING id, reply) SELECT pg_notify('{CHANNEL}', 'r:' || id::text || ':' || reply)"
    " FROM done"
)


async def prepare_table(dsn: str) -> None:
    async with open_connection(dsn) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, owner int NOT NULL,"
            " body text NOT NULL, reply text)"
        )


# -- the owner process ---------------------------------------------------------------


async def run_owner(dsn: str, index: int) -> None:
    """Answer each request notice meant for ``index``: write its reply and notify."""
    async with open_connection(dsn) as listener, open_connection(dsn) as writer:
        await listener.listen(CHANNEL)
        print("ready", flush=True)
        mine = f"q:{index}:"
        while True:
            notice = await listener.wait_notification()
            if notice.payload.startswith(mine):
                request_id = int(notice.payload.split(":", 3)[2])
                await writer.fetch(REPLY, [request_id], prepare=True)


# -- the caller ----------------------------------------------------------------------


class Caller:
    """Sequential asks: insert and notify, then wait for the reply's notice."""

    def __init__(self, listener: Connection, writer: Connection) -> None:
        self._listener = listener
        self._writer = writer
        self._ids = count(1)

    async def ask(self, i: int) -> bool:
        request_id = next(self._ids)
        owner, body = request_id % OWNERS, f"body-{i}"
        carried = f"q:{owner}:{request_id}:{body}"  # the request, as the cluster's notices
        await self._writer.fetch(INSERT, [request_id, owner, body, carried], prepare=True)
        wanted = f"r:{request_id}:"
        while True:
            notice = await self._listener.wait_notification()
            if notice.payload.startswith(wanted):
                return True


async def floor_latency(dsn: str, sizes: Sizes) -> list[int]:
    await prepare_table(dsn)
    with Children() as children:
        owners = [
            children.start(
                f"floor-owner-{i}",
                python_module("benchmarks.persisted_floor", "--owner", str(i), dsn),
                cwd=ROOT,
            )
            for i in range(OWNERS)
        ]
        for owner in owners:
            with trio.fail_after(60):
                await owner.expect("ready")
        async with open_connection(dsn) as listener, open_connection(dsn) as writer:
            await listener.listen(CHANNEL)
            caller = Caller(listener, writer)
            samples = await sequential(caller.ask, sizes.warmup // 2, sizes.persisted_samples)
        for owner in owners:
            await owner.stop(5.0)
    return samples


async def cluster_latency(children: Children, server: ThrowawayPostgres, sizes: Sizes) -> list[int]:
    samples: list[int] = []

    def keep(label: str, kept: list[int]) -> None:
        samples.extend(kept)

    async with open_cluster(children, server, f"floor{next(_prefixes)}_") as cluster:
        await ask_latency(cluster, sizes, lambda key, value: None, keep, persisted=True)
    return samples


_prefixes = count(1)


async def measure(
    children: Children, server: ThrowawayPostgres, sizes: Sizes, repeats: int
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}

    def record(key: str, samples: list[int]) -> None:
        for q, label in ((0.50, "p50"), (0.99, "p99")):
            values.setdefault(f"{key}.{label}", []).append(percentile(samples, q) / 1e6)

    for repeat in range(1, repeats + 1):
        order = ("floor", "cluster") if repeat % 2 else ("cluster", "floor")
        for which in order:
            log(f"repeat {repeat}: {which}")
            if which == "floor":
                samples = await floor_latency(server.dsn, sizes)
            else:
                samples = await cluster_latency(children, server, sizes)
            record(which, samples)
            log(
                f"  {which}: p50 {percentile(samples, 0.5) / 1e6:.2f} ms,"
                f" p99 {percentile(samples, 0.99) / 1e6:.2f} ms"
            )
    for key in ("p50", "p99"):
        values[f"ratio.{key}"] = [
            c / f for c, f in zip(values[f"cluster.{key}"], values[f"floor.{key}"], strict=True)
        ]
    return values


LABELS: Final = {
    "floor.p50": ("floor: insert, notice, reply, notice; p50", "ms"),
    "floor.p99": ("floor: p99", "ms"),
    "cluster.p50": ("cluster: sequential persisted ask p50", "ms"),
    "cluster.p99": ("cluster: sequential persisted ask p99", "ms"),
    "ratio.p50": ("cluster / floor, p50", "x"),
    "ratio.p99": ("cluster / floor, p99", "x"),
}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--owner":
        owner = argparse.ArgumentParser(prog="persisted_floor --owner")
        owner.add_argument("--owner", type=int, required=True)
        owner.add_argument("dsn")
        args = owner.parse_args()
        trio.run(run_owner, args.dsn, args.owner)
        return
    parser = bench_parser(
        "python -m benchmarks.persisted_floor",
        "The floor under a sequential persisted ask, beside the cluster's own.",
        repeats_help="repeats (default 5, or 3 with --quick)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = repeats_of(parser, args)
    started = time.perf_counter()
    server = ThrowawayPostgres(durable=True, settings=SERVER_SETTINGS)
    with server, Children() as children:
        values = trio.run(measure, children, server, sizes, repeats)
    print(
        f"persisted floor: PostgreSQL with stock durability, {OWNERS} owner processes and a"
        f" caller; {sizes.persisted_samples} sequential asks per repeat, {repeats} repeats,"
        f" median (min, max); {time.perf_counter() - started:.0f} s"
    )
    for key, (label, unit) in LABELS.items():
        series = values[key]
        print(
            f"| {label} | {statistics.median(series):.2f} | {min(series):.2f} |"
            f" {max(series):.2f} | {unit} |"
        )
    if args.json is not None:
        report: dict[str, Any] = {"when": utc_now(), "sizes": vars(sizes), "values": values}
        write_json(args.json, report)


if __name__ == "__main__":
    main()
