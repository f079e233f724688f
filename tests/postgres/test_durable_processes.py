"""Timers and signals across real runner processes: SIGKILL the entity's runner, start another.

The runners are ``tests.postgres.durable_app`` processes (a ``Desk`` with
timers and a request that waits on a deferred); the test sends, and
completes the deferred, through an in-test client runner that hosts
nothing. Handlers are waited for by the NOTIFYs they send, a killed
runner's leases by its lock backend leaving the server.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from trio_cluster import Runner, TransportConfig, open_runner
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.storage import open_postgres_storage

from .durable_app import CONFIG, Order, Schedule, Unschedule, approve, channel, schedule, unschedule
from .test_state_processes import WAIT_S, Node, Processes


@attrs.define
class World:
    prefix: str
    conn: Connection
    listener: Connection
    client: Runner
    processes: Processes

    async def next_event(self, event: str, pid: int) -> str:
        """The detail of the next ``event`` announced by process ``pid``."""
        with trio.fail_after(WAIT_S):
            while True:
                notification = await self.listener.wait_notification()
                kind, detail, sender = notification.payload.split(":")
                if (kind, int(sender)) == (event, pid):
                    return detail

    async def kill(self, node: Node) -> None:
        """SIGKILL, then wait until the server has ended its lock session (its leases)."""
        pid = await self.conn.fetchval(
            f"SELECT lock_pid FROM {self.prefix}runners WHERE machine_id = $1", [node.machine_id]
        )
        node.process.kill()
        with trio.fail_after(WAIT_S):
            assert await node.process.wait() == -signal.SIGKILL
            await self.conn.execute("SELECT pg_terminate_backend($1, $2)", [pid, 15_000])

    async def unprocessed(self) -> int:
        return int(
            await self.conn.fetchval(
                f"SELECT count(*) FROM {self.prefix}messages WHERE NOT processed"
            )
        )


@asynccontextmanager
async def open_world(dsn: str, name: str) -> AsyncIterator[World]:
    prefix = f"{name}_{uuid.uuid4().hex[:8]}_"
    processes = Processes(dsn, prefix, app="tests.postgres.durable_app")
    try:
        async with (
            open_connection(dsn) as conn,
            open_connection(dsn) as listener,
            open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
            open_runner(
                storage=storage, config=CONFIG, transport=TransportConfig(cluster=prefix)
            ) as client,
        ):
            await listener.listen(channel(prefix))
            yield World(prefix, conn, listener, client, processes)
    finally:
        await processes.cleanup()


async def test_a_signal_sent_while_the_entitys_runner_is_down_resumes_its_request(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "signal") as world:
        first = await world.processes.start(None)
        answer: list[str] = []
        answered = trio.Event()

        async def ask() -> None:
            answer.append(await world.client.ask(approve, "d1", Order("o-1"), timeout=2 * WAIT_S))
            answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            order_id, token = (await world.next_event("token", first.process.pid)).split(".", 1)
            assert order_id == "o-1"
            await world.next_event("suspended", first.process.pid)
            await world.kill(first)
            # Nobody serves the entity: the completion is stored, and waits for an owner.
            await world.client.complete_deferred(token, "approved")
            assert not answered.is_set()
            second = await world.processes.start(None)
            with trio.fail_after(WAIT_S):
                await answered.wait()
            # The handler ran again from the start on the new owner.
            assert await world.next_event("token", second.process.pid) == f"o-1.{token}"
        assert answer == ["o-1: approved"]
        await world.processes.stop(second)
        assert await world.unprocessed() == 0


async def test_a_timer_armed_before_its_runner_is_killed_fires_once_on_the_next(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "timer") as world:
        first = await world.processes.start(None)
        client = world.client
        await client.ask(schedule, "d2", Schedule("x", "old", 3600))
        await client.ask(schedule, "d2", Schedule("y", "cancelled", 3600))
        assert await client.ask(unschedule, "d2", Unschedule("y"))
        await client.ask(schedule, "d2", Schedule("x", "new", 2.0))  # replaces "old"
        await world.kill(first)
        second = await world.processes.start(None)
        assert await world.next_event("fired", second.process.pid) == "new"
        await world.processes.stop(second)
        # Nothing else is left to fire: the replaced and cancelled timers are gone.
        assert await world.unprocessed() == 0
