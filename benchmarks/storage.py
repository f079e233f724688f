"""PostgreSQL storage benchmark: what persisting a request and its reply costs.

Run from the repository root::

    python -m benchmarks.storage [--quick] [--repeats N] [--json PATH] [--durable]

It starts a throwaway PostgreSQL server (``trio_cluster.pgdriver.server``;
by default with fsync and synchronous_commit off, as the tests run it;
``--durable`` turns them on, so every commit waits for its WAL flush) and
measures, each repeated (5 times by default, 3 with ``--quick``), on fresh
tables each time:

* the driver baseline, through the same pool the storage uses: ``SELECT 1``
  and a one-row ``INSERT`` (autocommit: one round trip, one commit),
  sequential p50/p99, and the rate of that ``INSERT`` from 100 concurrent
  tasks;
* the same ``INSERT`` with a ``pg_notify`` in the statement, and a one-row
  ``UPDATE`` fenced like ``save_reply`` (a ``FOR SHARE`` lock on a shard
  row checked in the same statement), to show where the storage's time
  goes;
* the storage alone: ``messages.save_request`` then ``messages.save_reply``
  under a lease taken through ``storage.runners.session(...)``, p50/p99 of
  each and of the pair (the save-and-reply round trip);
* ``ask`` of a persisted RPC with a primary key through a runner hosting
  the entity (sequential p50/p99), and through a client-only runner in the
  same process, whose request reaches the owner and whose reply comes back
  by LISTEN/NOTIFY;
* saved messages per second with 100 concurrent senders: ``tell`` of a
  persisted RPC (each sender tells its own entity, the rate counts until
  the last ``tell`` returned, i.e. stored; a final ``ask`` per sender then
  waits for its entity to have processed everything) and ``ask`` of a
  persisted RPC spread over 100 entities.

Every process here shares one machine: the server, the runner and the
senders compete for the same CPUs. The "x SELECT 1" and "x INSERT" columns
are cost multiples against the same repeat's driver baseline (for rates:
baseline rate / rate against the concurrent ``INSERT`` rate); medians of
the per-repeat ratios. Nothing here asserts on a time.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from itertools import count
from typing import Any, Final

import msgspec
import trio

from trio_cluster import (
    Entity,
    EntityContext,
    Runner,
    SendTimeout,
    ShardId,
    ShardingConfig,
    open_runner,
)
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.snowflake import MACHINE_IDS, SnowflakeGenerator
from trio_cluster.pgdriver import Connection, open_connection, open_pool
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.storage import PostgresStorage, open_postgres_storage

from .common import (
    MEASUREMENT_ALIGNMENT,
    MEASUREMENT_COLUMNS,
    Values,
    bench_parser,
    clock,
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

SENDERS: Final = 100
"""Concurrent sender tasks, and entities, in the throughput runs."""
POOL_SIZE: Final = 10
"""The storage's default pool size, used for the driver baseline as well."""
CONFIG: Final = ShardingConfig()
"""The defaults: 100 shards per group."""


# -- the protocol under test ------------------------------------------------------


class Payload(msgspec.Struct, frozen=True):
    n: int
    key: str


Bench = Entity("Bench")
bump = Bench.rpc("bump", Payload, int, persisted=True, primary_key=lambda p: p.key)


class BenchHandler:
    def __init__(self, ctx: EntityContext) -> None:
        self.count = 0

    @bump.handler
    async def on_bump(self, payload: Payload) -> int:
        self.count += payload.n
        return self.count


# -- helpers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    warmup: int
    latency_samples: int
    throughput_messages: int


FULL: Final = Sizes(warmup=200, latency_samples=2_000, throughput_messages=10_000)
QUICK: Final = Sizes(warmup=50, latency_samples=300, throughput_messages=2_000)

_prefixes = count()


def fresh_prefix(repeat: int, name: str) -> str:
    """A table prefix of its own for each measurement, so tables start empty."""
    return f"bench{repeat}_{next(_prefixes)}_{name}_"


Op = Callable[[int], Awaitable[object]]
STALLED: Final = object()
"""What an op returns when its call stalled on a known defect: its sample is left out."""


async def latency(op: Op, sizes: Sizes) -> tuple[float, float]:
    """p50 and p99 in microseconds of sequential ``op(i)`` calls, after a warm-up."""
    for i in range(sizes.warmup):
        await op(-1 - i)
    samples: list[int] = []
    for i in range(sizes.latency_samples):
        start = clock()
        if await op(i) is not STALLED:
            samples.append(clock() - start)
    samples.sort()
    return percentile(samples, 0.50) / 1e3, percentile(samples, 0.99) / 1e3


