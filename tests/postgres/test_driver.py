"""The Trio PostgreSQL driver against a real server.

No test sleeps to synchronise: tasks wait on events, on `wait_all_tasks_blocked`, or poll
pg_stat_activity for the state they need, and every wait is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import math
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

import pytest
import trio
import trio.testing

from trio_cluster.pgdriver import (
    Connection,
    ConnectionLost,
    DeadlockDetected,
    LockNotAvailable,
    Notification,
    Param,
    PgError,
    QueryCanceled,
    SerializationFailure,
    UniqueViolation,
    open_connection,
    open_pool,
)
from trio_cluster.pgdriver.errors import error_class_for
from trio_cluster.pgdriver.server import ThrowawayPostgres

WAIT_S = 5.0
"""Bound for waits that normally take milliseconds (generous for loaded CI machines)."""


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[Connection]:
    async with open_connection(pg_dsn) as connection:
        yield connection


@pytest.fixture
async def other(pg_dsn: str) -> AsyncIterator[Connection]:
    """A second connection, to act on the first from outside."""
    async with open_connection(pg_dsn) as connection:
        yield connection


@pytest.fixture
async def table(other: Connection) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    await other.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    yield name
    if not other.closed:
        await other.execute(f"DROP TABLE {name}")


async def wait_until_sleeping(observer: Connection, pid: int) -> None:
    """Until backend *pid* is executing pg_sleep (polls: the server pushes no event)."""
    sql = "SELECT wait_event FROM pg_stat_activity WHERE pid = $1 AND state = 'active'"
    while await observer.fetchval(sql, [pid]) != "PgSleep":
        await trio.lowlevel.checkpoint()


# -- type round trips ---------------------------------------------------------------

EAST = timezone(timedelta(hours=5, minutes=30))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**31 - 1,
        2**31,
        -(2**63),
        2**63 - 1,
        1.5,
        -0.0,
        1e300,
        float("inf"),
        float("-inf"),
        "",
        "héllo ✓ 'quoted' \"double\" \\ back",
        b"",
        bytes(range(256)),
        datetime(2024, 2, 29, 12, 30, 45, 123456, tzinfo=UTC),
        Decimal("12345678901234567890.000000001"),
    ],
    ids=repr,
)
async def test_parameter_round_trip(conn: Connection, value: Param) -> None:
    result = await conn.fetchval("SELECT $1", [value])
    assert result == value
    assert type(result) is type(value)


async def test_round_trip_of_values_that_change_form(conn: Connection) -> None:
    # Integers beyond int8 travel as numeric; other time zones come back in UTC.
    assert await conn.fetchval("SELECT $1", [2**70]) == Decimal(2**70)
    local = datetime(2024, 1, 1, 12, 0, tzinfo=EAST)
    back = await conn.fetchval("SELECT $1", [local])
    assert back == local
    assert back.tzinfo is UTC
    assert math.isnan(await conn.fetchval("SELECT $1", [float("nan")]))


async def test_parameters_take_sql_casts(conn: Connection) -> None:
    row = await conn.fetchrow(
        "SELECT $1::int8, $2::text, $3::jsonb, $4::int2, $5::uuid::text, pg_backend_pid() = $6",
        [1, "x", '{"a": [1, 2]}', 7, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", conn.backend_pid],
    )
    assert row == (1, "x", '{"a": [1, 2]}', 7, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", True)


async def test_mixed_text_and_binary_parameters(conn: Connection) -> None:
    row = await conn.fetchrow(
        "SELECT $1::int, $2::bytea, $3::text, $4::bytea, $5", [1, b"\x00a", "b", None, b"c"]
    )
    assert row == (1, b"\x00a", "b", None, b"c")


async def test_results_decode_by_column_type(conn: Connection) -> None:
    row = await conn.fetchrow(
        """
        SELECT 1::int2, 2::int4, 3::int8, 4::oid, 1.5::float4, 2.5::float8, true,
               'a'::text, 'b'::varchar, 'c'::name, 'd'::char(2), '\\x00ff'::bytea,
               '{"k": 1}'::json, '{"k": 1}'::jsonb, 1.25::numeric,
               '2024-05-06 07:08:09.5+02'::timestamptz,
               NULL::int4, NULL::text, NULL::bytea, NULL::timestamptz,
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, ARRAY[1, 2]
        """
    )
    assert row == (
        1,
        2,
        3,
        4,
        1.5,
        2.5,
        True,
        "a",
        "b",
        "c",
        "d ",
        b"\x00\xff",
        '{"k": 1}',
        '{"k": 1}',
        Decimal("1.25"),
        datetime(2024, 5, 6, 5, 8, 9, 500000, tzinfo=UTC),
        None,
        None,
        None,
        None,
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",  # types without a decoder come as text
        "{1,2}",
    )


async def test_timestamptz_is_utc_whatever_the_session_time_zone(conn: Connection) -> None:
    await conn.execute("SET TimeZone TO 'Asia/Kolkata'")
    value = await conn.fetchval("SELECT '2024-01-01 00:00:00+00'::timestamptz")
    assert value == datetime(2024, 1, 1, tzinfo=UTC)
    assert value.tzinfo is UTC


async def test_undecodable_timestamp_raises_and_connection_survives(conn: Connection) -> None:
    with pytest.raises(ValueError, match="infinity"):
        await conn.fetchval("SELECT 'infinity'::timestamptz")
    assert await conn.fetchval("SELECT 1") == 1


async def test_bad_parameters_are_rejected_before_sending(conn: Connection) -> None:
    with pytest.raises(ValueError, match="NUL"):
        await conn.fetchval("SELECT $1", ["a\x00b"])
    with pytest.raises(TypeError, match="naive"):
        await conn.fetchval("SELECT $1", [datetime(2024, 1, 1)])
    with pytest.raises(TypeError, match="unsupported type list"):
        await conn.fetchval("SELECT $1", [cast(Any, [1])])
    assert await conn.fetchval("SELECT 1") == 1


async def test_fetch_shapes_and_row_counts(conn: Connection, table: str) -> None:
    assert await conn.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b'), (3, NULL)") == 3
    assert await conn.fetch(f"SELECT id, note FROM {table} ORDER BY id") == [
        (1, "a"),
        (2, "b"),
        (3, None),
    ]
    assert await conn.fetchrow(f"SELECT id FROM {table} WHERE id > $1", [5]) is None
    assert await conn.fetchval(f"SELECT note FROM {table} WHERE id = $1", [9]) is None
    assert await conn.execute(f"UPDATE {table} SET note = $1 WHERE id >= $2", ["z", 2]) == 2
    assert await conn.execute(f"DELETE FROM {table} WHERE id = 42") == 0
    assert await conn.execute("SELECT 1") == 1
    assert await conn.execute("SET application_name TO 'x'") == 0


async def test_execute_script_runs_many_statements(conn: Connection) -> None:
    await conn.execute_script(
        "CREATE TEMP TABLE s1 (a int); CREATE TEMP TABLE s2 (b int); INSERT INTO s1 VALUES (1);"
    )
    assert await conn.fetchval("SELECT count(*) FROM s1, s2") == 0
    assert await conn.fetchval("SELECT a FROM s1") == 1


async def test_execute_script_error_rolls_back_the_whole_script(conn: Connection) -> None:
    await conn.execute("CREATE TEMP TABLE s (a int PRIMARY KEY)")
    with pytest.raises(UniqueViolation):
        await conn.execute_script("INSERT INTO s VALUES (1); INSERT INTO s VALUES (1)")
    assert await conn.fetchval("SELECT count(*) FROM s") == 0


async def test_several_statements_need_execute_script(conn: Connection) -> None:
    with pytest.raises(PgError) as info:
        await conn.execute("SELECT 1; SELECT 2")
    assert info.value.sqlstate == "42601"


# -- errors -------------------------------------------------------------------------


async def test_unique_violation(conn: Connection, table: str) -> None:
    await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    with pytest.raises(UniqueViolation) as info:
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'b')")
    assert info.value.sqlstate == "23505"
    assert isinstance(info.value, PgError)
    assert "duplicate key" in info.value.message
    assert info.value.detail is not None
    assert await conn.fetchval("SELECT 1") == 1


async def test_syntax_error_is_a_plain_pg_error(conn: Connection) -> None:
    with pytest.raises(PgError) as info:
        await conn.execute("SELEC 1")
    assert type(info.value) is PgError
    assert info.value.sqlstate == "42601"
    assert "syntax error" in str(info.value)


async def test_statement_timeout_is_query_canceled(conn: Connection) -> None:
    await conn.execute("SET statement_timeout TO '20ms'")
    with pytest.raises(QueryCanceled) as info:
        await conn.execute("SELECT pg_sleep(5)")
    assert info.value.sqlstate == "57014"
    assert not conn.closed


async def test_lock_timeout_is_lock_not_available(conn: Connection, other: Connection) -> None:
    await other.fetchval("SELECT pg_advisory_lock(7301)")
    await conn.execute("SET lock_timeout TO '20ms'")
    with pytest.raises(LockNotAvailable) as info:
        await conn.fetchval("SELECT pg_advisory_lock(7301)")
    assert info.value.sqlstate == "55P03"
    await other.fetchval("SELECT pg_advisory_unlock(7301)")


async def test_serialization_failure(conn: Connection, other: Connection, table: str) -> None:
    await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    with pytest.raises(SerializationFailure) as info:
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            assert await conn.fetchval(f"SELECT note FROM {table} WHERE id = 1") == "a"
            await other.execute(f"UPDATE {table} SET note = 'b' WHERE id = 1")
            await conn.execute(f"UPDATE {table} SET note = 'c' WHERE id = 1")
    assert info.value.sqlstate == "40001"
    assert not conn.in_transaction


async def test_deadlock_detected(conn: Connection, other: Connection) -> None:
    for c in (conn, other):
        await c.execute("SET deadlock_timeout TO '20ms'")
    outcomes: list[str] = []

    async def lock_both(c: Connection, first: int, second: int, locked: trio.Event) -> None:
        try:
            async with c.transaction():
                await c.fetchval("SELECT pg_advisory_xact_lock($1)", [first])
                locked.set()
                await both_locked.wait()
                await c.fetchval("SELECT pg_advisory_xact_lock($1)", [second])
            outcomes.append("committed")
        except DeadlockDetected as exc:
            assert exc.sqlstate == "40P01"
            outcomes.append("deadlock")

    a_locked, b_locked, both_locked = trio.Event(), trio.Event(), trio.Event()
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock_both, conn, 1, 2, a_locked)
            nursery.start_soon(lock_both, other, 2, 1, b_locked)
            await a_locked.wait()
            await b_locked.wait()
            both_locked.set()
    assert sorted(outcomes) == ["committed", "deadlock"]


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        (None, PgError),
        ("42601", PgError),
        ("23505", UniqueViolation),
        ("23503", PgError),
        ("57014", QueryCanceled),
        ("40001", SerializationFailure),
        ("40P01", DeadlockDetected),
        ("55P03", LockNotAvailable),
        ("57P01", ConnectionLost),
        ("57P02", ConnectionLost),
        ("57P03", ConnectionLost),
        ("08006", ConnectionLost),
        ("08P01", ConnectionLost),
    ],
)
def test_error_class_by_sqlstate(sqlstate: str | None, expected: type[PgError]) -> None:
    assert error_class_for(sqlstate) is expected


# -- transactions -------------------------------------------------------------------


async def test_transaction_commits(conn: Connection, other: Connection, table: str) -> None:
    async with conn.transaction():
        assert conn.in_transaction
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert await other.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert not conn.in_transaction
    assert await other.fetchval(f"SELECT count(*) FROM {table}") == 1


async def test_transaction_rolls_back_on_exception(conn: Connection, table: str) -> None:
    with pytest.raises(ZeroDivisionError):
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            _ = 1 / 0
    assert not conn.in_transaction
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_transaction_rolls_back_on_server_error(conn: Connection, table: str) -> None:
    with pytest.raises(UniqueViolation):
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert not conn.in_transaction
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_commit_of_failed_transaction_raises(conn: Connection, table: str) -> None:
    with pytest.raises(PgError) as info:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            with pytest.raises(PgError):
                await conn.execute("SELEC 1")
    assert info.value.sqlstate == "25P02"
    assert not conn.in_transaction
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_transactions_do_not_nest(conn: Connection) -> None:
    async with conn.transaction():
        with pytest.raises(RuntimeError, match="already open"):
            async with conn.transaction():
                pass  # pragma: no cover


async def test_transaction_rolls_back_when_cancelled(
    conn: Connection, other: Connection, table: str
) -> None:
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def body() -> None:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
                    await conn.execute("SELECT pg_sleep(10)")

            nursery.start_soon(body)
            await wait_until_sleeping(other, conn.backend_pid)
            nursery.cancel_scope.cancel()
    assert not conn.closed
    assert not conn.in_transaction
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


# -- cancellation -------------------------------------------------------------------


async def test_cancel_mid_query_leaves_connection_usable(
    conn: Connection, other: Connection
) -> None:
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.execute, "SELECT pg_sleep(10)")
            await wait_until_sleeping(other, conn.backend_pid)
            started = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - started < 1.0
        assert await conn.fetchval("SELECT 1") == 1
    assert not conn.closed
    state_sql = "SELECT state FROM pg_stat_activity WHERE pid = $1"
    assert await other.fetchval(state_sql, [conn.backend_pid]) == "idle"


async def test_statement_cancelled_before_sending_changes_nothing(conn: Connection) -> None:
    with trio.fail_after(WAIT_S):
        async with conn.transaction():
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.execute("SELECT 1")
            assert scope.cancelled_caught
            assert conn.in_transaction
            assert await conn.fetchval("SELECT 2") == 2


async def test_connection_given_up_when_cleanup_cannot_finish(
    pg_dsn: str, other: Connection
) -> None:
    # No time at all for cancel-and-drain: the connection cannot be trusted afterwards.
    async with open_connection(pg_dsn, cleanup_timeout_s=0) as conn:
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.execute, "SELECT pg_sleep(3)")
                await wait_until_sleeping(other, conn.backend_pid)
                nursery.cancel_scope.cancel()
        assert conn.broken
        with pytest.raises(ConnectionLost):
            await conn.fetchval("SELECT 1")


async def test_tasks_sharing_a_connection_take_turns(conn: Connection) -> None:
    results: dict[int, int] = {}

    async def ask(i: int) -> None:
        results[i] = await conn.fetchval("SELECT $1::int + 1000", [i])

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(ask, i)
    assert results == {i: i + 1000 for i in range(30)}


# -- LISTEN / NOTIFY ----------------------------------------------------------------


async def test_notification_from_another_connection(conn: Connection, other: Connection) -> None:
    channel = 'Mixed "quoted" channel'
    await conn.listen(channel)
    await other.execute("SELECT pg_notify($1, $2)", [channel, "hello"])
    with trio.fail_after(WAIT_S):
        notification = await conn.wait_notification()
    assert notification == Notification(channel, "hello", other.backend_pid)


async def test_notifications_received_during_statements_are_queued(
    conn: Connection,
) -> None:
    await conn.listen("queued")
    await conn.execute("SELECT pg_notify('queued', '1')")
    await conn.execute("SELECT pg_notify('queued', '2')")
    assert await conn.fetchval("SELECT 3") == 3
    with trio.fail_after(WAIT_S):
        assert (await conn.wait_notification()).payload == "1"
        assert (await conn.wait_notification()).payload == "2"


async def test_statements_run_while_a_task_waits_for_notifications(
    conn: Connection, other: Connection
) -> None:
    await conn.listen("busy")
    received: list[Notification] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def listener() -> None:
                received.append(await conn.wait_notification())

            nursery.start_soon(listener)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(20):
                assert await conn.fetchval("SELECT $1::int", [i]) == i
            await other.execute("NOTIFY busy, 'late'")
    assert [n.payload for n in received] == ["late"]


async def test_a_follower_gets_every_notification_in_order_while_statements_run(
    conn: Connection, other: Connection
) -> None:
    """``follow_notifications``: notifications queued during statements, sent while
    it reads, and sent between statements, all passed on once, oldest first; the
    connection's end ends it with ConnectionLost."""
    await conn.listen("followed")
    await conn.execute("SELECT pg_notify('followed', '0')")  # queued before following
    received: list[str] = []
    enough = trio.Event()

    def receive(notification: Notification) -> None:
        received.append(notification.payload)
        if len(received) == 41:
            enough.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                with pytest.raises(ConnectionLost):
                    await conn.follow_notifications(receive)

            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(1, 41):
                if i % 2:
                    await other.execute("SELECT pg_notify('followed', $1)", [str(i)])
                else:  # a statement on the followed connection itself, which notifies
                    assert (
                        await conn.fetchval("SELECT pg_notify('followed', $1)::text", [str(i)])
                        == ""
                    )
            await enough.wait()
            assert await other.fetchval("SELECT pg_terminate_backend($1)", [conn.backend_pid])
    assert received == [str(i) for i in range(41)]


