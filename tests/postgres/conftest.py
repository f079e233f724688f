"""A PostgreSQL server for the tests in this directory.

One throwaway server serves the whole session; set ``TRIO_CLUSTER_TEST_DSN`` to use an
existing server instead (tests that restart the server are then skipped).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.storage import MemoryStorage, Storage

from .pooler import ThrowawayPgBouncer

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.postgres)


@dataclass(frozen=True)
class ExternalPostgres:
    """A server we did not start and must not restart."""

    dsn: str


@pytest.fixture(scope="session")
def pg_server() -> Iterator[ThrowawayPostgres | ExternalPostgres]:
    dsn = os.environ.get("TRIO_CLUSTER_TEST_DSN")
    if dsn:
        yield ExternalPostgres(dsn)
        return
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: ThrowawayPostgres | ExternalPostgres) -> str:
    return pg_server.dsn


@pytest.fixture
def own_pg_server(pg_server: ThrowawayPostgres | ExternalPostgres) -> ThrowawayPostgres:
    """The session server, for tests that restart it (skipped on an external server)."""
    if not isinstance(pg_server, ThrowawayPostgres):
        pytest.skip("TRIO_CLUSTER_TEST_DSN is set: not restarting a server we do not own")
    return pg_server


@pytest.fixture(scope="session")
def pg_bouncer(pg_server: ThrowawayPostgres | ExternalPostgres) -> Iterator[ThrowawayPgBouncer]:
    """PgBouncer in transaction mode in front of the session's server."""
    with ThrowawayPgBouncer(pg_server.dsn, pool_mode="transaction") as bouncer:
        yield bouncer


@pytest.fixture(params=["memory", "postgres", "postgres-pooled"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """Each storage in turn, the PostgreSQL one on fresh tables: the conformance
    tests of a storage protocol run against both, and against PostgreSQL with the
    pool behind a transaction-mode PgBouncer (1.18: no prepared statements)."""
    if request.param == "memory":
        yield MemoryStorage()
        return
    dsn = request.getfixturevalue("pg_dsn")
    prefix = f"cf{uuid.uuid4().hex[:8]}_"
    if request.param == "postgres":
        async with open_postgres_storage(dsn, prefix=prefix) as pg:
            yield pg
        return
    bouncer: ThrowawayPgBouncer = request.getfixturevalue("pg_bouncer")
    async with open_postgres_storage(
        dsn, prefix=prefix, pool_dsn=bouncer.dsn, prepared_statements=False
    ) as pooled:
        yield pooled
