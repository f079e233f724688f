"""Interrupts and acknowledged tells across runner processes, on PostgreSQL.

The runners are ``tests.postgres.interrupt_app`` processes hosting ``Sleeper``
(mailbox capacity 1); the requests come from a client runner in the test,
which hosts nothing, so each crosses to a process: volatile ones over TCP,
persisted ones through the database. What the handlers did is read from
outside, from the rows (and their NOTIFYs) the app writes for each record:

- a. a cancelled volatile ask cancels its handler in the other process (its
  ``finally`` ran); one that times out leaves no handler running;
- b. a withdrawn persisted ask: its handler is cancelled, the stored outcome
  is ``Interrupted``, and a new owner after a SIGKILL does not run it again;
  withdrawn while its owner is dead, the stored mark alone stops the
  redelivery from running it;
- c. an uninterruptible RPC runs to its end after its caller stopped waiting;
- d. an acknowledged tell hears ``MailboxFull``; a fire-and-forget one does not.

Nothing sleeps to synchronise: processes by their ``ready`` line or their
exit, handlers by their NOTIFYs, the interrupt mark by the storage's NOTIFY.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from trio_cluster import Interrupted, MailboxFull, Runner, SendTimeout, open_runner
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import TEST_CONFIG

from ..interrupt_entities import Job, hang, hang_persisted, note, quick, steady
from ..test_interrupts import withdrawn_once
from .cluster_app import transport
from .interrupt_app import create_handled, handled, release_channel
from .test_cluster_processes import WAIT_S, Cluster, Node

TIMEOUT_S = 1.0
"""The timeout of the ask that is withdrawn by its timeout."""


def events_channel(prefix: str) -> str:
    """The message storage's channel: it carries the ``i:...`` notice of each interrupt mark."""
    return f"{prefix}events"