async def concurrently(per_sender: Callable[[int], Awaitable[None]]) -> int:
    """Run ``per_sender(i)`` for each of the SENDERS senders; the elapsed nanoseconds."""
    start = clock()
    async with trio.open_nursery() as nursery:
        for i in range(SENDERS):
            nursery.start_soon(per_sender, i)
    return clock() - start


@asynccontextmanager
async def storage_for(dsn: str, prefix: str) -> AsyncIterator[PostgresStorage]:
    async with open_postgres_storage(dsn, prefix=prefix, pool_size=POOL_SIZE) as storage:
        yield storage


# -- (a) the driver baseline --------------------------------------------------------


async def follow(listener: Connection) -> None:
    """Read notifications as a runner's notice follower does."""
    while True:
        await listener.wait_notification()


async def driver(dsn: str, sizes: Sizes, prefix: str, record: Record) -> None:
    async with (
        open_pool(dsn, size=POOL_SIZE, application_name="trio_cluster") as pool,
        open_connection(dsn) as listener,
        trio.open_nursery() as nursery,
    ):
        table = f"{prefix}rows"
        await pool.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, payload bytea NOT NULL,"
            " processed boolean NOT NULL DEFAULT false)"
        )
        await pool.execute(f"CREATE TABLE {prefix}fence (k int PRIMARY KEY, epoch bigint)")
        await pool.execute(f"INSERT INTO {prefix}fence VALUES (1, 1)")
        # A runner always listens; NOTIFY costs more with a listener than without.
        channel = f"{prefix}events"
        await listener.listen(channel)
        nursery.start_soon(follow, listener)
        payload = b"\x92\x01\xa5k-123"
        ids = count(1)

        async def select_one(_: int) -> object:
            return await pool.fetchval("SELECT 1")

        async def insert(_: int) -> object:
            return await pool.execute(
                f"INSERT INTO {table} (id, payload) VALUES ($1, $2)", [next(ids), payload]
            )

        async def insert_notify(_: int) -> object:
            return await pool.fetchval(
                f"WITH ins AS (INSERT INTO {table} (id, payload) VALUES ($1, $2)"
                " RETURNING id) SELECT pg_notify($3, 's:' || id) FROM ins",
                [next(ids), payload, channel],
            )

        inserted = sizes.warmup + sizes.latency_samples

        async def update(i: int) -> object:
            return await pool.execute(
                f"UPDATE {table} SET processed = true, payload = $2 WHERE id = $1",
                [i % inserted + 1, payload],
            )

        async def fenced_update(i: int) -> object:
            # Rows 1 to `inserted` exist by now: the INSERT runs made them.
            return await pool.fetchval(
                f"WITH lease AS (SELECT 1 FROM {prefix}fence WHERE k = 1 AND epoch = 1"
                f" FOR SHARE), done AS (UPDATE {table} SET processed = true, payload = $2"
                " WHERE id = $1 AND EXISTS (SELECT 1 FROM lease) RETURNING id)"
                " SELECT count(*) FROM done",
                [i % inserted + 1, payload],
            )

        for name, op in (
            ("select1", select_one),
            ("insert", insert),
            ("insert_notify", insert_notify),
            ("update", update),
            ("fenced_update", fenced_update),
        ):
            p50, p99 = await latency(op, sizes)
            record(f"driver.{name}.p50", p50)
            record(f"driver.{name}.p99", p99)

        per_sender = sizes.throughput_messages // SENDERS
        for name, op in (("insert_rate", insert), ("insert_notify_rate", insert_notify)):

            async def sender(i: int, op: Op = op) -> None:
                for _ in range(per_sender):
                    await op(i)

            elapsed = await concurrently(sender)
            record(f"driver.{name}", per_sender * SENDERS / (elapsed / 1e9))
        nursery.cancel_scope.cancel()


# -- (b) the storage alone: save_request then save_reply under a lease -----------