async def test_two_idle_readers_share_the_socket(conn: Connection, other: Connection) -> None:
    await conn.listen("shared")
    got: list[Notification] = []
    closed = trio.Event()

    async def read_notifications() -> None:
        with pytest.raises(ConnectionLost):
            while True:
                got.append(await conn.wait_notification())
                if len(got) == 2:
                    await other.fetchval("SELECT pg_terminate_backend($1)", [conn.backend_pid])

    async def watch() -> None:
        await conn.wait_closed()
        closed.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(read_notifications)
            await trio.testing.wait_all_tasks_blocked()
            await other.execute("NOTIFY shared, 'one'")
            assert await conn.fetchval("SELECT 7") == 7
            await other.execute("NOTIFY shared, 'two'")
            await closed.wait()
    assert [n.payload for n in got] == ["one", "two"]


async def test_unlisten_stops_delivery(conn: Connection, other: Connection) -> None:
    await conn.listen("a")
    await conn.listen("b")
    await conn.unlisten("a")
    await other.execute("NOTIFY a, 'not for you'")
    await other.execute("NOTIFY b, 'for you'")
    with trio.fail_after(WAIT_S):
        assert (await conn.wait_notification()).channel == "b"


# -- connection loss ----------------------------------------------------------------


async def test_wait_closed_notices_termination(conn: Connection, other: Connection) -> None:
    detected_after: list[float] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await conn.wait_closed()
                detected_after.append(trio.current_time() - terminated_at)

            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            # The watcher steps aside for statements and resumes afterwards.
            assert await conn.fetchval("SELECT 42") == 42
            await trio.testing.wait_all_tasks_blocked()
            terminated_at = trio.current_time()
            assert await other.fetchval("SELECT pg_terminate_backend($1)", [conn.backend_pid])
    assert detected_after[0] < 1.0
    assert conn.closed
    assert conn.broken
    with pytest.raises(ConnectionLost) as info:
        await conn.fetchval("SELECT 1")
    assert info.value.sqlstate == "57P01"
    with pytest.raises(ConnectionLost):
        await conn.wait_notification()


