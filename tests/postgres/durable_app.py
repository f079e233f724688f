"""A runner process with timers and suspended requests, for the restart tests across processes.

Run from the repository root::

    python -m tests.postgres.durable_app DSN PREFIX

It hosts the ``Desk`` entity on the PostgreSQL storage at ``DSN`` (tables
named with ``PREFIX``), prints ``ready <address> <machine_id>`` once it
serves its shards, and runs until SIGTERM or SIGINT. It announces by NOTIFY
on ``{PREFIX}desk``, each payload ``<event>:<detail>:<pid>``:

- ``fired:<label>``: a timer's ``ring`` request ran here;
- ``token:<order id>.<resume token>``: ``approve`` is about to wait on its
  deferred ``approval`` (the token is URL-safe, so ``:`` splits cleanly);
- ``suspended:<request id>``: a request's suspension is stored.
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
    Instrument,
    ShardingConfig,
    TransportConfig,
    open_runner,
    wait_for_termination,
)
from trio_cluster.pgdriver import Pool, open_pool
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.runtime.calls import Handling

from .state_app import TIMING


class Ring(msgspec.Struct, frozen=True):
    label: str


class Schedule(msgspec.Struct, frozen=True):
    name: str
    label: str
    seconds: float


class Unschedule(msgspec.Struct, frozen=True):
    name: str


class Order(msgspec.Struct, frozen=True):
    order_id: str


Desk = Entity("Desk")
ring = Desk.rpc("ring", Ring, type(None), persisted=True)
schedule = Desk.rpc("schedule", Schedule, type(None), persisted=True)
unschedule = Desk.rpc("unschedule", Unschedule, bool, persisted=True)
approve = Desk.rpc("approve", Order, str, persisted=True, primary_key=lambda o: o.order_id)

CONFIG = ShardingConfig(
    shards_per_group=6,
    send_timeout=10.0,
    entity_termination_timeout=3.0,
    entity_defaults=EntityOptions(keep_alive=True),
)


def channel(prefix: str) -> str:
    return f"{prefix}desk"


class Announcer:
    """NOTIFYs on the test's channel, from handlers and from the instrument's own tasks."""

    def __init__(self, pool: Pool, prefix: str, nursery: trio.Nursery) -> None:
        self.pool = pool
        self.prefix = prefix
        self.nursery = nursery

    async def announce(self, event: str, detail: str) -> None:
        await self.pool.execute(
            "SELECT pg_notify($1, $2)", [channel(self.prefix), f"{event}:{detail}:{os.getpid()}"]
        )


class SuspensionsAnnounced(Instrument):
    def __init__(self, announcer: Announcer) -> None:
        self.announcer = announcer

    def handling_finished(self, handling: Handling, outcome: str) -> None:
        if outcome == "suspended":
            announce = self.announcer.announce
            self.announcer.nursery.start_soon(announce, "suspended", str(handling.request_id))


class DeskHandler:
    announcer: ClassVar[Announcer]

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @ring.handler
    async def ring(self, r: Ring) -> None:
        await self.announcer.announce("fired", r.label)

    @schedule.handler
    async def schedule(self, s: Schedule) -> None:
        await self.ctx.timers.arm(s.name, ring, Ring(s.label), after=s.seconds)

    @unschedule.handler
    async def unschedule(self, u: Unschedule) -> bool:
        return await self.ctx.timers.cancel(u.name)

    @approve.handler
    async def approve(self, o: Order) -> str:
        await self.announcer.announce("token", f"{o.order_id}.{self.ctx.resume_token('approval')}")
        verdict = await self.ctx.deferred("approval", str)
        return f"{o.order_id}: {verdict}"


async def serve(dsn: str, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        async with (
            open_postgres_storage(dsn, prefix=prefix, pool_size=4, timing=TIMING) as storage,
            open_pool(dsn, size=2, application_name="durable_app") as pool,
        ):
            announcer = Announcer(pool, prefix, nursery)
            handler = type("ConfiguredDesk", (DeskHandler,), {"announcer": announcer})
            async with open_runner(
                Desk.implement(handler),
                storage=storage,
                config=CONFIG,
                transport=TransportConfig(cluster=prefix),
                instruments=[SuspensionsAnnounced(announcer)],
            ) as runner:
                await runner.settled()
                print(f"ready {runner.address} {runner.machine_id}", flush=True)
                await wait_for_termination()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m tests.postgres.durable_app DSN PREFIX")
    dsn, prefix = argv
    trio.run(serve, dsn, prefix)


if __name__ == "__main__":
    main(sys.argv[1:])
