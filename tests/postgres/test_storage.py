"""The PostgreSQL storage against a real server: leases, fencing, redelivery, outages."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import attrs
import pytest
import trio
import trio.testing

from trio_cluster import (
    EntityNotAssignedToRunner,
    MalformedMessage,
    PersistenceError,
    RunnerUnavailable,
    ShardId,
    open_runner,
)
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import shard_index
from trio_cluster.core.snowflake import SnowflakeGenerator, parse
from trio_cluster.pgdriver import open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.leases import LeaseTiming, PgLeaseSession
from trio_cluster.postgres.schema import lock_namespace
from trio_cluster.postgres.storage import PostgresStorage, open_postgres_storage
from trio_cluster.storage.base import Gap, Notice, Stored
from trio_cluster.testing import TEST_CONFIG

from ..entities import (
    Add,
    Block,
    Get,
    add,
    add_once,
    add_persisted,
    block,
    counter,
    get,
)

_prefixes = itertools.count()
CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=4)


def shard_of(entity_id: str) -> ShardId:
    return ShardId("default", shard_index(entity_id, CONFIG.shards_per_group))


@asynccontextmanager
async def storage_for(dsn: str, prefix: str | None = None) -> AsyncIterator[PostgresStorage]:
    """A storage under a prefix of its own, so tests sharing the server never meet."""
    async with open_postgres_storage(dsn, prefix=prefix or f"t{next(_prefixes)}_") as storage:
        yield storage


def envelope(request_id: int, entity_id: str = "a", key: str | None = None) -> Envelope:
    return Envelope(
        request_id=request_id,
        entity_type="Counter",
        entity_id=entity_id,
        shard_group="default",
        shard_index=shard_of(entity_id).index,
        rpc="add_persisted",
        payload=b"\x92\x01\xa0",
        persisted=True,
        primary_key=key,
    )


async def terminate(dsn: str, pid: int) -> None:
    """End a backend and wait until it is gone (and its locks with it)."""
    async with open_connection(dsn) as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", [pid])


async def lock_backend(dsn: str, address: str) -> int:
    """The server process of a runner's lock connection, found as an operator would."""
    async with open_connection(dsn) as conn:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            [f"trio_cluster lock {address}"[:63]],
        )
    assert pid is not None
    return int(pid)


# -- schema -----------------------------------------------------------------------


async def test_migrations_are_idempotent_and_prefixes_isolate_clusters(pg_dsn: str) -> None:
    async with storage_for(pg_dsn, "iso_a_") as first, storage_for(pg_dsn, "iso_a_"):
        await first.messages.save_request(envelope(1), origin=0, announce=True)
        async with storage_for(pg_dsn, "iso_b_") as other:
            assert await other.messages.unprocessed(shard_of("a")) == []
        assert [e.request_id for e in await first.messages.unprocessed(shard_of("a"))] == [1]


async def test_a_bad_prefix_is_refused_before_touching_sql(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        async with open_postgres_storage(pg_dsn, prefix="x; DROP TABLE y"):
            pass


# -- leases ---------------------------------------------------------------------


async def test_two_sessions_never_hold_the_same_shard(pg_dsn: str) -> None:
    shards = [ShardId(group, i) for group in ("default", "other") for i in range(20)]
    async with (
        storage_for(pg_dsn) as storage,
        storage.session(RunnerSpec("one"), lambda _: None) as one,
        storage.session(RunnerSpec("two"), lambda _: None) as two,
    ):
        assert one.machine_id != two.machine_id
        held: dict[str, list[ShardId]] = {"one": [], "two": []}

        async def grab(name: str, session: object) -> None:
            for shard in shards:
                if await session.acquire(shard) is not None:  # type: ignore[attr-defined]
                    held[name].append(shard)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grab, "one", one)
            nursery.start_soon(grab, "two", two)
        assert not set(held["one"]) & set(held["two"])
        assert set(held["one"]) | set(held["two"]) == set(shards)
        # The server agrees: each lock is held by exactly one backend.
        async with open_connection(pg_dsn) as conn:
            holders = await conn.fetch(
                "SELECT classid, objid, count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid IN ($1, $2) GROUP BY classid, objid HAVING count(*) > 1",
                [one.backend_pid, two.backend_pid],
            )
        assert holders == []