async def test_termination_mid_query_raises_connection_lost(
    conn: Connection, other: Connection
) -> None:
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def terminate() -> None:
                await wait_until_sleeping(other, conn.backend_pid)
                await other.fetchval("SELECT pg_terminate_backend($1)", [conn.backend_pid])

            nursery.start_soon(terminate)
            with pytest.raises(ConnectionLost) as info:
                await conn.execute("SELECT pg_sleep(10)")
    assert info.value.sqlstate == "57P01"
    assert conn.broken


async def test_wait_closed_returns_on_local_close(conn: Connection) -> None:
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.wait_closed)
            await trio.testing.wait_all_tasks_blocked()
            conn.close()
    assert conn.closed
    assert not conn.broken
    with pytest.raises(ConnectionLost, match="closed"):
        await conn.fetchval("SELECT 1")


async def test_connect_failure_is_connection_lost() -> None:
    with trio.fail_after(WAIT_S), pytest.raises(ConnectionLost):
        async with open_connection("postgresql://nobody@127.0.0.1:1/postgres"):
            pass  # pragma: no cover


# -- pool ---------------------------------------------------------------------------


async def test_pool_concurrency_never_exceeds_size(pg_dsn: str, other: Connection) -> None:
    app = f"pool_{uuid.uuid4().hex[:8]}"
    in_use = peak = 0
    pids: set[int] = set()
    full = trio.Event()
    async with open_pool(pg_dsn, size=4, application_name=app) as pool:

        async def worker(i: int) -> None:
            nonlocal in_use, peak
            async with pool.connection() as c:
                in_use += 1
                peak = max(peak, in_use)
                if in_use == pool.size:
                    full.set()
                await full.wait()  # so that the pool does fill up at least once
                pids.add(await c.fetchval("SELECT pg_backend_pid()"))
                assert await c.fetchval("SELECT $1::int * 2", [i]) == 2 * i
                in_use -= 1
            assert await pool.fetchval("SELECT $1::int", [i]) == i

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(worker, i)
        assert peak == 4
        assert len(pids) <= 4
        assert pool.open_connections <= 4
        count_sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        assert await other.fetchval(count_sql, [app]) == pool.open_connections


