"""What durable state costs a persisted ask, and an activation with a stored snapshot.

Run from the repository root::

    python -m benchmarks.state [--quick] [--repeats N] [--durable] [--json PATH]

Two runners in this process on one PostgreSQL (a ``ThrowawayPostgres``;
fsync, synchronous_commit and full_page_writes off unless ``--durable``,
which gives the server its stock durability): an owner hosting both entity
types below, and a client-only runner, so that a cross-runner ask goes
through the database (stored, announced, handled, its reply announced back).
Every repeat measures, on fresh tables:

* sequential persisted asks, each a new key, to an entity **without state**
  (the baseline) and to one **whose state each ask changes** (a counter and
  the key appended to a bounded list), sent by the owner itself (local) and by
  the client (cross-runner): p50 and p99;
* **activations**: the first ask to an entity id never seen by this runner,
  for ids without state (the baseline) and for ids with a stored 1 KB
  snapshot (written beforehand), so the snapshot is loaded and decoded:
  p50 and p99.

Medians over the repeats, and each figure's multiple of its baseline in the
same repeat. Nothing here asserts.
"""

from __future__ import annotations

import statistics
import sys
import uuid
from typing import Any

import msgspec
import trio

from benchmarks.common import (
    MEASUREMENT_ALIGNMENT,
    MEASUREMENT_COLUMNS,
    Metric,
    Values,
    bench_parser,
    clock,
    cost_summary,
    log,
    markdown_table,
    measurement_cells,
    multiples_against,
    package_versions,
    percentile,
    repeats_of,
    utc_now,
    write_json,
)
from trio_cluster import (
    Entity,
    EntityContext,
    EntityOptions,
    Runner,
    ShardingConfig,
    State,
    TransportConfig,
    open_runner,
)
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.storage import StateWrite


class Step(msgspec.Struct, frozen=True):
    key: str


class Tally(msgspec.Struct):
    count: int = 0
    recent: list[str] = []
    padding: str = ""


Plain = Entity("Plain")
plain_step = Plain.rpc("step", Step, int, persisted=True, primary_key=lambda s: s.key)
Stateful = Entity("Stateful")
stateful_step = Stateful.rpc("step", Step, int, persisted=True, primary_key=lambda s: s.key)


class PlainHandler:
    def __init__(self, ctx: EntityContext) -> None:
        self.count = 0

    @plain_step.handler
    async def step(self, step: Step) -> int:
        self.count += 1
        return self.count


class StatefulHandler:
    def __init__(self, ctx: EntityContext, state: State[Tally]) -> None:
        self.state = state

    @stateful_step.handler
    async def step(self, step: Step) -> int:
        tally = self.state.value
        tally.count += 1
        tally.recent = [*tally.recent[-9:], step.key]
        return tally.count


CONFIG = ShardingConfig(shards_per_group=8, entity_defaults=EntityOptions(keep_alive=True))
METRICS = [
    Metric("plain.local.p50", "Persisted ask p50, no state, local", "µs"),
    Metric("plain.local.p99", "Persisted ask p99, no state, local", "µs"),
    Metric(
        "state.local.p50",
        "Persisted ask p50, state changed, local",
        "µs",
        baseline="plain.local.p50",
    ),
    Metric(
        "state.local.p99",
        "Persisted ask p99, state changed, local",
        "µs",
        baseline="plain.local.p99",
    ),
    Metric("plain.remote.p50", "Persisted ask p50, no state, cross-runner", "µs"),
    Metric("plain.remote.p99", "Persisted ask p99, no state, cross-runner", "µs"),
    Metric(
        "state.remote.p50",
        "Persisted ask p50, state changed, cross-runner",
        "µs",
        baseline="plain.remote.p50",
    ),
    Metric(
        "state.remote.p99",
        "Persisted ask p99, state changed, cross-runner",
        "µs",
        baseline="plain.remote.p99",
    ),
    Metric("activate.plain.p50", "Activation + first ask p50, no state", "µs"),
    Metric("activate.plain.p99", "Activation + first ask p99, no state", "µs"),
    Metric(
        "activate.state.p50",
        "Activation + first ask p50, 1 KB snapshot",
        "µs",
        baseline="activate.plain.p50",
    ),
    Metric(
        "activate.state.p99",
        "Activation + first ask p99, 1 KB snapshot",
        "µs",
        baseline="activate.plain.p99",
    ),
]