class Seen:
    """Handler records (``(what, n, pid)``) and interrupt marks, as their NOTIFYs announce them."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, int]] = []
        self.marks = 0
        self._changed = trio.Event()

    async def follow(
        self, listener: Connection, prefix: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await listener.listen(handled(prefix))
        await listener.listen(events_channel(prefix))
        task_status.started()
        while True:
            notification = await listener.wait_notification()
            if notification.channel == handled(prefix):
                what, n, pid = notification.payload.split(":")
                self.records.append((what, int(n), int(pid)))
            elif notification.payload.startswith("i:"):
                self.marks += 1
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not condition():
                await self._changed.wait()

    async def wait_for(self, what: str, n: int) -> None:
        await self.wait_until(lambda: what in self.whats(n))

    def of(self, n: int) -> list[tuple[str, int]]:
        """``(what, pid)`` of request ``n``, in order."""
        return [(what, pid) for what, m, pid in self.records if m == n]

    def whats(self, n: int) -> list[str]:
        return [what for what, _ in self.of(n)]


@attrs.define
class World:
    prefix: str
    conn: Connection
    seen: Seen
    cluster: Cluster
    client: Runner

    async def start(self) -> Node:
        """A runner process, once the client sees it own every shard."""
        node = await self.cluster.start()
        with trio.fail_after(WAIT_S):
            while set(self.client.assignment.values()) != {node.address}:
                await self.client.changed()
        return node

    async def release(self) -> None:
        """Let the ``steady`` handlers of every process finish."""
        await self.conn.execute(f"SELECT pg_notify('{release_channel(self.prefix)}', '')")


@asynccontextmanager
async def open_world(
    dsn: str, name: str, app: str = "tests.postgres.interrupt_app"
) -> AsyncIterator[World]:
    """Tables for a fresh prefix, a listener, and a client-only runner; no runner process
    yet (``app``: the module the runner processes run, one writing handler records)."""
    prefix = f"intp_{name}_{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(dsn, prefix, app=app)
    seen = Seen()
    try:
        async with (
            open_connection(dsn) as conn,
            open_connection(dsn) as listener,
            open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
        ):
            await create_handled(conn, prefix)
            async with trio.open_nursery() as nursery:
                await nursery.start(seen.follow, listener, prefix)
                async with open_runner(
                    storage=storage, config=TEST_CONFIG, transport=transport(prefix)
                ) as client:
                    yield World(prefix, conn, seen, cluster, client)
                nursery.cancel_scope.cancel()
    finally:
        await cluster.cleanup()


# -- a. volatile ----------------------------------------------------------------------------


async def test_a_cancelled_ask_cancels_its_handler_in_another_process(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "cancel") as world:
        node = await world.start()
        seen = world.seen
        await withdrawn_once(
            lambda: seen.wait_for("started", 1), world.client.ask(hang, "s", Job(1))
        )
        await seen.wait_for("cancelled", 1)
        assert seen.of(1) == [("started", node.pid), ("cancelled", node.pid)]
        assert await world.client.ask(quick, "s", Job(2)) == 0  # its state change rolled back


async def test_a_timed_out_ask_leaves_no_handler_running_in_another_process(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "timeout") as world:
        await world.start()
        seen = world.seen
        assert await world.client.ask(quick, "s", Job(1)) == 0  # the entity and the link are up
        with pytest.raises(SendTimeout):
            await world.client.ask(hang, "s", Job(2), timeout=TIMEOUT_S)
        # One sender, one entity at concurrency 1: this runs once request 2 is done with.
        assert await world.client.ask(quick, "s", Job(3)) == 0
        await seen.wait_for("ran", 3)
        # Cancelled while it ran, or skipped if the timeout came first: never left running.
        assert seen.whats(2) in (["started", "cancelled"], [])


# -- b. persisted ---------------------------------------------------------------------------


async def test_a_withdrawn_persisted_ask_is_stored_interrupted_and_not_run_again(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "persisted") as world:
        first = await world.start()
        seen = world.seen
        client = world.client
        job = Job(1, key="k")
        await withdrawn_once(
            lambda: seen.wait_for("started", 1),
            client.ask(hang_persisted, "s", job, interrupt=True),
        )
        await seen.wait_for("cancelled", 1)
        with pytest.raises(Interrupted, match="while its handler ran"):
            await client.ask(hang_persisted, "s", job)  # the stored outcome, by primary key
        stored = await world.conn.fetchrow(
            f"SELECT processed, interrupted, position(convert_to('Interrupted', 'UTF8')"
            f" in reply) > 0 FROM {world.prefix}messages WHERE primary_key = 'k'"
        )
        assert tuple(stored or ()) == (True, True, True)

        await world.cluster.kill(first)
        second = await world.start()
        assert await client.ask(quick, "s", Job(2)) == 0  # served by the new owner
        with pytest.raises(Interrupted, match="while its handler ran"):
            await client.ask(hang_persisted, "s", job)
        await seen.wait_for("ran", 2)
        assert seen.of(1) == [("started", first.pid), ("cancelled", first.pid)]
        assert seen.of(2) == [("ran", second.pid)]


async def test_a_persisted_ask_withdrawn_while_its_owner_is_dead_is_not_redelivered(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "dead") as world:
        first = await world.start()
        seen = world.seen
        client = world.client
        job = Job(1, key="k")
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                with scope:
                    await client.ask(hang_persisted, "s", job, interrupt=True)

            nursery.start_soon(ask)
            await seen.wait_for("started", 1)
            await world.cluster.kill(first)  # its handler never finishes
            scope.cancel()  # the caller withdraws: only storage hears of it
            await seen.wait_until(lambda: seen.marks == 1)

        second = await world.start()  # reads the request back, with its mark
        with pytest.raises(Interrupted, match="before its handler started"):
            await client.ask(hang_persisted, "s", job)
        assert await client.ask(quick, "s", Job(2)) == 0
        await seen.wait_for("ran", 2)
        assert seen.of(1) == [("started", first.pid)]
        assert seen.of(2) == [("ran", second.pid)]


# -- c. uninterruptible ---------------------------------------------------------------------


async def test_an_uninterruptible_rpc_runs_to_its_end_in_another_process(pg_dsn: str) -> None:
    async with open_world(pg_dsn, "steady") as world:
        node = await world.start()
        seen = world.seen
        await withdrawn_once(
            lambda: seen.wait_for("started", 1), world.client.ask(steady, "s", Job(1))
        )
        await world.release()
        await seen.wait_for("finished", 1)
        assert seen.of(1) == [("started", node.pid), ("finished", node.pid)]
        assert await world.client.ask(quick, "s", Job(2)) == 1  # its state change stands


# -- d. tell --------------------------------------------------------------------------------


async def test_a_tell_to_another_process_hears_its_refusal_unless_fire_and_forget(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "tell") as world:
        await world.start()
        seen = world.seen
        client = world.client
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.ask, steady, "s", Job(1))
            await seen.wait_for("started", 1)
            await client.tell(note, "s", Job(2))  # acknowledged: queued, the mailbox is full
            with pytest.raises(MailboxFull):
                await client.tell(note, "s", Job(3))
            await client.tell(note, "s", Job(4), ack=False)  # refused, unheard
            with pytest.raises(MailboxFull):  # frames are taken in order: 4 was refused first
                await client.tell(note, "s", Job(5))
            await world.release()
            await seen.wait_for("noted", 2)  # the mailbox has room again
            await client.tell(note, "s", Job(6))
            await seen.wait_for("noted", 6)
        assert [n for what, n, _ in seen.records if what == "noted"] == [2, 6]
