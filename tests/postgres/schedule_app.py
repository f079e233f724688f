"""A runner process that declares one fixed-interval schedule, for the cron fault tests.

Run from the repository root::

    python -m tests.postgres.schedule_app DSN PREFIX

It declares the schedule ``tick`` (every :data:`EVERY`, the default missed-run
policy: catch up on every instant missed for up to a minute) firing the
persisted RPC ``tick`` of the entity ``Clock/c``, and hosts that entity, on
the PostgreSQL storage at ``DSN`` (tables named with ``PREFIX``). It prints
``ready <address> <machine_id>`` once settled and runs until SIGTERM (a
graceful handoff).

Every run of the handler inserts a row into ``{PREFIX}ticks``: the
scheduled instant (Unix ms, from the request's ``schedule-instant`` header),
the request id, whether it was a redelivery, the pid and the server's clock,
announced by a NOTIFY on the same channel (``<instant>:<pid>:<at>``, the
server's clock in Unix µs). Nothing in
the table is unique: it records handler runs, not instants, so an instant
the library fired twice shows as two rows. The rows are written by the
database, which no fault of the test reaches.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from typing import ClassVar

import msgspec

from trio_cluster import (
    Entity,
    EntityContext,
    ShardingConfig,
    TransportConfig,
    open_runner,
)
from trio_cluster.core.timetable import to_ms
from trio_cluster.pgdriver import Connection, Pool, open_pool
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.runtime.schedules import INSTANT_HEADER
from trio_cluster.schedule import Schedule, Tell

from .app_common import run_app, serve_until_terminated, watching_termination


class Tick(msgspec.Struct, frozen=True):
    pass


Clock = Entity("Clock")
tick = Clock.rpc("tick", Tick, type(None), persisted=True)

NAME = "tick"
EVERY = timedelta(milliseconds=250)
EVERY_MS = EVERY // timedelta(milliseconds=1)
SCHEDULE = Schedule(NAME, Tell(tick, "c", Tick()), every=EVERY)
CONFIG = ShardingConfig(shards_per_group=4)


def ticks_table(prefix: str) -> str:
    return f"{prefix}ticks"


async def create_ticks(conn: Connection, prefix: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {ticks_table(prefix)} ("
        " seq bigserial PRIMARY KEY, instant bigint NOT NULL, request_id bigint NOT NULL,"
        " redelivered bool NOT NULL, pid int NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


class ClockHandler:
    """Configured per process by subclassing (see :func:`serve`)."""

    pool: ClassVar[Pool]
    prefix: ClassVar[str]

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @tick.handler
    async def tick(self, _: Tick) -> None:
        request = self.ctx.request
        instant_ms = to_ms(datetime.fromisoformat(request.headers[INSTANT_HEADER]))
        pid = os.getpid()
        await self.pool.execute(
            f"WITH ins AS (INSERT INTO {ticks_table(self.prefix)}"
            " (instant, request_id, redelivered, pid) VALUES ($1, $2, $3, $4) RETURNING at)"
            " SELECT pg_notify($5, $6 || ':' || (extract(epoch FROM at) * 1000000)::bigint)"
            " FROM ins",
            [
                instant_ms,
                request.request_id,
                request.redelivered,
                pid,
                ticks_table(self.prefix),
                f"{instant_ms}:{pid}",
            ],
        )


async def serve(dsn: str, prefix: str) -> None:
    async with (
        watching_termination() as terminated,
        open_postgres_storage(dsn, prefix=prefix, pool_size=2) as storage,
        open_pool(dsn, size=2, application_name="schedule_app") as pool,
    ):
        async with pool.connection() as conn:
            await create_ticks(conn, prefix)
        handler = type("ConfiguredClock", (ClockHandler,), {"pool": pool, "prefix": prefix})
        async with open_runner(
            Clock.implement(handler),
            storage=storage,
            config=CONFIG,
            transport=TransportConfig(host="127.0.0.1", cluster=prefix),
            schedules=[SCHEDULE],
        ) as runner:
            await serve_until_terminated(runner, terminated)


def main(argv: list[str]) -> None:
    run_app("tests.postgres.schedule_app", serve, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
