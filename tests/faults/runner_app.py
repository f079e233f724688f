"""A runner process for the fault schedules.

Run from the repository root::

    python -m tests.faults.runner_app DSN PREFIX

It hosts ``FaultWorker`` on the PostgreSQL storage at ``DSN`` with the quick
lease timing of ``common.LEASE_TIMING``, listens for peers on 127.0.0.1,
prints ``ready <address> <machine_id>`` once it serves exactly the shards
assigned to it, and runs until SIGTERM (or until its standard input ends,
so that a dead harness leaves no runner behind); it then hands its shards
off and exits 0. Any other exit is a crash, and the harness says so (warnings and
tracebacks go to stderr, which the harness keeps).

Each ``post`` run writes an ``entry`` row when it starts and an ``exit``
row when its work is done, with a run id of its own, the pid and the
server's clock, so the harness can see from outside which runs overlapped
and which one's reply was stored. The writes are retried across database
outages: a handler that gave up would turn a PostgreSQL restart into a
defect of the workload rather than a test of the runner. Lease loss
cancels the handler wherever it waits, as the runtime intends.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import ClassVar

import trio

from trio_cluster import EntityContext, open_runner, wait_for_termination
from trio_cluster.core.retry import RetryPolicy
from trio_cluster.pgdriver import PgError, Pool, open_pool
from trio_cluster.postgres.storage import open_postgres_storage

from .common import (
    CONFIG,
    ENTRY,
    EXIT,
    LEASE_TIMING,
    Echo,
    Echoed,
    Outcome,
    Post,
    Worker,
    echo,
    post,
    runs_table,
    transport,
)

HANDLER_SLEEP_S = 0.01
"""Work between the entry and exit rows, so that overlapping runs would show."""
RECORD_RETRY = RetryPolicy(
    base_delay=0.05, factor=2.0, max_delay=0.5, max_attempts=200, max_elapsed=60.0
)
"""Rows are retried through an outage far longer than any schedule keeps PostgreSQL down."""


class WorkerHandler:
    """Configured per process by subclassing (see :func:`serve`)."""

    pool: ClassVar[Pool]
    prefix: ClassVar[str]

    def __init__(self, ctx: EntityContext) -> None:
        self.entity_id = ctx.address.entity_id

    @post.handler
    async def post(self, p: Post) -> Outcome:
        run = uuid.uuid4().hex[:16]
        await self._record(run, ENTRY, p.key)
        await trio.sleep(HANDLER_SLEEP_S)
        await self._record(run, EXIT, p.key)
        return Outcome(os.getpid(), run)

    @echo.handler
    async def echo(self, e: Echo) -> Echoed:
        return Echoed(e.text, self.entity_id, os.getpid())

    async def _record(self, run: str, phase: str, key: str) -> None:
        """Insert one phase row; a retry after a lost commit finds it and does nothing."""
        delays = RECORD_RETRY.delays()
        while True:
            try:
                await self.pool.execute(
                    f"INSERT INTO {runs_table(self.prefix)}"
                    " (run, phase, entity_id, request_key, pid) VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (run, phase) DO NOTHING",
                    [run, phase, self.entity_id, key, os.getpid()],
                )
            except (PgError, OSError):
                delay = next(delays, None)
                if delay is None:
                    raise
                await trio.sleep(delay)
            else:
                return


async def until_stdin_ends() -> None:
    """Return when standard input reaches its end: the harness that started us is gone."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass


async def serve(dsn: str, prefix: str) -> None:
    terminated = trio.Event()

    async def watch_signals() -> None:
        await wait_for_termination()
        terminated.set()

    async def watch_stdin() -> None:
        await until_stdin_ends()
        terminated.set()

    async with trio.open_nursery() as nursery:
        # SIGTERM is watched before anything else: one that arrives while the
        # runner starts is a request to stop, not a crash.
        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_stdin)
        async with (
            open_postgres_storage(dsn, prefix=prefix, pool_size=4, timing=LEASE_TIMING) as storage,
            open_pool(dsn, size=4, application_name="faults handler") as pool,
        ):
            handler = type("ConfiguredWorker", (WorkerHandler,), {"pool": pool, "prefix": prefix})
            async with open_runner(
                Worker.implement(handler),
                storage=storage,
                config=CONFIG,
                transport=transport(prefix),
            ) as runner:
                await runner.settled()
                print(f"ready {runner.address} {runner.machine_id}", flush=True)
                await terminated.wait()
            # Leaving the block above handed every shard off.
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m tests.faults.runner_app DSN PREFIX")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    dsn, prefix = argv
    trio.run(serve, dsn, prefix)


if __name__ == "__main__":
    main(sys.argv[1:])
