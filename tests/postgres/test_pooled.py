"""The pool behind a transaction-mode PgBouncer, and a runner whose pool cannot connect.

The lock and watcher connections stay direct (session advisory locks, LISTEN);
only the pool goes through the pooler. A runner that cannot open a pooled
connection cannot serve its shards, so it leaves the membership until it can.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import pytest
import trio

from trio_cluster import PersistenceError, Runner, ShardId, open_runner
from trio_cluster.core.hashing import shard_index
from trio_cluster.postgres.leases import LeaseTiming
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import LOOPBACK, TEST_CONFIG

from ..entities import Add, Probe, add_persisted, counter
from .pooler import ThrowawayPgBouncer

CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=4)
QUICK_TO_LEAVE = LeaseTiming(pool_unreachable_timeout=0.3)
_prefixes = itertools.count()


async def until(runner: Runner, condition: object) -> None:
    """Wait on the runner's changes until ``condition()`` holds."""
    assert callable(condition)
    with trio.fail_after(30):
        while not condition():
            await runner.changed()


def serving(runner: Runner, members: int) -> bool:
    """The runner sees ``members`` runners and holds every shard assigned to it."""
    return len(set(runner.assignment.values())) == members and runner.owns_its_assignment()


def entity_on(runner: Runner) -> str:
    """An entity id whose shard ``runner`` holds now."""
    for n in itertools.count():
        shard = ShardId("default", shard_index(f"e{n}", CONFIG.shards_per_group))
        if shard in runner.shards:
            return f"e{n}"
    raise AssertionError("unreachable")


@asynccontextmanager
async def pooled_pair(
    pg_dsn: str, bouncer: ThrowawayPgBouncer
) -> AsyncIterator[tuple[Runner, Runner, Probe, Probe]]:
    """Runner ``a`` with a direct pool, runner ``b`` with its pool through ``bouncer``,
    in one cluster, settled; and the probes of their handlers."""
    prefix = f"pooled{next(_prefixes)}_"
    impl_a, probe_a = counter()
    impl_b, probe_b = counter()
    async with AsyncExitStack() as stack:
        direct = await stack.enter_async_context(open_postgres_storage(pg_dsn, prefix=prefix))
        pooled = await stack.enter_async_context(
            open_postgres_storage(
                pg_dsn,
                prefix=prefix,
                pool_dsn=bouncer.dsn,
                prepared_statements=False,
                timing=QUICK_TO_LEAVE,
            )
        )
        a = await stack.enter_async_context(
            open_runner(impl_a, storage=direct, config=CONFIG, transport=LOOPBACK)
        )
        b = await stack.enter_async_context(
            open_runner(impl_b, storage=pooled, config=CONFIG, transport=LOOPBACK)
        )
        await until(a, lambda: serving(a, 2))
        await until(b, lambda: serving(b, 2))
        yield a, b, probe_a, probe_b


async def test_a_runner_whose_pool_cannot_connect_leaves_until_it_can(pg_dsn: str) -> None:
    with ThrowawayPgBouncer(pg_dsn, pool_mode="transaction", pool_size=2) as bouncer:
        async with pooled_pair(pg_dsn, bouncer) as (a, b, probe_a, probe_b):
            entity = entity_on(b)
            # b serves it, writing its reply through the pooler.
            assert await a.ask(add_persisted, entity, Add(1)) == 1
            assert probe_b.order == [(entity, 1)]
            bouncer.stop()
            # b cannot store a reply: it leaves, and a serves what b held (an entity
            # of its own, new: the state was b's, in memory).
            with trio.fail_after(30):
                assert await a.ask(add_persisted, entity, Add(2)) == 2
            assert probe_a.order == [(entity, 2)]
            await until(a, lambda: serving(a, 1))
            assert b.shards == {}
            bouncer.start()
            await until(b, lambda: serving(b, 2))
            await until(a, lambda: serving(a, 2))
            assert b.shards


async def test_a_runner_whose_pool_cannot_connect_does_not_join(pg_dsn: str) -> None:
    prefix = f"pooled{next(_prefixes)}_"
    with ThrowawayPgBouncer(pg_dsn) as bouncer:
        dead = bouncer.dsn
    async with (
        open_postgres_storage(pg_dsn, prefix=prefix) as direct,
        open_postgres_storage(pg_dsn, prefix=prefix, pool_dsn=dead, connect_deadline=0) as pooled,
    ):
        # Raised from the session's task, in the groups of the nurseries around it.
        with pytest.RaisesGroup(
            pytest.RaisesExc(PersistenceError, match="the pool cannot connect"),
            flatten_subgroups=True,
        ):
            async with open_runner(storage=pooled, config=CONFIG):
                pass  # pragma: no cover - it must not open
        assert await direct.live_runners() == []
