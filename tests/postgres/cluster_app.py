"""A runner process for the many-runners tests.

Run from the repository root::

    python -m tests.postgres.cluster_app DSN PREFIX

It hosts the ``Worker`` entity on the PostgreSQL storage at ``DSN`` (tables
named with ``PREFIX``), listens for peers on 127.0.0.1 (cluster ``PREFIX``),
prints ``ready <address> <machine_id>`` once the runner serves exactly the
shards assigned to it, and runs until SIGTERM or SIGINT; it then leaves its
``open_runner`` block (a graceful handoff: drain, release, unregister) and
exits 0. SIGUSR1 blocks its event loop for ``FREEZE_S`` (a frozen loop, as a
long stall on it would be). The lease timing comes from ``TRIO_CLUSTER_LEASE_*``
and the safety poll from ``TRIO_CLUSTER_MEMBERSHIP_POLL_INTERVAL``, when set.

Every ``post`` handler run writes an ``entry`` row into ``{PREFIX}runs`` when
it starts and an ``exit`` row when it is done, with the runner's pid and the
server's clock (``clock_timestamp()``), and sleeps briefly in between, so
that two runs of one entity overlapping in time would show in the table.
A ``ticks`` stream writes an ``entry`` row when it starts and an ``exit`` row
in its ``finally`` (cancel-shielded), so its end, interrupted or not, shows
from outside the process.
Each row is announced by a NOTIFY on ``{PREFIX}runs`` (``<phase>:<entity_id>:<key>:<pid>``,
sent on commit), so a test can wait for handlers without polling.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import ClassVar

import attrs
import msgspec
import trio

from trio_cluster import (
    Entity,
    EntityContext,
    EntityOptions,
    ShardingConfig,
    TransportConfig,
    open_runner,
)
from trio_cluster.pgdriver import Connection, Pool, open_pool
from trio_cluster.postgres.leases import LeaseTiming
from trio_cluster.postgres.storage import open_postgres_storage

from .app_common import run_app, serve_until_terminated, watching_termination


class Post(msgspec.Struct, frozen=True):
    key: str
    amount: int


class Echo(msgspec.Struct, frozen=True):
    text: str


class Ticks(msgspec.Struct, frozen=True):
    key: str
    n: int
    """Chunks to yield; -1: for ever (until the caller leaves)."""


class Tick(msgspec.Struct, frozen=True):
    i: int
    pid: int


class Echoed(msgspec.Struct, frozen=True):
    text: str
    entity_id: str
    address: str
    pid: int


Worker = Entity("Worker")
post = Worker.rpc("post", Post, int, primary_key=lambda p: p.key, persisted=True)
"""Persisted and idempotent by ``key``; answers the pid of the process that ran it."""
echo = Worker.rpc("echo", Echo, Echoed)
"""Volatile: travels runner to runner over TCP; answers where it ran."""
ticks = Worker.stream("ticks", Ticks, Tick)
"""A volatile stream over TCP: ``n`` ticks from the process that runs it."""

SHARDS = 12
CONFIG = ShardingConfig(
    shards_per_group=SHARDS,
    send_timeout=10.0,
    entity_termination_timeout=5.0,
    entity_defaults=EntityOptions(keep_alive=True),
)
"""Shared by the app and its clients: runners must agree on the shard layout."""

HANDLER_SLEEP = 0.005
FREEZE_S = 120.0
"""How long SIGUSR1 blocks the event loop: longer than any test waits on it."""
POLL_VARIABLE = "TRIO_CLUSTER_MEMBERSHIP_POLL_INTERVAL"


def app_config() -> ShardingConfig:
    """``CONFIG``, with the safety poll of ``POLL_VARIABLE`` when set (the rest stays shared)."""
    poll = os.environ.get(POLL_VARIABLE)
    return CONFIG if poll is None else attrs.evolve(CONFIG, membership_poll_interval=float(poll))


async def freeze_on_sigusr1() -> None:
    """Each SIGUSR1 blocks the event loop: nothing of the runner runs meanwhile."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            time.sleep(FREEZE_S)  # noqa: ASYNC251 - blocking the loop is the point


ENTRY = "entry"
EXIT = "exit"


def runs_table(prefix: str) -> str:
    return f"{prefix}runs"


def runs_channel(prefix: str) -> str:
    return f"{prefix}runs"


def transport(prefix: str) -> TransportConfig:
    return TransportConfig(host="127.0.0.1", cluster=prefix)


async def create_runs(conn: Connection, prefix: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {runs_table(prefix)} ("
        " seq bigserial PRIMARY KEY, entity_id text NOT NULL, request_key text NOT NULL,"
        " pid int NOT NULL, phase text NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


class WorkerHandler:
    """Configured per process by subclassing (see :func:`serve`)."""

    pool: ClassVar[Pool]
    prefix: ClassVar[str]

    def __init__(self, ctx: EntityContext) -> None:
        self.entity_id = ctx.address.entity_id
        self.runner_address = ctx.runner_address

    @post.handler
    async def post(self, p: Post) -> int:
        await self._record(ENTRY, p.key)
        await trio.sleep(HANDLER_SLEEP)
        await self._record(EXIT, p.key)
        return os.getpid()

    @echo.handler
    async def echo(self, e: Echo) -> Echoed:
        return Echoed(e.text, self.entity_id, self.runner_address, os.getpid())

    @ticks.handler
    async def ticks(self, t: Ticks) -> AsyncIterator[Tick]:
        await self._record(ENTRY, t.key)
        try:
            i = 0
            while i != t.n:
                yield Tick(i, os.getpid())
                i += 1
        finally:
            with trio.CancelScope(shield=True):
                await self._record(EXIT, t.key)

    async def _record(self, phase: str, key: str) -> None:
        """Insert a run row and announce it, in one statement (so one transaction)."""
        pid = os.getpid()
        await self.pool.execute(
            f"WITH ins AS (INSERT INTO {runs_table(self.prefix)}"
            " (entity_id, request_key, pid, phase) VALUES ($1, $2, $3, $4) RETURNING 1)"
            " SELECT pg_notify($5, $6) FROM ins",
            [
                self.entity_id,
                key,
                pid,
                phase,
                runs_channel(self.prefix),
                f"{phase}:{self.entity_id}:{key}:{pid}",
            ],
        )


async def serve(dsn: str, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(freeze_on_sigusr1)
        async with (
            watching_termination() as terminated,
            open_postgres_storage(
                dsn, prefix=prefix, pool_size=4, timing=LeaseTiming.from_env()
            ) as storage,
            open_pool(dsn, size=4, application_name="cluster_app") as pool,
        ):
            async with pool.connection() as conn:
                await create_runs(conn, prefix)
            handler = type("ConfiguredWorker", (WorkerHandler,), {"pool": pool, "prefix": prefix})
            async with open_runner(
                Worker.implement(handler),
                storage=storage,
                config=app_config(),
                transport=transport(prefix),
            ) as runner:
                await serve_until_terminated(runner, terminated)
            # Leaving the block above handed every shard off.
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    run_app("tests.postgres.cluster_app", serve, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