async def test_pool_acquire_waits_for_a_free_connection(pg_dsn: str) -> None:
    async with open_pool(pg_dsn, size=1) as pool:
        got_it = trio.Event()

        async def second_borrower() -> None:
            async with pool.connection():
                got_it.set()

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                async with pool.connection() as c:
                    nursery.start_soon(second_borrower)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not got_it.is_set()
                    assert await c.fetchval("SELECT 1") == 1
                await got_it.wait()
        assert pool.open_connections == 1


async def test_pool_replaces_connection_broken_while_borrowed(
    pg_dsn: str, other: Connection
) -> None:
    async with open_pool(pg_dsn, size=1) as pool:
        with trio.fail_after(WAIT_S):
            async with pool.connection() as c:
                old_pid = c.backend_pid
                await other.fetchval("SELECT pg_terminate_backend($1)", [old_pid])
                await c.wait_closed()
                with pytest.raises(ConnectionLost):
                    await c.fetchval("SELECT 1")
            assert pool.open_connections == 0
            assert await pool.fetchval("SELECT pg_backend_pid()") != old_pid
        assert pool.open_connections == 1


async def test_pool_replaces_connection_broken_while_idle(pg_dsn: str, other: Connection) -> None:
    async with open_pool(pg_dsn, size=1) as pool:
        with trio.fail_after(WAIT_S):
            old_pid = await pool.fetchval("SELECT pg_backend_pid()")
            # With a timeout, pg_terminate_backend returns once the backend has exited.
            await other.fetchval("SELECT pg_terminate_backend($1, 5000)", [old_pid])
            new_pid = await pool.fetchval("SELECT pg_backend_pid()")
        assert new_pid != old_pid
        assert pool.open_connections == 1


