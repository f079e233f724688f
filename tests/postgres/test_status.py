"""The status view's read on PostgreSQL: the storage conformance scenario."""

from __future__ import annotations

import uuid

from trio_cluster.postgres.storage import open_postgres_storage

from ..status_scenario import check_read_status


async def test_read_status_on_postgres(pg_dsn: str) -> None:
    prefix = f"status_{uuid.uuid4().hex[:8]}_"
    async with open_postgres_storage(pg_dsn, prefix=prefix) as storage:
        await check_read_status(storage)