async def test_machine_ids_go_beyond_1024(pg_dsn: str) -> None:
    # 1,024 live runners hold the first 1,024 machine ids; the next one still registers,
    # and the ids it mints carry its machine id.
    async with storage_for(pg_dsn, "beyond_") as storage, open_connection(pg_dsn) as others:
        namespace = await lock_namespace(others, "beyond_:runners")
        await others.execute(
            "SELECT pg_advisory_lock($1, g) FROM generate_series(0, 1023) AS g", [namespace]
        )
        async with storage.session(RunnerSpec("late"), lambda _: None) as session:
            assert session.machine_id == 1024
            assert parse(SnowflakeGenerator(session.machine_id).next_id()).machine_id == 1024
            # The statement that found the id locked it and no other.
            held = await others.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = $1::int::oid AND pid = $2",
                [namespace, session.backend_pid],
            )
            assert held == 1


async def test_terminated_lock_connection_loses_every_lease_at_once(pg_dsn: str) -> None:
    lost: list[ShardId] = []
    all_lost = trio.Event()

    def on_lost(shard: ShardId) -> None:
        lost.append(shard)
        if len(lost) == 3:
            all_lost.set()

    async with storage_for(pg_dsn) as storage, storage.session(RunnerSpec("r"), on_lost) as session:
        leases = [await session.acquire(ShardId("default", i)) for i in range(3)]
        assert all(lease is not None for lease in leases)
        old_pid = session.backend_pid
        assert old_pid is not None
        with trio.fail_after(2):
            await terminate(pg_dsn, old_pid)
            await all_lost.wait()
        assert sorted(lost) == [ShardId("default", i) for i in range(3)]
        # The session reconnects on its own, and the shards can be taken again
        # under a newer epoch.
        with trio.fail_after(5):
            await session.wait_registered()
        again = await session.acquire(ShardId("default", 0))
        assert again is not None and leases[0] is not None
        assert again.epoch > leases[0].epoch
        assert session.backend_pid != old_pid


async def next_of(notices: trio.MemoryReceiveChannel[Notice], wanted: Notice) -> None:
    """Wait for ``wanted``, passing over the others (the session's own, say)."""
    with trio.fail_after(10):
        while await notices.receive() != wanted:
            pass


async def test_notices_come_on_the_lock_connection_and_resume_after_it_reconnects(
    pg_dsn: str,
) -> None:
    async with (
        storage_for(pg_dsn) as storage,
        storage.session(RunnerSpec("r"), lambda _: None) as session,
        session.notices() as notices,
        open_connection(pg_dsn) as sender,
    ):
        channel = storage.messages.channel
        first = session.backend_pid
        assert first is not None
        await sender.execute("SELECT pg_notify($1, 's:7:default:2:43')", [channel])
        await next_of(notices, Stored(ShardId("default", 2), 43, 7))
        # Ending the lock connection ends the listening (a Gap says so), and the
        # reconnected one listens again.
        await terminate(pg_dsn, first)
        await next_of(notices, Gap())
        with trio.fail_after(5):
            await session.wait_registered()
        assert session.backend_pid != first
        await sender.execute("SELECT pg_notify($1, 's:7:default:3:44')", [channel])
        await next_of(notices, Stored(ShardId("default", 3), 44, 7))