def quantiles(samples: list[int], key: str, into: dict[str, float]) -> None:
    samples.sort()
    into[f"{key}.p50"] = percentile(samples, 0.50) / 1000
    into[f"{key}.p99"] = percentile(samples, 0.99) / 1000


async def timed_asks(sender: Runner, rpc: Any, ids: list[str], count: int) -> list[int]:
    samples = []
    for n in range(count):
        start = clock()
        await sender.ask(rpc, ids[n % len(ids)], Step(f"{uuid.uuid4().hex}"))
        samples.append(clock() - start)
    return samples


async def one_repeat(dsn: str, asks: int, activations: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    transport = TransportConfig()
    prefix = f"bs{uuid.uuid4().hex[:8]}_"
    plain = Plain.implement(PlainHandler)
    stateful = Stateful.implement(StatefulHandler, state=Tally)
    async with (
        open_postgres_storage(dsn, prefix=prefix) as storage,
        open_runner(plain, stateful, storage=storage, config=CONFIG, transport=transport) as owner,
        open_runner(storage=storage, config=CONFIG, transport=transport) as client,
    ):
        await owner.settled()
        ids = [f"e{n}" for n in range(16)]
        for sender in (owner, client):  # warm up both paths and every entity
            await timed_asks(sender, plain_step, ids, len(ids) * 2)
            await timed_asks(sender, stateful_step, ids, len(ids) * 2)
        for where, sender in (("local", owner), ("remote", client)):
            quantiles(await timed_asks(sender, plain_step, ids, asks), f"plain.{where}", figures)
            quantiles(await timed_asks(sender, stateful_step, ids, asks), f"state.{where}", figures)
        # Activations: fresh ids, without state and with a stored 1 KB snapshot.
        snapshot = msgspec.msgpack.encode(Tally(count=1, recent=["seed"], padding="x" * 1000))
        seeded = [f"seeded-{n}" for n in range(activations)]
        for entity_id in seeded:
            shard = Stateful.shard_of(entity_id, CONFIG.shards_per_group)
            lease = owner.shards[shard]
            await storage.states.save_state(lease, StateWrite("Stateful", entity_id, snapshot))
        fresh = [f"fresh-{n}" for n in range(activations)]
        samples = [(await timed_asks(owner, plain_step, [i], 1))[0] for i in fresh]
        quantiles(samples, "activate.plain", figures)
        samples = [(await timed_asks(owner, stateful_step, [i], 1))[0] for i in seeded]
        quantiles(samples, "activate.state", figures)
    return figures


def main(argv: list[str]) -> None:
    parser = bench_parser("python -m benchmarks.state", __doc__.split("\n\n")[0])
    parser.add_argument("--durable", action="store_true", help="stock durability (fsync on)")
    args = parser.parse_args(argv)
    repeats = repeats_of(parser, args)
    asks, activations = (300, 100) if args.quick else (1500, 400)
    values: Values = {metric.key: [] for metric in METRICS}
    with ThrowawayPostgres(durable=args.durable) as server:
        for repeat in range(repeats):
            log(f"repeat {repeat + 1}/{repeats}")
            figures = trio.run(one_repeat, server.dsn, asks, activations)
            for key, value in figures.items():
                values[key].append(value)
    mode = "stock durability" if args.durable else "fsync, synchronous_commit, full_page_writes off"
    print(f"## Durable state on PostgreSQL ({mode}; {repeats} repeats)\n")
    rows = []
    for metric in METRICS:
        multiples = (
            multiples_against(values, metric.key, metric.baseline, rate=False)
            if metric.baseline
            else []
        )
        cells = measurement_cells(metric.label, metric.unit, values[metric.key], "{:,.0f}".format)
        rows.append([*cells, f"{statistics.median(multiples):.2f}x" if multiples else ""])
    print(
        markdown_table([*MEASUREMENT_COLUMNS, "x baseline"], [*MEASUREMENT_ALIGNMENT, True], rows)
    )
    if args.json is not None:
        write_json(
            args.json,
            {
                "date": utc_now(),
                "durable": args.durable,
                "versions": package_versions(["trio", "msgspec", "psycopg", "trio-cluster"]),
                "metrics": {metric.key: cost_summary(metric, values) for metric in METRICS},
            },
        )


if __name__ == "__main__":
    main(sys.argv[1:])
