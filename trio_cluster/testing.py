"""Run entities in-process in your own tests.

``open_test_runner`` is :func:`~trio_cluster.open_runner` on a
:class:`~trio_cluster.MemoryStorage` with settings that keep tests quick
(few shards, fast send retries, no defect backoff). It yields the runner
and the storage, whose ``revoke(shard)`` and ``available`` flag let a test
inject lease loss and outages::

    async def test_deposit():
        async with open_test_runner(Account.implement(AccountHandler)) as (runner, _):
            assert await runner.ask(deposit, "acc-1", Deposit(5, "t1")) == 5

Time-based behaviour (idle passivation, timeouts, retry backoff) is best
tested under ``trio.testing.MockClock(autojump_threshold=0)``: the runner
reads only Trio's clock, but for schedules, whose instants are wall-clock
moments; open the runners inside ``with schedules_follow_trio(start):``
and their schedules read a wall clock that reads ``start`` as the block
begins and moves with Trio's clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, ClassVar

import attrs
import trio

from .config import EntityOptions, ShardingConfig
from .core.retry import RetryPolicy
from .core.timetable import to_ms
from .entity import Entity, Implementation
from .instrument import Instrument
from .runtime.runner import Runner, open_runner
from .runtime.schedules import wall_clock
from .storage.memory import MemoryStorage
from .transport.network import TransportConfig

TEST_CONFIG = ShardingConfig(
    shards_per_group=8,
    send_timeout=10.0,
    entity_termination_timeout=1.0,
    send_retry=RetryPolicy(base_delay=0.001, max_delay=0.01, max_attempts=50, max_elapsed=1.0),
    entity_defaults=EntityOptions(
        defect_retry=RetryPolicy(base_delay=0.001, max_delay=0.01, max_attempts=3, jitter=0.0)
    ),
)
"""The defaults of :func:`open_test_runner`; derive variants with ``attrs.evolve``."""

LOOPBACK = TransportConfig()
"""Runners of a test cluster listen on 127.0.0.1, on ports the system picks."""


@asynccontextmanager
async def open_test_runner(
    *implementations: Implementation,
    config: ShardingConfig = TEST_CONFIG,
    storage: MemoryStorage | None = None,
    instruments: Sequence[Instrument] = (),
) -> AsyncIterator[tuple[Runner, MemoryStorage]]:
    """A runner on memory storage, and that storage (pass one to share it between runners)."""
    storage = storage if storage is not None else MemoryStorage()
    async with open_runner(
        *implementations, storage=storage, config=config, instruments=instruments
    ) as runner:
        yield runner, storage


def with_entity_options(config: ShardingConfig, **changes: Any) -> ShardingConfig:
    """``config`` with some of its entity defaults changed, for one test."""
    return attrs.evolve(config, entity_defaults=attrs.evolve(config.entity_defaults, **changes))


@attrs.frozen
class TestCluster:
    """Runners sharing one storage, talking over real sockets on 127.0.0.1."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    runners: list[Runner]
    storage: MemoryStorage

    def owner_of(self, entity: Entity, entity_id: str) -> Runner:
        """The runner whose shard holds ``entity_id``, by the agreed assignment."""
        shard = entity.shard_of(entity_id, self.runners[0].config.shards_per_group)
        for runner in self.runners:
            if shard in runner.shards:
                return runner
        raise LookupError(f"no runner owns {shard}")

    async def settled(self) -> None:
        """Wait until every runner agrees on the assignment and serves its part."""
        while True:
            for runner in self.runners:
                await runner.settled()
            first = self.runners[0].assignment
            laggard = next((r for r in self.runners if r.assignment != first), None)
            if laggard is None and all(r.owns_its_assignment() for r in self.runners):
                return
            await (laggard or self.runners[0]).changed()


@asynccontextmanager
async def open_test_cluster(
    *implementations: Implementation,
    runners: int = 3,
    config: ShardingConfig = TEST_CONFIG,
    storage: MemoryStorage | None = None,
    transport: TransportConfig = LOOPBACK,
    instruments: Sequence[Instrument] = (),
) -> AsyncIterator[TestCluster]:
    """Several runners in this process, over the real routing and socket transport.

    The cluster is settled (every shard owned by its assigned runner)
    before the block starts.
    """
    storage = storage if storage is not None else MemoryStorage()
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                open_runner(
                    *implementations,
                    storage=storage,
                    config=config,
                    transport=transport,
                    instruments=instruments,
                )
            )
            for _ in range(runners)
        ]
        cluster = TestCluster(started, storage)
        await cluster.settled()
        yield cluster


@contextlib.contextmanager
def schedules_follow_trio(start: datetime) -> Iterator[None]:
    """Runners opened in this block give their schedules a wall clock that reads ``start``
    when the block is entered and moves with Trio's clock (a MockClock, say)."""
    origin = to_ms(start) - int(trio.current_time() * 1000)
    token = wall_clock.set(lambda: origin + int(trio.current_time() * 1000))
    try:
        yield
    finally:
        wall_clock.reset(token)