async def test_a_runner_hosting_no_shards_neither_watches_nor_is_watched(pg_dsn: str) -> None:
    async with (
        storage_for(pg_dsn) as storage,
        storage.session(RunnerSpec("h1"), lambda _: None) as h1,
        storage.session(RunnerSpec("h2"), lambda _: None) as h2,
        storage.session(RunnerSpec("client", groups=()), lambda _: None) as client,
        open_connection(pg_dsn) as observer,
    ):
        assert len(await storage.live_runners()) == 3
        names = [f"trio_cluster watcher {address}" for address in ("h1", "h2")]
        with trio.fail_after(10):
            # Both hosts' watchers blocked on a lock: the server waits, in one statement.
            await observer.execute_script(
                "DO $$ BEGIN WHILE (SELECT count(*) FROM pg_stat_activity"
                f" WHERE application_name IN ('{names[0]}', '{names[1]}')"
                " AND wait_event_type = 'Lock') < 2 LOOP"
                " PERFORM pg_stat_clear_snapshot(); PERFORM pg_sleep(0.005);"
                " END LOOP; END $$"
            )
        watched = await observer.fetch(
            "SELECT l.objid::int FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)"
            " WHERE l.locktype = 'advisory' AND NOT l.granted"
            " AND a.application_name = ANY(string_to_array($1, ','))",
            [",".join(names)],
        )
        # Each host watches the other; the client is in nobody's ring, and has no watcher.
        assert sorted(row[0] for row in watched) == sorted([h1.machine_id, h2.machine_id])
        assert client.machine_id not in {row[0] for row in watched}
        clients_watcher = await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            ["trio_cluster watcher client"],
        )
        assert clients_watcher == 0


FROZEN_TIMING = LeaseTiming(
    heartbeat_interval=10.0, liveness_timeout=2.0, user_timeout_ms=1000, idle_session_timeout_ms=0
)
"""Leases surely held for 1 s after an answer, and the next heartbeat 10 s on: a
mock-clock jump in between is a runner resuming from a freeze, unsure of its leases."""


@asynccontextmanager
async def frozen(
    pg_dsn: str, clock: trio.testing.MockClock, on_lost: Callable[[ShardId], None]
) -> AsyncIterator[tuple[PgLeaseSession, trio.Event]]:
    """A session holding shard 0 just after a freeze, and a task stopped at its gate
    (``confirmed``); the event is set once the gate lets it through."""
    shard = ShardId("default", 0)
    async with (
        open_postgres_storage(
            pg_dsn, prefix=f"t{next(_prefixes)}_", timing=FROZEN_TIMING
        ) as storage,
        storage.session(RunnerSpec("r"), on_lost) as session,
    ):
        assert await session.acquire(shard) is not None
        await session.confirmed(shard)  # just answered: at once
        clock.jump(1.5)
        assert not session.surely_holds(shard)
        through = trio.Event()

        async def gate() -> None:
            await session.confirmed(shard)
            through.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gate)
            await trio.testing.wait_all_tasks_blocked()
            assert not through.is_set()
            yield session, through