async def storage_round_trip(dsn: str, sizes: Sizes, prefix: str, record: Record) -> None:
    async with storage_for(dsn, prefix) as storage:
        messages = storage.messages
        shard = ShardId("default", 0)
        spec = RunnerSpec(f"bench-{os.getpid()}", 1.0, frozenset({"default"}))
        async with (
            storage.runners.session(spec, lambda _: None) as session,
            session.notices() as notices,
            trio.open_nursery() as nursery,
        ):
            # A runner would follow the notices too: drain them as it would.
            async def drain() -> None:
                async for _ in notices:
                    pass

            nursery.start_soon(drain)
            lease = await session.acquire(shard)
            if lease is None:
                raise RuntimeError(f"could not lease {shard}")
            ids = SnowflakeGenerator(session.machine_id % MACHINE_IDS)
            request_times: list[int] = []
            reply_times: list[int] = []

            async def save_and_reply(i: int) -> object:
                request_id = ids.next_id()
                envelope = Envelope(
                    request_id=request_id,
                    entity_type="Bench",
                    entity_id="one",
                    shard_group=shard.group,
                    shard_index=shard.index,
                    rpc="bump",
                    payload=b"\x92\x01\xa5k-123",
                    persisted=True,
                    primary_key=f"k{i}",
                )
                start = clock()
                saved = await messages.save_request(envelope, session.machine_id, announce=True)
                middle = clock()
                await messages.save_reply(saved.request_id, b"\x91\x01", lease)
                end = clock()
                if i >= 0:
                    request_times.append(middle - start)
                    reply_times.append(end - middle)
                return saved

            p50, p99 = await latency(save_and_reply, sizes)
            record("storage.pair.p50", p50)
            record("storage.pair.p99", p99)
            for name, samples in (("save_request", request_times), ("save_reply", reply_times)):
                samples.sort()
                record(f"storage.{name}.p50", percentile(samples, 0.50) / 1e3)
                record(f"storage.{name}.p99", percentile(samples, 0.99) / 1e3)
            await session.release(lease)
            nursery.cancel_scope.cancel()


# -- (c) persisted ask through a runner -------------------------------------------


@asynccontextmanager
async def bench_runner(storage: PostgresStorage) -> AsyncIterator[Runner]:
    async with open_runner(Bench.implement(BenchHandler), storage=storage, config=CONFIG) as r:
        await r.settled()
        yield r


async def ask_latency(dsn: str, sizes: Sizes, prefix: str, record: Record) -> None:
    async with storage_for(dsn, prefix) as storage, bench_runner(storage) as runner:

        async def ask(i: int) -> object:
            return await runner.ask(bump, "one", Payload(1, f"k{i}"))

        p50, p99 = await latency(ask, sizes)
        record("ask.local.p50", p50)
        record("ask.local.p99", p99)


STALL_TIMEOUT: Final = 1.0
"""A client-only ask not answered in this time (normally ~2 ms) has lost its reply."""


async def client_ask_latency(dsn: str, sizes: Sizes, prefix: str, record: Record) -> None:
    """A client-only runner asks the hosting runner, both in this process.

    Its reply can be lost: ``Client._send`` registers for the reply only
    after ``save_request`` returns, but the NOTIFY goes out at commit, so
    the owner may store the reply, and its ``Replied`` notice be dropped,
    before then. Such an ask waits to its timeout; here it is asked again
    (a duplicate, answered from storage), counted, and left out of the
    percentiles.
    """
    async with (
        storage_for(dsn, prefix) as storage,
        bench_runner(storage),
        open_runner(storage=storage, config=CONFIG) as client,
    ):
        stalls = 0

        async def ask(i: int) -> object:
            nonlocal stalls
            payload = Payload(1, f"k{i}")
            try:
                return await client.ask(bump, "one", payload, timeout=STALL_TIMEOUT)
            except SendTimeout:
                stalls += 1
                await client.ask(bump, "one", payload)
                return STALLED

        p50, p99 = await latency(ask, sizes)
        record("ask.client.p50", p50)
        record("ask.client.p99", p99)
        record("ask.client.stalls", stalls)


# -- (d) saved messages per second, 100 senders -------------------------------------


async def activate_all(runner: Runner) -> None:
    for i in range(SENDERS):
        await runner.ask(bump, f"e{i}", Payload(1, f"warm{i}"))


