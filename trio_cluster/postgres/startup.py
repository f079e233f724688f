"""The first connection of a storage: waiting for a database that is not up yet.

Processes and their database often start together (a compose file, a pod and its
database pod, a host rebooting), and a runner that exits at once because the server is
a few seconds behind only gets restarted, with a scarier log. So the first connection,
and only that one, is retried until a deadline; once the storage is open a lost
connection is the pool's and the lease session's business, which have their own rules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Unpack

import trio
from psycopg.conninfo import conninfo_to_dict

from ..core.retry import RetryPolicy
from ..errors import PersistenceError
from ..pgdriver.connection import Connection, ConnectOptions, _connect
from ..pgdriver.errors import ConnectionLost

__all__ = ["DEFAULT_CONNECT_DEADLINE", "STARTUP_RETRY", "describe_server", "open_first_connection"]

log = logging.getLogger("trio_cluster.postgres.storage")

DEFAULT_CONNECT_DEADLINE = 30.0
"""Seconds: long enough for a server started alongside the runner (a fresh container
runs initdb and recovery in a few seconds), short enough that a wrong host fails the
deployment visibly rather than hanging it."""

STARTUP_RETRY = RetryPolicy(
    base_delay=0.1, factor=2.0, max_delay=2.0, max_attempts=2**62, max_elapsed=2.0**62, jitter=0.5
)
"""Unbounded (the deadline ends the wait); a server that comes up is found within 2 s.
Half jitter: runners started together spread out, but no retry follows the failed
attempt at once."""


def describe_server(dsn: str) -> str:
    """``host:port`` of ``dsn``, for logs and errors: never its password or options."""
    params = conninfo_to_dict(dsn)
    host = params.get("host") or params.get("hostaddr") or "the local socket"
    return f"{host}:{params.get('port') or 5432}"


def _one_line(error: BaseException) -> str:
    # libpq's messages run over several lines ("Is the server running ...?").
    return " ".join(str(error).split())


@asynccontextmanager
async def open_first_connection(
    dsn: str, *, deadline: float | None, **options: Unpack[ConnectOptions]
) -> AsyncIterator[Connection]:
    """Connect to ``dsn``, retrying refused or failed connections for ``deadline`` seconds.

    ``deadline`` bounds the whole wait, attempts included (a connection to a host that
    drops packets would otherwise hang for minutes); ``None`` waits until cancelled,
    ``0`` makes one attempt, without a bound, and fails at once. Each failure is logged
    at WARNING with the attempt number and the next delay. An invalid DSN is not
    retried (``ValueError``), and neither is anything after the connection is made.
    """
    if deadline is not None and not deadline >= 0:
        raise ValueError(f"connect_deadline: must be >= 0 or None (got {deadline!r})")
    delays = STARTUP_RETRY.delays()
    conn: Connection | None = None
    attempt = 0
    last_error: BaseException | None = None
    with trio.move_on_at(trio.current_time() + deadline if deadline else math.inf):
        while True:
            attempt += 1
            try:
                conn = await _connect(dsn, **options)
            except (ConnectionLost, OSError) as error:
                last_error = error
            else:
                break
            if deadline == 0:
                break
            delay = next(delays)
            log.warning(
                "waiting for PostgreSQL at %s (attempt %d): %s; retrying in %.1f s",
                describe_server(dsn),
                attempt,
                _one_line(last_error),
                delay,
            )
            await trio.sleep(delay)
    if conn is None:
        raise _gave_up(dsn, deadline, attempt, last_error) from last_error
    try:
        yield conn
    finally:
        conn.close()


def _gave_up(
    dsn: str, deadline: float | None, attempts: int, error: BaseException | None
) -> PersistenceError:
    server = describe_server(dsn)
    # The deadline may fall during the first attempt, before any error.
    last = _one_line(error) if error is not None else "no answer yet"
    if deadline == 0:
        return PersistenceError(
            f"cannot connect to PostgreSQL at {server} (connect_deadline=0: no retries): {last}"
        )
    tried = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return PersistenceError(
        f"PostgreSQL at {server} did not accept a connection within"
        f" connect_deadline={deadline:g} s ({tried}; last: {last})"
    )
