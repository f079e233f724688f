"""A runner process for the persisted-stream test across processes.

Run from the repository root::

    python -m tests.postgres.stream_app DSN PREFIX

It hosts ``Ticker`` of ``tests.stream_entities`` on the PostgreSQL storage at
``DSN`` (tables named with ``PREFIX``), listening on 127.0.0.1; prints
``ready <address> <machine_id>`` once settled and runs until SIGTERM. What
its stream handlers record (``started`` with their ``resume_from``,
``produced`` per chunk) is written as rows of ``{PREFIX}handled`` with the
process's pid, as ``tests.postgres.interrupt_app`` writes its records.
"""

from __future__ import annotations

import sys

import trio

from trio_cluster import open_runner
from trio_cluster.pgdriver import open_pool
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import TEST_CONFIG

from ..stream_entities import tickers
from .app_common import run_app, serve_until_terminated, watching_termination
from .cluster_app import transport
from .interrupt_app import create_handled, write_records


async def serve(dsn: str, prefix: str) -> None:
    async with (
        watching_termination() as terminated,
        open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
        open_pool(dsn, size=2, application_name="stream_app") as pool,
    ):
        async with pool.connection() as conn:
            await create_handled(conn, prefix)
        impl, recorder = tickers()
        async with trio.open_nursery() as recording:
            recording.start_soon(write_records, recorder, pool, prefix)
            async with open_runner(
                impl, storage=storage, config=TEST_CONFIG, transport=transport(prefix)
            ) as runner:
                await serve_until_terminated(runner, terminated)
            recording.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    run_app("tests.postgres.stream_app", serve, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
