"""Waiting for PostgreSQL at start-up: retried until ``connect_deadline``, then PersistenceError.

The deadline tests run against a port that refuses connections (a socket bound but never
listening, so no other process can take the port meanwhile) under a mock clock; the
test of a server that comes up stops and starts the session's own server.
"""

from __future__ import annotations

import functools
import logging
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import make_conninfo

from trio_cluster import PersistenceError, open_runner
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.postgres.startup import DEFAULT_CONNECT_DEADLINE, describe_server
from trio_cluster.postgres.storage import open_postgres_storage

PASSWORD = "pa55-w0rd-never-logged"


class Warnings(logging.Handler):
    """The storage logger's WARNING records, and an event set by the first."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.first = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        # Called in the Trio thread, by the task that logs, so setting an Event is safe.
        self.records.append(record)
        self.first.set()

    @property
    def attempts(self) -> list[object]:
        """The attempt numbers logged (the second argument of each record)."""
        return [record.args[1] for record in self.records if isinstance(record.args, tuple)]


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    handler = Warnings()
    logger = logging.getLogger("trio_cluster.postgres.storage")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def refused_dsn() -> Iterator[str]:
    """A DSN, with a password, whose port refuses every connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        port = sock.getsockname()[1]
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"


def prefix() -> str:
    return f"w{uuid.uuid4().hex[:8]}_"


async def test_gives_up_at_the_deadline_naming_it(
    refused_dsn: str, warnings: Warnings, autojump_clock: trio.testing.MockClock
) -> None:
    started = trio.current_time()
    with pytest.raises(PersistenceError) as caught:
        async with open_postgres_storage(refused_dsn, prefix=prefix(), connect_deadline=12):
            pytest.fail("connected to a port that refuses connections")
    assert trio.current_time() - started == pytest.approx(12)
    server = describe_server(refused_dsn)
    message = str(caught.value)
    assert message.startswith(
        f"PostgreSQL at {server} did not accept a connection within connect_deadline=12 s ("
    )
    assert "Connection refused" in message
    # Every failed attempt but the one cut short is logged, numbered, with its next delay.
    attempts = warnings.attempts
    assert attempts == list(range(1, len(attempts) + 1))
    assert len(attempts) >= 6  # delays of at most 2 s over 12 s
    first = warnings.records[0].getMessage()
    assert first.startswith(f"waiting for PostgreSQL at {server} (attempt 1): cannot connect:")
    assert first.endswith("; retrying in 0.1 s")  # 0.1 s less up to half of it
    assert all(record.levelno == logging.WARNING for record in warnings.records)
    shown = [message, *(record.getMessage() for record in warnings.records)]
    assert not [text for text in shown if PASSWORD in text]


async def test_zero_deadline_fails_at_once(
    refused_dsn: str, warnings: Warnings, autojump_clock: trio.testing.MockClock
) -> None:
    started = trio.current_time()
    with pytest.raises(PersistenceError, match=r"connect_deadline=0: no retries\): cannot conn"):
        async with open_postgres_storage(refused_dsn, prefix=prefix(), connect_deadline=0):
            pytest.fail("connected to a port that refuses connections")
    assert trio.current_time() == started
    assert warnings.records == []


async def test_the_wait_is_cancellable(
    refused_dsn: str, warnings: Warnings, autojump_clock: trio.testing.MockClock
) -> None:
    async def cancel_once_waiting(scope: trio.CancelScope) -> None:
        await warnings.first.wait()
        scope.cancel()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_once_waiting, scope)
            async with open_postgres_storage(refused_dsn, prefix=prefix(), connect_deadline=None):
                pytest.fail("connected to a port that refuses connections")
    assert scope.cancelled_caught
    assert warnings.attempts == [1]


@pytest.mark.parametrize("deadline", [-1.0, float("nan")])
async def test_invalid_deadline(refused_dsn: str, deadline: float) -> None:
    with pytest.raises(ValueError, match="connect_deadline: must be >= 0 or None"):
        async with open_postgres_storage(refused_dsn, prefix=prefix(), connect_deadline=deadline):
            pytest.fail("opened with an invalid deadline")


def test_default_deadline() -> None:
    assert DEFAULT_CONNECT_DEADLINE == 30.0


async def test_waits_for_a_server_that_comes_up(
    own_pg_server: ThrowawayPostgres, warnings: Warnings
) -> None:
    dsn = own_pg_server.dsn  # stopping with keep_data keeps the port, so the DSN
    await trio.to_thread.run_sync(functools.partial(own_pg_server.stop, keep_data=True))
    try:

        async def start_server_once_waited_for() -> None:
            await warnings.first.wait()
            await trio.to_thread.run_sync(own_pg_server.start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_server_once_waited_for)
            with trio.fail_after(120):
                async with open_postgres_storage(
                    dsn, prefix=prefix(), connect_deadline=120
                ) as storage:
                    assert await storage.live_runners() == []
    finally:
        if not own_pg_server.running:
            own_pg_server.start()
    assert warnings.attempts[0] == 1
    assert f"waiting for PostgreSQL at {describe_server(dsn)}" in warnings.records[0].getMessage()


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)
passwords = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)


@given(host=hosts, port=ports, password=passwords)
def test_describe_server_shows_host_and_port_only(host: str, port: int, password: str) -> None:
    keywords = make_conninfo(host=host, port=port, user="u", password=password, dbname="d")
    url = f"postgresql://u:{quote(password, safe='')}@{host}:{port}/d?sslmode=prefer"
    assert describe_server(keywords) == describe_server(url) == f"{host}:{port}"


def test_describe_server_defaults() -> None:
    assert describe_server("dbname=app") == "the local socket:5432"
    assert describe_server("postgresql:///app?host=/run/postgresql") == "/run/postgresql:5432"


async def test_a_runner_waits_to_register_while_the_server_is_down(
    own_pg_server: ThrowawayPostgres,
) -> None:
    waiting = Warnings()
    logger = logging.getLogger("trio_cluster.postgres.leases")
    logger.addHandler(waiting)
    try:
        async with open_postgres_storage(own_pg_server.dsn, prefix=prefix()) as storage:
            await trio.to_thread.run_sync(functools.partial(own_pg_server.stop, keep_data=True))

            async def start_server_once_waited_for() -> None:
                await waiting.first.wait()
                await trio.to_thread.run_sync(own_pg_server.start)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_server_once_waited_for)
                with trio.fail_after(120):
                    async with open_runner(storage=storage) as runner:
                        assert runner.machine_id >= 0
    finally:
        logger.removeHandler(waiting)
        if not own_pg_server.running:
            own_pg_server.start()
    assert (
        waiting.records[0].getMessage().startswith(f"cannot register runner {runner.address} yet")
    )
