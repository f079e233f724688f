"""Membership reads mark a dead runner's row once, and announce it once (``postgres.membership``).

A runner is faked with a bare connection holding a machine-id lock and its
row, so nothing else (no lease session, no watcher) could mark it.
"""

from __future__ import annotations

import uuid

import trio

from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.schema import lock_namespace
from trio_cluster.postgres.storage import open_postgres_storage

ALIVE = RunnerSpec("alive", 1.0, frozenset({"default"}))


async def fake_runner(conn: Connection, prefix: str, machine_id: int, address: str) -> None:
    namespace = await lock_namespace(conn, f"{prefix}:runners")
    await conn.execute("SELECT pg_advisory_lock($1, $2)", [namespace, machine_id])
    await conn.execute(
        f"INSERT INTO {prefix}runners (machine_id, address, lock_pid)"
        " VALUES ($1, $2, pg_backend_pid())",
        [machine_id, address],
    )


async def test_a_read_marks_a_dead_row_once_and_announces_it_once(pg_dsn: str) -> None:
    prefix = f"m{uuid.uuid4().hex[:8]}_"
    channel = f"{prefix}events"
    async with (
        open_postgres_storage(pg_dsn, prefix=prefix) as storage,
        open_connection(pg_dsn) as listener,
        open_connection(pg_dsn) as admin,
    ):
        await listener.listen(channel)
        async with open_connection(pg_dsn) as alive, open_connection(pg_dsn) as doomed:
            await fake_runner(alive, prefix, 3, "alive")
            await fake_runner(doomed, prefix, 7, "doomed")
            assert {spec.address for spec in await storage.live_runners()} == {"alive", "doomed"}
            pid = doomed.backend_pid
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", [pid])
            with trio.fail_after(10):
                assert await storage.live_runners() == [ALIVE]
                assert (await listener.wait_notification()).payload == "m:"
            # Marked: read again, it is neither listed nor announced a second time.
            assert await storage.live_runners() == [ALIVE]
            await admin.execute("SELECT pg_notify($1, 'end')", [channel])
            with trio.fail_after(10):
                assert (await listener.wait_notification()).payload == "end"
            rows = await admin.fetch(
                f"SELECT machine_id, lock_pid FROM {prefix}runners ORDER BY machine_id"
            )
            assert rows == [(3, alive.backend_pid), (7, -pid)]