async def test_after_a_freeze_a_lease_is_confirmed_by_the_next_heartbeat(
    pg_dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    async with frozen(pg_dsn, mock_clock, lambda _: None) as (session, through):
        mock_clock.jump(9.0)  # the heartbeat is due, and answered
        await through.wait()
        assert session.surely_holds(ShardId("default", 0))


async def test_after_a_freeze_a_lost_lease_is_not_waited_on(
    pg_dsn: str, mock_clock: trio.testing.MockClock
) -> None:
    lost = trio.Event()
    async with frozen(pg_dsn, mock_clock, lambda _: lost.set()) as (session, through):
        pid = session.backend_pid
        assert pid is not None
        await terminate(pg_dsn, pid)
        await through.wait()
        assert lost.is_set() and not session.surely_holds(ShardId("default", 0))


async def test_a_stale_lease_can_never_complete_a_message(pg_dsn: str) -> None:
    async with storage_for(pg_dsn) as storage:
        messages = storage.messages
        await messages.save_request(envelope(7), origin=0, announce=True)
        async with storage.session(RunnerSpec("old"), lambda _: None) as old:
            stale = await old.acquire(shard_of("a"))
            assert stale is not None
            assert old.backend_pid is not None
            await terminate(pg_dsn, old.backend_pid)
            async with storage.session(RunnerSpec("new"), lambda _: None) as new:
                # The server freed the old backend's locks when it ended it.
                current = await new.acquire(shard_of("a"))
                assert current is not None
                assert current.epoch > stale.epoch
                with pytest.raises(EntityNotAssignedToRunner, match="stale"):
                    await messages.save_reply(7, b"stale", stale)
                assert await messages.reply_for(7) is None
                await messages.save_reply(7, b"fresh", current)
                assert await messages.reply_for(7) == b"fresh"
                # One final reply: a second one is ignored.
                await messages.save_reply(7, b"again", current)
                assert await messages.reply_for(7) == b"fresh"


# -- the runtime on PostgreSQL ------------------------------------------------------


async def test_persisted_traffic_and_dedup_survive_a_new_storage(pg_dsn: str) -> None:
    impl, probe = counter()
    prefix = f"t{next(_prefixes)}_"
    async with (
        storage_for(pg_dsn, prefix) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
    ):
        assert await runner.ask(add_once, "a", Add(5, key="k")) == 5
        assert await runner.ask(add_persisted, "a", Add(1)) == 6
    async with (
        storage_for(pg_dsn, prefix) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
    ):
        assert await runner.ask(add_once, "a", Add(5, key="k")) == 5
        assert await runner.ask(get, "a", Get()) == 0  # a fresh activation: no replay
    assert probe.runs["a/add_once/k"] == 1


async def test_losing_the_lock_connection_stops_the_runners_entities(pg_dsn: str) -> None:
    impl, probe = counter()
    async with (
        storage_for(pg_dsn) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
    ):
        outcome: list[Exception] = []

        async def blocked() -> None:
            try:
                await runner.ask(block, "a", Block())
            except RunnerUnavailable as error:
                outcome.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await probe.started.wait()
            pid = await lock_backend(pg_dsn, runner.address)
            with trio.fail_after(2):
                await terminate(pg_dsn, pid)
        assert len(outcome) == 1
        assert probe.running == 0
        # It reconnects, takes its shards back and serves again.
        with trio.fail_after(10):
            assert await runner.ask(add_persisted, "a", Add(3)) == 3


async def test_the_lock_connection_ending_mid_statement_loses_leases_not_the_runner(
    pg_dsn: str,
) -> None:
    """PostgreSQL ends the lock connection while a statement waits on it: the runner lives.

    The heartbeat touches no table, so the statement held in flight is the
    re-registration after a first termination, blocked by a table lock; the
    second termination lands on it for certain. (Before the fix a connection
    lost mid-heartbeat escaped the lease session and ended the runner.)
    """
    impl, _ = counter()
    prefix = f"t{next(_prefixes)}_"
    timing = LeaseTiming(heartbeat_interval=0.1, liveness_timeout=30.0)
    async with (
        open_postgres_storage(pg_dsn, prefix=prefix, timing=timing) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
        open_connection(pg_dsn) as blocker,
        open_connection(pg_dsn) as observer,
    ):
        assert await runner.ask(add_persisted, "a", Add(1)) == 1
        name = f"trio_cluster lock {runner.address}"[:63]
        first = await lock_backend(pg_dsn, runner.address)
        async with blocker.transaction():
            await blocker.execute(f"LOCK TABLE {prefix}runners IN ACCESS EXCLUSIVE MODE")
            await terminate(pg_dsn, first)
            with trio.fail_after(10):
                # No notice says a statement started waiting on a lock: the server
                # waits for it, in one statement.
                await observer.execute_script(
                    "DO $$ BEGIN WHILE NOT EXISTS (SELECT 1 FROM pg_stat_activity"
                    f" WHERE application_name = '{name}' AND pid <> {int(first)}"
                    " AND wait_event_type = 'Lock') LOOP"
                    " PERFORM pg_stat_clear_snapshot(); PERFORM pg_sleep(0.005);"
                    " END LOOP; END $$"
                )
            second = await lock_backend(pg_dsn, runner.address)
            await terminate(pg_dsn, second)
        with trio.fail_after(15):
            assert await runner.ask(add_persisted, "a", Add(2)) == 2
        assert await lock_backend(pg_dsn, runner.address) not in (first, second)


async def test_requests_stored_while_no_runner_runs_are_delivered_on_start(pg_dsn: str) -> None:
    impl, probe = counter()
    async with storage_for(pg_dsn) as storage:
        async with open_runner(storage=storage, config=CONFIG) as client:
            for amount in range(5):
                await client.tell(add_persisted, "a", Add(amount))
        async with open_runner(impl, storage=storage, config=CONFIG):
            with trio.fail_after(5):
                await probe.wait_until(lambda: len(probe.order) == 5)
        assert [amount for _, amount in probe.order] == list(range(5))


async def test_client_only_runner_reaches_the_owner_through_the_database(pg_dsn: str) -> None:
    impl, probe = counter()
    async with (
        storage_for(pg_dsn) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as owner,
        open_runner(storage=storage, config=CONFIG) as client,
    ):
        assert not client.shards and len(owner.shards) == CONFIG.shards_per_group
        with trio.fail_after(5):
            assert await client.ask(add_persisted, "a", Add(2)) == 2
            assert await client.ask(add_once, "a", Add(3, key="k")) == 5
            assert await owner.ask(add_once, "a", Add(3, key="k")) == 5
        assert probe.runs["a/add_once/k"] == 1


async def test_an_undecodable_stored_payload_fails_that_request_alone(pg_dsn: str) -> None:
    impl, probe = counter()
    async with storage_for(pg_dsn) as storage:
        async with open_runner(storage=storage, config=CONFIG) as client:
            await client.tell(add_once, "a", Add(1, key="bad"))
            await client.tell(add_once, "a", Add(2, key="good"))
        async with open_connection(pg_dsn) as conn:
            await conn.execute(
                f"UPDATE {storage._prefix}messages SET payload = '\\xc1'::bytea"
                " WHERE primary_key = 'bad'"
            )
        async with open_runner(impl, storage=storage, config=CONFIG) as runner:
            with trio.fail_after(5):
                with pytest.raises(MalformedMessage):
                    await runner.ask(add_once, "a", Add(1, key="bad"))
                assert await runner.ask(add_once, "a", Add(2, key="good")) == 2
        assert probe.runs == {"a/add_once/good": 1}


async def test_deliver_at_is_honoured_at_its_time_not_at_a_poll(pg_dsn: str) -> None:
    impl, probe = counter()
    async with (
        storage_for(pg_dsn) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
    ):
        due = datetime.now(UTC) + timedelta(milliseconds=300)
        await runner.tell(add_persisted, "a", Add(1), deliver_at=due)
        with trio.fail_after(5):
            await probe.wait_until(lambda: len(probe.order) == 1)
        late = datetime.now(UTC) - due
        assert timedelta(0) <= late < timedelta(seconds=1)


async def test_volatile_rpcs_never_touch_storage(pg_dsn: str) -> None:
    impl, _ = counter()
    async with (
        storage_for(pg_dsn) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
    ):
        assert await runner.ask(add, "a", Add(1)) == 1
        assert await storage.messages.unprocessed(shard_of("a")) == []
        async with open_connection(pg_dsn) as conn:
            count = await conn.fetchval(f"SELECT count(*) FROM {storage._prefix}messages")
        assert count == 0


async def test_restarting_postgres_mid_traffic_loses_no_acknowledged_message(
    own_pg_server: ThrowawayPostgres,
) -> None:
    impl, probe = counter()
    acknowledged: list[str] = []
    dsn = own_pg_server.dsn
    async with (
        storage_for(dsn) as storage,
        open_runner(impl, storage=storage, config=CONFIG) as runner,
    ):
        restarted = trio.Event()
        warmed_up = trio.Event()

        async def traffic() -> None:
            for n in itertools.count():
                key = f"m{n}"
                try:
                    await runner.tell(add_once, f"e{n % 5}", Add(1, key=key))
                except PersistenceError:
                    continue  # not acknowledged: the caller was told so
                acknowledged.append(key)
                if len(acknowledged) == 50:
                    warmed_up.set()
                if restarted.is_set() and len(acknowledged) >= 200:
                    return
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            with trio.fail_after(20):
                await warmed_up.wait()
                await trio.to_thread.run_sync(own_pg_server.restart)
                restarted.set()
        with trio.fail_after(30):
            await probe.wait_until(
                lambda: all(probe.runs[f"e{int(k[1:]) % 5}/add_once/{k}"] for k in acknowledged)
            )
        # The outage really cost the leases: they were taken back under new epochs.
        assert all(lease.epoch > 1 for lease in runner.shards.values())
        async with open_connection(dsn) as conn:
            unreplied = await conn.fetchval(
                f"SELECT count(*) FROM {storage._prefix}messages WHERE NOT processed"
            )
    assert len(acknowledged) >= 200
    assert unreplied == 0