async def test_pool_does_not_reuse_unsafe_connections(pg_dsn: str) -> None:
    async with open_pool(pg_dsn, size=2) as pool:
        async with pool.connection() as c:
            await c.execute("BEGIN")  # left open
        async with pool.connection() as c:
            await c.listen("x")
        assert pool.open_connections == 0
        async with pool.connection() as c:
            assert not c.in_transaction
        assert pool.open_connections == 1


async def test_closed_pool_refuses_borrowers(pg_dsn: str) -> None:
    async with open_pool(pg_dsn, size=1) as pool:
        assert await pool.execute("SELECT 1") == 1
    assert pool.open_connections == 0
    with pytest.raises(trio.ClosedResourceError):
        await pool.fetchval("SELECT 1")


async def test_a_pool_that_cannot_connect_counts_how_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
        port = refusing.getsockname()[1]
        async with open_pool(f"postgresql://postgres@127.0.0.1:{port}/postgres") as pool:
            assert pool.unreachable_for() == 0  # nothing tried yet: nothing known
            with pytest.raises(ConnectionLost):
                await pool.check()
            autojump_clock.jump(3)
            with pytest.raises(ConnectionLost):
                await pool.fetchval("SELECT 1")
            # Counted from the first failure, not reset by the next one.
            assert pool.unreachable_for() == pytest.approx(3)


