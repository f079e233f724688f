"""The broadcast scenarios of ``tests.broadcast_scenarios`` on three in-process runners
over PostgreSQL (``tests/test_broadcast.py`` runs them on the memory storage)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from trio_cluster import Storage
from trio_cluster.postgres import open_postgres_storage

from .. import broadcast_scenarios as scenarios


@asynccontextmanager
async def postgres(dsn: str) -> AsyncIterator[Storage]:
    prefix = f"bcast_{uuid.uuid4().hex[:8]}_"
    async with open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage:
        yield storage


async def test_runner_broadcast(pg_dsn: str) -> None:
    await scenarios.runner_broadcast_reaches_every_live_runner(functools.partial(postgres, pg_dsn))


async def test_resident_broadcast(pg_dsn: str) -> None:
    await scenarios.resident_broadcast_reaches_every_resident_entity_once(
        functools.partial(postgres, pg_dsn)
    )


async def test_persisted_stored_broadcast_and_its_retry(pg_dsn: str) -> None:
    await scenarios.persisted_stored_broadcast_runs_once_per_entity_across_retries(
        functools.partial(postgres, pg_dsn)
    )


async def test_volatile_stored_broadcast_and_its_deadline(pg_dsn: str) -> None:
    await scenarios.volatile_stored_broadcast_under_a_deadline(functools.partial(postgres, pg_dsn))


@pytest.mark.parametrize("persisted", [True, False], ids=["persisted", "volatile"])
async def test_a_runner_leaving_mid_broadcast(pg_dsn: str, persisted: bool) -> None:
    await scenarios.a_runner_leaving_mid_broadcast(
        functools.partial(postgres, pg_dsn), persisted=persisted
    )
