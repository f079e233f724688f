"""The PostgreSQL storage: both storage protocols over one database.

``open_postgres_storage`` migrates the schema, opens the pool for message
traffic, and gives each runner session its own dedicated lock connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..core.hashing import ShardId
from ..errors import PersistenceError
from .connection import open_connection
from .errors import PgError
from .leases import LeaseTiming, PgLeaseSession
from .messages import PgMessageStorage
from .pool import open_pool
from .schema import check_prefix, migrate


class PostgresStorage:
    def __init__(self, dsn: str, prefix: str, messages: PgMessageStorage, timing: LeaseTiming):
        self._dsn = dsn
        self._prefix = prefix
        self._messages = messages
        self._timing = timing

    @property
    def runners(self) -> PostgresStorage:
        return self

    @property
    def messages(self) -> PgMessageStorage:
        return self._messages

    @asynccontextmanager
    async def session(
        self, address: str, on_lease_lost: Callable[[ShardId], None]
    ) -> AsyncIterator[PgLeaseSession]:
        """Register a runner on a dedicated lock connection, supervised by its own task."""
        session = PgLeaseSession(self._dsn, self._prefix, address, on_lease_lost, self._timing)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            try:
                yield session
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await session.unregister()
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_postgres_storage(
    dsn: str,
    *,
    prefix: str = "trio_cluster_",
    pool_size: int = 10,
    timing: LeaseTiming | None = None,
) -> AsyncIterator[PostgresStorage]:
    """Storage for runners sharing the database at ``dsn``.

    Tables are named with ``prefix``, so clusters with different prefixes
    share a database without meeting. The schema is created or upgraded
    here, before any runner can use it.
    """
    check_prefix(prefix)
    try:
        async with open_connection(dsn, application_name="trio_cluster migrate") as conn:
            await migrate(conn, prefix)
    except (PgError, OSError) as error:
        raise PersistenceError(f"cannot prepare the schema: {error}") from error
    async with open_pool(dsn, size=pool_size, application_name="trio_cluster") as pool:
        messages = PgMessageStorage(pool, dsn, prefix)
        yield PostgresStorage(dsn, prefix, messages, timing or LeaseTiming())