async def test_a_pool_with_a_connection_is_reachable_without_opening_another(
    pg_dsn: str,
) -> None:
    async with open_pool(pg_dsn, size=2) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        await pool.check()
        assert pool.open_connections == 1
        assert pool.unreachable_for() == 0


# -- the throwaway server -----------------------------------------------------------


async def test_pool_recovers_after_server_restart(own_pg_server: ThrowawayPostgres) -> None:
    async with (
        open_pool(own_pg_server.dsn, size=3) as pool,
        open_connection(own_pg_server.dsn) as watched,
    ):
        with trio.fail_after(WAIT_S):
            async with pool.connection() as a, pool.connection() as b, pool.connection() as c:
                old_pids = {a.backend_pid, b.backend_pid, c.backend_pid}
        with trio.fail_after(60):
            await trio.to_thread.run_sync(own_pg_server.restart)
        with trio.fail_after(WAIT_S):
            await watched.wait_closed()
            new_pids: set[int] = set()
            all_borrowed = trio.Event()

            async def use() -> None:
                async with pool.connection() as conn:
                    new_pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                    if len(new_pids) == 3:
                        all_borrowed.set()
                    await all_borrowed.wait()

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(use)
        assert len(new_pids) == 3
        assert not new_pids & old_pids
        assert pool.open_connections == 3


def test_throwaway_server_survives_an_outage_and_cleans_up(
    own_pg_server: ThrowawayPostgres,
) -> None:
    server = ThrowawayPostgres()
    with server:
        directory = server.directory
        assert directory is not None
        assert directory.exists()

        async def before() -> None:
            async with open_connection(server.dsn) as c:
                await c.execute("CREATE TABLE kept (a int)")

        async def during() -> None:
            async with open_pool(server.dsn, size=1) as pool:
                with pytest.raises(ConnectionLost):
                    await pool.fetchval("SELECT 1")

        async def after() -> None:
            async with open_connection(server.dsn) as c:
                assert await c.fetchval("SELECT count(*) FROM kept") == 0

        trio.run(before)
        server.stop(keep_data=True)
        trio.run(during)
        server.start()
        trio.run(after)
    assert not directory.exists()
    assert server.directory is None
