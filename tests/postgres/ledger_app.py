"""A runner process for the crash-recovery tests.

Run from the repository root::

    python -m tests.postgres.ledger_app DSN PREFIX MODE

It hosts the ``Ledger`` entity on the PostgreSQL storage at ``DSN`` (tables
named with ``PREFIX``), prints ``ready <machine_id>`` once the runner serves
the shards assigned to it, and runs until SIGTERM or SIGINT, when it shuts
down gracefully (drains and releases its shards).

Every ``post`` handler run writes rows into ``{PREFIX}ledger_log``: an
``entered`` row when it starts and, unless MODE is ``hold``, a
``completed`` row carrying the balance it returns. Each row is announced by
a NOTIFY on ``{PREFIX}ledger`` (``<phase>:<key>:<pid>``, sent on commit),
so a test can wait for a handler in another process without polling.

MODE ``hold`` makes every ``post`` handler block forever after its
``entered`` row: the process can then be killed with the request
acknowledged and half-processed. MODE ``serve`` completes them.

The balance is the sum of the entity's completed amounts, read from the
table, so it carries over from one process to the next.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import ClassVar

import msgspec
import trio

from trio_cluster import Entity, EntityContext, EntityOptions, ShardingConfig, open_runner
from trio_cluster.pgdriver import Connection, Pool, open_connection, open_pool
from trio_cluster.postgres.storage import open_postgres_storage


class Post(msgspec.Struct, frozen=True):
    key: str
    amount: int


Ledger = Entity("Ledger")
post = Ledger.rpc("post", Post, int, primary_key=lambda p: p.key, persisted=True)

CONFIG = ShardingConfig(
    shards_per_group=4,
    send_timeout=15.0,
    entity_termination_timeout=1.0,
    entity_defaults=EntityOptions(keep_alive=True),
)
"""Shared by the app and its clients: runners must agree on the shard layout."""

MODES = ("hold", "serve")
ENTERED = "entered"
COMPLETED = "completed"


def log_table(prefix: str) -> str:
    return f"{prefix}ledger_log"


def log_channel(prefix: str) -> str:
    return f"{prefix}ledger"


async def create_log(conn: Connection, prefix: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {log_table(prefix)} ("
        " id bigserial PRIMARY KEY, entity_id text NOT NULL, key text NOT NULL,"
        " amount int NOT NULL, runner_pid int NOT NULL, phase text NOT NULL,"
        " balance bigint, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


class LedgerHandler:
    """Configured per process by subclassing (see :func:`main`)."""

    pool: ClassVar[Pool]
    prefix: ClassVar[str]
    hold: ClassVar[bool]

    def __init__(self, ctx: EntityContext) -> None:
        self.entity_id = ctx.address.entity_id

    @post.handler
    async def post(self, p: Post) -> int:
        await self._record(ENTERED, p)
        if self.hold:
            await trio.sleep_forever()
        return await self._record(COMPLETED, p)

    async def _record(self, phase: str, p: Post) -> int:
        """Insert a log row and announce it, in one transaction; the new balance."""
        table = log_table(self.prefix)
        pid = os.getpid()
        async with self.pool.connection() as conn, conn.transaction():
            balance = await conn.fetchval(
                f"INSERT INTO {table} (entity_id, key, amount, runner_pid, phase, balance)"
                " SELECT $1, $2, $3, $4, $5, CASE WHEN $5 = 'completed' THEN"
                f" $3::int8 + (SELECT coalesce(sum(amount), 0) FROM {table}"
                "  WHERE entity_id = $1 AND phase = 'completed') END"
                " RETURNING balance",
                [self.entity_id, p.key, p.amount, pid, phase],
            )
            await conn.execute(
                "SELECT pg_notify($1, $2)", [log_channel(self.prefix), f"{phase}:{p.key}:{pid}"]
            )
        return 0 if balance is None else int(balance)


async def serve(dsn: str, prefix: str, mode: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
            open_pool(dsn, size=2, application_name="ledger_app") as pool,
        ):
            async with open_connection(dsn) as conn:
                await create_log(conn, prefix)
            handler = type(
                "ConfiguredLedger",
                (LedgerHandler,),
                {"pool": pool, "prefix": prefix, "hold": mode == "hold"},
            )
            async with open_runner(
                Ledger.implement(handler), storage=storage, config=CONFIG
            ) as runner:
                # Ready means serving exactly the shards assigned to this runner.
                await runner.settled()
                print(f"ready {runner.machine_id}", flush=True)
                async for _ in signals:
                    break


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[2] not in MODES:
        sys.exit(f"usage: python -m tests.postgres.ledger_app DSN PREFIX {{{','.join(MODES)}}}")
    dsn, prefix, mode = argv
    trio.run(serve, dsn, prefix, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
