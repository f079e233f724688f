"""A runner process that declares one singleton, for the singleton fault tests.

Run from the repository root::

    python -m tests.postgres.singleton_app DSN PREFIX

It declares the singleton ``reporter`` on the PostgreSQL storage at ``DSN``
(tables named with ``PREFIX``), with short lease timings so that a frozen
holder loses its lease in about a second, prints ``ready <address>
<machine_id>`` once settled, and runs until SIGTERM (a graceful handoff).

Each run of the singleton writes an ``entry`` row into ``{PREFIX}singleton_runs``
when it starts and an ``exit`` row when it ends (``how``: ``stopped`` when it
returned on a graceful handoff, ``cancelled`` when it was cancelled), with its
epoch, its pid and the server's clock, each announced by a NOTIFY on the same
channel (``<phase>:<epoch>:<pid>:<how>``). The rows are written by the
database, which no fault of the test reaches, so the test checks the runs from
outside the processes.
"""

from __future__ import annotations

import os
import sys

import trio

from trio_cluster import (
    ShardingConfig,
    Singleton,
    SingletonContext,
    TransportConfig,
    open_runner,
)
from trio_cluster.pgdriver import Connection, Pool, open_pool
from trio_cluster.postgres import LeaseTiming
from trio_cluster.postgres.storage import open_postgres_storage

from .app_common import run_app, serve_until_terminated, watching_termination

NAME = "reporter"
ENTRY = "entry"
EXIT = "exit"
STOPPED = "stopped"
CANCELLED = "cancelled"
TIMING = LeaseTiming(
    heartbeat_interval=0.2,
    liveness_timeout=0.4,
    keepalive_idle=1,
    keepalive_interval=1,
    keepalive_count=1,
    user_timeout_ms=2000,
    idle_session_timeout_ms=1000,
)
"""The runner gives up a silent lock connection after 0.6 s, the server after 1 s."""
LEASE_LOSS_S = 1.0
"""How long a frozen holder keeps its lease on the server (the idle-session timeout)."""
CONFIG = ShardingConfig(shards_per_group=4)
RECORD_S = 5.0
"""Bound on writing a row: the exit row is written under cancellation, shielded."""


def runs_table(prefix: str) -> str:
    return f"{prefix}singleton_runs"


async def create_runs(conn: Connection, prefix: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {runs_table(prefix)} ("
        " seq bigserial PRIMARY KEY, epoch bigint NOT NULL, pid int NOT NULL,"
        " phase text NOT NULL, how text NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def reporter(pool: Pool, prefix: str) -> Singleton:
    async def record(ctx: SingletonContext, phase: str, how: str) -> None:
        pid = os.getpid()
        with trio.CancelScope(shield=True), trio.fail_after(RECORD_S):
            await pool.execute(
                f"WITH ins AS (INSERT INTO {runs_table(prefix)} (epoch, pid, phase, how)"
                " VALUES ($1, $2, $3, $4) RETURNING 1) SELECT pg_notify($5, $6) FROM ins",
                [
                    ctx.epoch,
                    pid,
                    phase,
                    how,
                    runs_table(prefix),
                    f"{phase}:{ctx.epoch}:{pid}:{how}",
                ],
            )

    async def run(ctx: SingletonContext) -> None:
        await record(ctx, ENTRY, "")
        how = CANCELLED
        try:
            await ctx.wait_stopping()
            how = STOPPED
        finally:
            await record(ctx, EXIT, how)

    return Singleton(NAME, run, grace=5.0)


async def serve(dsn: str, prefix: str) -> None:
    async with (
        watching_termination() as terminated,
        open_postgres_storage(dsn, prefix=prefix, pool_size=2, timing=TIMING) as storage,
        open_pool(dsn, size=2, application_name="singleton_app") as pool,
    ):
        async with pool.connection() as conn:
            await create_runs(conn, prefix)
        async with open_runner(
            storage=storage,
            config=CONFIG,
            transport=TransportConfig(host="127.0.0.1", cluster=prefix),
            singletons=[reporter(pool, prefix)],
        ) as runner:
            await serve_until_terminated(runner, terminated)


def main(argv: list[str]) -> None:
    run_app("tests.postgres.singleton_app", serve, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