async def tell_rate(dsn: str, sizes: Sizes, prefix: str, record: Record) -> None:
    per_sender = sizes.throughput_messages // SENDERS
    async with storage_for(dsn, prefix) as storage, bench_runner(storage) as runner:
        await activate_all(runner)
        told: list[int] = []
        start = clock()

        async def sender(i: int) -> None:
            entity_id = f"e{i}"
            for j in range(per_sender - 1):
                await runner.tell(bump, entity_id, Payload(1, f"{i}-{j}"))
            await runner.tell(bump, entity_id, Payload(1, f"{i}-last"))
            told.append(clock() - start)
            # FIFO per entity: this reply comes after every tell is processed.
            await runner.ask(bump, entity_id, Payload(0, f"{i}-drain"))

        elapsed = await concurrently(sender)
        messages = per_sender * SENDERS
        record("rate.tell_saved", messages / (max(told) / 1e9))
        record("rate.tell_processed", messages / (elapsed / 1e9))


async def ask_rate(dsn: str, sizes: Sizes, prefix: str, record: Record) -> None:
    per_sender = sizes.throughput_messages // SENDERS
    async with storage_for(dsn, prefix) as storage, bench_runner(storage) as runner:
        await activate_all(runner)

        async def sender(i: int) -> None:
            for j in range(per_sender):
                await runner.ask(bump, f"e{(i + j) % SENDERS}", Payload(1, f"{i}-{j}"))

        elapsed = await concurrently(sender)
        record("rate.ask", per_sender * SENDERS / (elapsed / 1e9))


# -- the report ---------------------------------------------------------------------

Record = Callable[[str, float], None]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    rate: bool = False
    """True when higher is better (a rate); its cost multiple is then baseline / value."""
    compare: bool = True
    """False for a count that has no baseline."""


METRICS: Final = (
    Metric("driver.select1.p50", "Driver: SELECT 1 p50", "µs"),
    Metric("driver.select1.p99", "Driver: SELECT 1 p99", "µs"),
    Metric("driver.insert.p50", "Driver: INSERT one row p50", "µs"),
    Metric("driver.insert.p99", "Driver: INSERT one row p99", "µs"),
    Metric("driver.insert_notify.p50", "Driver: INSERT + pg_notify p50", "µs"),
    Metric("driver.insert_notify.p99", "Driver: INSERT + pg_notify p99", "µs"),
    Metric("driver.update.p50", "Driver: UPDATE one row p50", "µs"),
    Metric("driver.update.p99", "Driver: UPDATE one row p99", "µs"),
    Metric("driver.fenced_update.p50", "Driver: UPDATE fenced by FOR SHARE p50", "µs"),
    Metric("driver.fenced_update.p99", "Driver: UPDATE fenced by FOR SHARE p99", "µs"),
    Metric("storage.save_request.p50", "Storage: save_request p50", "µs"),
    Metric("storage.save_request.p99", "Storage: save_request p99", "µs"),
    Metric("storage.save_reply.p50", "Storage: save_reply p50", "µs"),
    Metric("storage.save_reply.p99", "Storage: save_reply p99", "µs"),
    Metric("storage.pair.p50", "Storage: save-and-reply round trip p50", "µs"),
    Metric("storage.pair.p99", "Storage: save-and-reply round trip p99", "µs"),
    Metric("ask.local.p50", "Persisted ask, hosting runner, p50", "µs"),
    Metric("ask.local.p99", "Persisted ask, hosting runner, p99", "µs"),
    Metric("ask.client.p50", "Persisted ask, client-only runner (NOTIFY both ways), p50", "µs"),
    Metric("ask.client.p99", "Persisted ask, client-only runner (NOTIFY both ways), p99", "µs"),
    Metric("ask.client.stalls", "Client-only asks whose reply was lost (left out above)",
           "asks", compare=False),
    Metric("driver.insert_rate", "Driver: INSERT, 100 tasks", "rows/s", rate=True),
    Metric("driver.insert_notify_rate", "Driver: INSERT + pg_notify, 100 tasks", "rows/s",
           rate=True),
    Metric("rate.tell_saved", "Persisted tell, 100 senders, until stored", "msg/s", rate=True),
    Metric("rate.tell_processed", "Persisted tell, 100 senders, until processed", "msg/s",
           rate=True),
    Metric("rate.ask", "Persisted ask, 100 senders x 100 entities", "msg/s", rate=True),
)  # fmt: skip


def baselines(metric: Metric) -> tuple[str | None, str | None]:
    """The keys this metric is set against, the same percentile: (SELECT 1, INSERT).

    Rates are set against the concurrent INSERT rate only. A baseline's own
    key stands for itself.
    """
    if not metric.compare:
        return None, None
    if metric.rate:
        return None, "driver.insert_rate"
    percentile_name = metric.key.rsplit(".", 1)[1]
    if metric.key.startswith("driver.select1."):
        return metric.key, None
    return f"driver.select1.{percentile_name}", f"driver.insert.{percentile_name}"


