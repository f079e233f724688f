"""A runner process with durable state, for the state tests across processes.

Run from the repository root::

    python -m tests.postgres.state_app DSN PREFIX MODE

It hosts the ``Wallet`` entity, whose state (a balance and the keys it
applied) is kept by trio_cluster, on the PostgreSQL storage at ``DSN``
(tables named with ``PREFIX``), and listens for peers on 127.0.0.1. It
prints ``ready <address> <machine_id>`` once it serves the shards assigned
to it, and runs until SIGTERM or SIGINT (then hands its shards off, exits 0).

Each ``credit`` run announces ``entered:<key>:<pid>`` when it has applied its
change to the state and ``completed:<key>:<pid>`` when it returns, by NOTIFY
on ``{PREFIX}wallet``. In MODE ``hold``, every run waits after ``entered``
for the next NOTIFY on ``{PREFIX}wallet_release`` before it returns: a
test can stop or kill the process with a change made and not committed.
The lease timing is quick, so that a process stopped with SIGSTOP loses its
lease in a few seconds.
"""

from __future__ import annotations

import os
import sys
from typing import ClassVar

import msgspec
import trio

from trio_cluster import (
    Entity,
    EntityContext,
    EntityOptions,
    ShardingConfig,
    State,
    TransportConfig,
    open_runner,
    wait_for_termination,
)
from trio_cluster.pgdriver import Pool, open_connection, open_pool
from trio_cluster.postgres.leases import LeaseTiming
from trio_cluster.postgres.storage import open_postgres_storage


class Credit(msgspec.Struct, frozen=True):
    key: str
    amount: int


class Balance(msgspec.Struct, frozen=True):
    pass


class WalletState(msgspec.Struct):
    balance: int = 0
    applied: list[str] = []


Wallet = Entity("Wallet")
credit = Wallet.rpc("credit", Credit, int, persisted=True, primary_key=lambda c: c.key)
balance = Wallet.rpc("balance", Balance, int)

CONFIG = ShardingConfig(
    shards_per_group=6,
    send_timeout=10.0,
    entity_termination_timeout=3.0,
    entity_defaults=EntityOptions(keep_alive=True),
)
"""Shared by the app and its clients: runners must agree on the shard layout."""
TIMING = LeaseTiming(
    heartbeat_interval=0.5,
    liveness_timeout=1.0,
    keepalive_idle=1,
    keepalive_interval=1,
    keepalive_count=2,
    user_timeout_ms=3000,
    idle_session_timeout_ms=2000,
)
MODES = ("serve", "hold")
ENTERED = "entered"
COMPLETED = "completed"


def channel(prefix: str) -> str:
    return f"{prefix}wallet"


def release_channel(prefix: str) -> str:
    return f"{prefix}wallet_release"


class Gate:
    """Opened once by each ``release`` NOTIFY: a run waits for the first one after it entered."""

    def __init__(self) -> None:
        self.opened = trio.Event()

    def open(self) -> None:
        self.opened.set()
        self.opened = trio.Event()


class WalletHandler:
    """Configured per process by subclassing (see :func:`serve`)."""

    pool: ClassVar[Pool]
    prefix: ClassVar[str]
    gate: ClassVar[Gate]
    hold: ClassVar[bool]

    def __init__(self, ctx: EntityContext, state: State[WalletState]) -> None:
        self.state = state

    @credit.handler
    async def credit(self, c: Credit) -> int:
        self.state.value.balance += c.amount
        self.state.value.applied.append(c.key)
        opened = self.gate.opened
        await self._announce(ENTERED, c.key)
        if self.hold:
            await opened.wait()
        await self._announce(COMPLETED, c.key)
        return self.state.value.balance

    @balance.handler
    async def get_balance(self, _: Balance) -> int:
        return self.state.value.balance

    async def _announce(self, phase: str, key: str) -> None:
        await self.pool.execute(
            "SELECT pg_notify($1, $2)", [channel(self.prefix), f"{phase}:{key}:{os.getpid()}"]
        )


async def serve(dsn: str, prefix: str, mode: str) -> None:
    stop = trio.Event()
    gate = Gate()

    async def watch_signals() -> None:
        await wait_for_termination()
        stop.set()

    async def watch_release() -> None:
        async with open_connection(dsn) as conn:
            await conn.listen(release_channel(prefix))
            while True:
                await conn.wait_notification()
                gate.open()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_release)
        async with (
            open_postgres_storage(dsn, prefix=prefix, pool_size=4, timing=TIMING) as storage,
            open_pool(dsn, size=2, application_name="state_app") as pool,
        ):
            handler = type(
                "ConfiguredWallet",
                (WalletHandler,),
                {"pool": pool, "prefix": prefix, "gate": gate, "hold": mode == "hold"},
            )
            async with open_runner(
                Wallet.implement(handler, state=WalletState),
                storage=storage,
                config=CONFIG,
                transport=TransportConfig(cluster=prefix),
            ) as runner:
                await runner.settled()
                print(f"ready {runner.address} {runner.machine_id}", flush=True)
                await stop.wait()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[2] not in MODES:
        sys.exit(f"usage: python -m tests.postgres.state_app DSN PREFIX {{{','.join(MODES)}}}")
    dsn, prefix, mode = argv
    trio.run(serve, dsn, prefix, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
