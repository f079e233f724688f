"""A runner process for the interrupt and acknowledged-tell tests across processes.

Run from the repository root::

    python -m tests.postgres.interrupt_app DSN PREFIX

It hosts ``Sleeper`` of ``tests.interrupt_entities`` (mailbox capacity 1, so
that one blocked handler and one queued request fill it) on the PostgreSQL
storage at ``DSN`` (tables named with ``PREFIX``), listening on 127.0.0.1;
prints ``ready <address> <machine_id>`` once settled and runs until SIGTERM.

What the handlers record (``started``, ``cancelled``, ``finished``, ...) is
written, in order, as rows of ``{PREFIX}handled`` with the process's pid,
each announced by a NOTIFY on ``{PREFIX}handled`` (``<what>:<n>:<pid>``), so a
test sees from outside what happened inside. A NOTIFY on ``{PREFIX}release``
releases the ``steady`` handlers (``Recorder.release``).
"""

from __future__ import annotations

import os
import sys

import trio

from trio_cluster import EntityOptions, open_runner
from trio_cluster.pgdriver import Connection, Pool, open_connection, open_pool
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import TEST_CONFIG

from ..interrupt_entities import Recorder, sleepers
from .app_common import run_app, serve_until_terminated, watching_termination
from .cluster_app import transport

MAILBOX_CAPACITY = 1


def handled(prefix: str) -> str:
    """The table of handler records, and the channel announcing each."""
    return f"{prefix}handled"


def release_channel(prefix: str) -> str:
    return f"{prefix}release"


async def create_handled(conn: Connection, prefix: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {handled(prefix)} ("
        " seq bigserial PRIMARY KEY, what text NOT NULL, n int NOT NULL, pid int NOT NULL)"
    )


async def write_records(recorder: Recorder, pool: Pool, prefix: str) -> None:
    """Each record, in order, as a row and its NOTIFY (one statement, so one transaction)."""
    pid = os.getpid()
    written = 0

    def more() -> bool:
        return len(recorder.events) > written

    while True:
        await recorder.wait_until(more)
        what, n = recorder.events[written]
        await pool.execute(
            f"WITH ins AS (INSERT INTO {handled(prefix)} (what, n, pid)"
            " VALUES ($1, $2, $3) RETURNING 1) SELECT pg_notify($4, $5) FROM ins",
            [what, n, pid, handled(prefix), f"{what}:{n}:{pid}"],
        )
        written += 1


async def release_on_notify(
    recorder: Recorder, dsn: str, prefix: str, *, task_status: trio.TaskStatus[None]
) -> None:
    async with open_connection(dsn) as listener:
        await listener.listen(release_channel(prefix))
        task_status.started()
        await listener.wait_notification()
        recorder.release.set()


async def serve(dsn: str, prefix: str) -> None:
    async with (
        watching_termination() as terminated,
        open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
        open_pool(dsn, size=2, application_name="interrupt_app") as pool,
    ):
        async with pool.connection() as conn:
            await create_handled(conn, prefix)
        impl, recorder = sleepers(EntityOptions(mailbox_capacity=MAILBOX_CAPACITY))
        async with trio.open_nursery() as recording:
            recording.start_soon(write_records, recorder, pool, prefix)
            await recording.start(release_on_notify, recorder, dsn, prefix)
            async with open_runner(
                impl, storage=storage, config=TEST_CONFIG, transport=transport(prefix)
            ) as runner:
                await serve_until_terminated(runner, terminated)
            recording.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    run_app("tests.postgres.interrupt_app", serve, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