def multiples(metric: Metric, base: str | None, values: Values) -> list[float]:
    """Per-repeat cost multiples against the same repeat's baseline."""
    if base is None or base == metric.key:
        return []
    return multiples_against(values, metric.key, base, rate=metric.rate)


def _cell(metric: Metric, base: str | None, values: dict[str, list[float]]) -> str:
    if base == metric.key:
        return "(baseline)"
    series = multiples(metric, base, values)
    return f"{statistics.median(series):.1f}" if series else ""


def _format(value: float) -> str:
    return f"{value:,.0f}"


def results_table(values: Values) -> str:
    def rows() -> Iterator[list[str]]:
        for metric in METRICS:
            series = values[metric.key]
            if not series:
                continue
            select, insert = baselines(metric)
            yield [
                *measurement_cells(metric.label, metric.unit, series, _format),
                _cell(metric, select, values),
                _cell(metric, insert, values),
            ]

    return markdown_table(
        [*MEASUREMENT_COLUMNS, "x SELECT 1", "x INSERT"],
        [*MEASUREMENT_ALIGNMENT, True, True],
        rows(),
    )


def measure(
    dsn: str, sizes: Sizes, repeats: int, log: Callable[[str], None]
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {m.key: [] for m in METRICS}

    def record(key: str, value: float) -> None:
        values[key].append(value)

    steps: tuple[tuple[str, Callable[[str, Sizes, str, Record], Awaitable[None]]], ...] = (
        ("driver", driver),
        ("storage", storage_round_trip),
        ("ask", ask_latency),
        ("client", client_ask_latency),
        ("tell", tell_rate),
        ("askrate", ask_rate),
    )
    for repeat in range(1, repeats + 1):
        for name, step in steps:
            log(f"repeat {repeat}/{repeats}: {name}")
            trio.run(partial(step, dsn, sizes, fresh_prefix(repeat, name), record))
    return values


async def server_facts(dsn: str) -> dict[str, str]:
    async with open_connection(dsn) as conn:
        facts = {"version": str(await conn.fetchval("SHOW server_version"))}
        for setting in ("fsync", "synchronous_commit", "shared_buffers"):
            facts[setting] = str(await conn.fetchval(f"SHOW {setting}"))
        return facts


def environment(server: dict[str, str]) -> dict[str, Any]:
    return {
        "date": utc_now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "versions": package_versions(("trio", "msgspec", "psycopg", "trio-cluster")),
        "postgres": server,
    }


def report_json(
    values: dict[str, list[float]],
    sizes: Sizes,
    repeats: int,
    elapsed_s: float,
    server: dict[str, str],
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        series = values[metric.key]
        if not series:
            continue
        select, insert = baselines(metric)
        metrics[metric.key] = series_summary(metric.label, metric.unit, series) | {
            "x_select1": multiples(metric, select, values),
            "x_insert": multiples(metric, insert, values),
        }
    return {
        "environment": environment(server),
        "sizes": vars(sizes) | {"senders": SENDERS, "pool_size": POOL_SIZE, "repeats": repeats},
        "elapsed_s": elapsed_s,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(
        "python -m benchmarks.storage", "Benchmark the PostgreSQL storage of trio_cluster."
    )
    parser.add_argument(
        "--durable", action="store_true", help="fsync and synchronous_commit on (default off)"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = repeats_of(parser, args)
    load_before = os.getloadavg()[0]
    with ThrowawayPostgres(durable=args.durable) as server:
        facts = trio.run(server_facts, server.dsn)
        started = clock()
        values = measure(server.dsn, sizes, repeats, log)
        elapsed_s = (clock() - started) / 1e9
    env = environment(facts)
    print(
        f"trio_cluster storage benchmark: PostgreSQL {facts['version']} (fsync={facts['fsync']},"
        f" synchronous_commit={facts['synchronous_commit']}), Python {env['python']},"
        f" {env['cpus']} CPUs, {repeats} repeats, median (min, max); {elapsed_s:.0f} s;"
        f" load average {load_before:.2f} before, {env['load_average_1m']:.2f} after\n"
    )
    print(results_table(values))
    if args.json is not None:
        write_json(args.json, report_json(values, sizes, repeats, elapsed_s, facts))


if __name__ == "__main__":
    main()
