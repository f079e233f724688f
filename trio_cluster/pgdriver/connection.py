"""One PostgreSQL connection driven by Trio over libpq (``psycopg.pq``).

Trio lets only one task wait on a socket at a time, and libpq is not re-entrant, so every
use of the socket happens inside `Connection._exclusive` (a FIFO lock). Statements hold it
for their whole round trip. Idle readers (`Connection.wait_notification`,
`Connection.follow_notifications`, `Connection.wait_closed`) hold it only while the
connection is otherwise idle: a
statement that wants the lock cancels the idle reader's wait, runs, and the idle reader
resumes afterwards. So a lease holder can watch its lock connection for loss *and* run
statements on it, without either blocking the other.

Statements run with ``prepare=True`` are prepared once per connection (named, in a
bounded `StatementCache`) and then only bound and executed: the server skips parsing
and planning them again. A new connection (a reconnect) starts with an empty cache; a
plan the server lost or invalidated (SQLSTATE 26000, 0A000) is prepared again, and the
statement retried once when no transaction is open (inside one, the error aborted the
transaction, so it is raised as the unnamed path would).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypedDict, Unpack

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq.abc import PGconn, PGresult

from trio_cluster.pgdriver.codec import Param, decode_rows, encode_params
from trio_cluster.pgdriver.errors import ConnectionLost, PgError, error_class_for
from trio_cluster.pgdriver.statements import StatementCache, StatementKey
from trio_cluster.pgdriver.turns import take

__all__ = ["ConnectOptions", "Connection", "Notification", "open_connection"]

log = logging.getLogger("trio_cluster.pgdriver")

_CANCEL_RETRY_S = 0.25
"""A cancel request that arrives before the server starts the statement is ignored, so
while draining an interrupted statement the request is repeated this often."""

_NONBLOCKING_CANCEL = pq.version() >= 170000
"""libpq 17 added PGcancelConn; psycopg[binary] bundles a recent enough libpq."""

_OK = pq.ExecStatus.COMMAND_OK
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_EMPTY_QUERY = pq.ExecStatus.EMPTY_QUERY
_SUCCESS = frozenset({_OK, _TUPLES_OK, _EMPTY_QUERY})
_COPY_STATES = frozenset({pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH})
_TX_IDLE = pq.TransactionStatus.IDLE
_TX_INERROR = pq.TransactionStatus.INERROR
_PLAN_GONE = frozenset({b"26000", b"0A000"})
"""invalid_sql_statement_name (DEALLOCATE ALL, a pooler) and feature_not_supported
("cached plan must not change result type": the schema changed under the plan)."""
_NO_SUCH_STATEMENT = b"26000"


@dataclass(frozen=True, slots=True)
class Notification:
    """A NOTIFY received on a channel this connection LISTENs to."""

    channel: str
    payload: str
    pid: int
    """Backend PID of the notifying session."""


class ConnectOptions(TypedDict, total=False):
    """Keyword options of `open_connection`, also accepted by `open_pool`."""

    keepalives_idle_s: int
    keepalives_interval_s: int
    keepalives_count: int
    tcp_user_timeout_ms: int | None
    application_name: str
    cleanup_timeout_s: float
    prepared_statements: bool


@asynccontextmanager
async def open_connection(dsn: str, **options: Unpack[ConnectOptions]) -> AsyncIterator[Connection]:
    """Connect to *dsn*; the connection is closed when the block exits.

    The keepalive and TCP user timeout defaults (see `_connect`) make a silently
    dead peer (network partition, crashed host) surface as `ConnectionLost` within
    seconds instead of minutes. *cleanup_timeout_s* bounds the shielded work done
    after an interrupted statement (cancel request, drain, rollback); past it the
    connection is given up. Without *prepared_statements*, ``prepare=True`` is
    ignored and every statement goes out unnamed: for a transaction-mode pooler
    that does not track prepared statements (PgBouncer before 1.21, or with
    ``max_prepared_statements = 0``), where a statement prepared on one server
    connection is unknown on the next. Connecting itself has no timeout: bound it
    with a cancel scope.
    """
    conn = await _connect(dsn, **options)
    try:
        yield conn
    finally:
        conn.close()


async def _connect(
    dsn: str,
    *,
    keepalives_idle_s: int = 5,
    keepalives_interval_s: int = 1,
    keepalives_count: int = 3,
    tcp_user_timeout_ms: int | None = 5000,
    application_name: str = "trio_cluster",
    cleanup_timeout_s: float = 2.0,
    prepared_statements: bool = True,
) -> Connection:
    """An open connection that the caller must close (the pool's building block)."""
    defaults: dict[str, str | int] = {
        "keepalives": 1,
        "keepalives_idle": keepalives_idle_s,
        "keepalives_interval": keepalives_interval_s,
        "keepalives_count": keepalives_count,
        "application_name": application_name,
    }
    if tcp_user_timeout_ms is not None:
        defaults["tcp_user_timeout"] = tcp_user_timeout_ms
    try:
        given = conninfo_to_dict(dsn)
        settings = {key: value for key, value in defaults.items() if key not in given}
        # The codec decodes all text as UTF-8, whatever the DSN says.
        conninfo = make_conninfo(dsn, **settings, client_encoding="UTF8")
    except psycopg.Error as exc:
        raise ValueError(f"invalid DSN: {exc}") from None
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        await _finish_connecting(pgconn)
    except BaseException:
        pgconn.finish()
        raise
    pgconn.nonblocking = 1
    conn = Connection(
        pgconn, cleanup_timeout_s=cleanup_timeout_s, prepared_statements=prepared_statements
    )
    if not (pgconn.parameter_status(b"DateStyle") or b"").startswith(b"ISO"):
        # Text timestamps are only unambiguous in ISO style.
        try:
            await conn.execute("SET DateStyle TO ISO")
        except BaseException:
            conn.close()
            raise
    return conn


async def _finish_connecting(pgconn: PGconn) -> None:
    while True:
        if pgconn.status == pq.ConnStatus.BAD:
            raise ConnectionLost(f"cannot connect: {pgconn.get_error_message()}")
        status = pgconn.connect_poll()
        # The socket can change between polls (several hosts, SSL fallback).
        if status == pq.PollingStatus.OK:
            return
        if status == pq.PollingStatus.READING:
            await trio.lowlevel.wait_readable(pgconn.socket)
        elif status == pq.PollingStatus.WRITING:
            await trio.lowlevel.wait_writable(pgconn.socket)
        else:
            raise ConnectionLost(f"cannot connect: {pgconn.get_error_message()}")


def _send_prepared(
    name: bytes, values: list[bytes | None], formats: list[int] | None, pgconn: PGconn
) -> None:
    pgconn.send_query_prepared(name, values, formats)


def _send_prepare(name: bytes, command: bytes, oids: list[int], pgconn: PGconn) -> None:
    pgconn.send_prepare(name, command, oids)


def _send_simple(command: bytes, pgconn: PGconn) -> None:
    pgconn.send_query(command)


def _sqlstate(results: list[PGresult]) -> bytes | None:
    """The SQLSTATE of the first failed result, None if none failed."""
    for result in results:
        if result.status not in _SUCCESS:
            return result.error_field(pq.DiagnosticField.SQLSTATE) or b""
    return None


class Connection:
    """A connection to PostgreSQL.

    Tasks may share it for independent statements (they take turns, FIFO), but a
    transaction belongs to the task that opened it: statements of other tasks would run
    inside it.
    """

    def __init__(
        self, pgconn: PGconn, *, cleanup_timeout_s: float, prepared_statements: bool
    ) -> None:
        self._pgconn = pgconn
        self._prepared_statements = prepared_statements
        self._fd = pgconn.socket
        self._backend_pid = pgconn.backend_pid
        self._cleanup_timeout_s = cleanup_timeout_s
        self._lock = trio.Lock()
        self._idle_reader_scope: trio.CancelScope | None = None
        self._notifications: deque[Notification] = deque()
        self._changed = trio.Event()
        self._closed = False
        self._broken = False
        self._listening = False
        self._fatal_notice: PgError | None = None
        self._lost_reason = "the connection was lost"
        self._statements = StatementCache()
        pgconn.notice_handler = self._on_notice

    def __repr__(self) -> str:
        state = "broken" if self._broken else "closed" if self._closed else "open"
        return f"<Connection pid={self._backend_pid} {state}>"

    # -- state ----------------------------------------------------------------------

    @property
    def backend_pid(self) -> int:
        """PID of the server process serving this connection (see pg_stat_activity)."""
        return self._backend_pid

    @property
    def closed(self) -> bool:
        """True once the connection is unusable, whether closed by us or lost."""
        return self._closed

    @property
    def broken(self) -> bool:
        """True if the connection was lost or given up on rather than closed by us."""
        return self._broken

    @property
    def in_transaction(self) -> bool:
        """True while a transaction is open (also when it has failed)."""
        return not self._closed and self._pgconn.transaction_status != _TX_IDLE

    @property
    def listening(self) -> bool:
        """True once `listen` has been called (the pool does not reuse such connections)."""
        return self._listening

    def close(self) -> None:
        """Close at once; an open transaction is rolled back by the server."""
        self._shut(broken=False)

    # -- statements -----------------------------------------------------------------

    async def fetch(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> list[tuple[Any, ...]]:
        """All result rows; parameters are ``$1``, ``$2``... (extended protocol).

        With *prepare*, the statement is prepared on first use and reused after (see
        the module docstring): for the hot statements, not for one-off texts.
        """
        return decode_rows(await self._query(sql, params, prepare=prepare))

    async def fetchrow(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> tuple[Any, ...] | None:
        """The first row, or None when there are no rows."""
        rows = decode_rows(await self._query(sql, params, prepare=prepare))
        return rows[0] if rows else None

    async def fetchval(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> Any:
        """The first column of the first row, or None when there are no rows."""
        rows = decode_rows(await self._query(sql, params, prepare=prepare))
        return rows[0][0] if rows and rows[0] else None

    async def execute(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> int:
        """Run one statement; the number of rows it affected (0 when not applicable)."""
        result = await self._query(sql, params, prepare=prepare)
        return result.command_tuples or 0

    async def execute_script(self, sql: str) -> None:
        """Run several ``;``-separated statements without parameters (simple protocol).

        Outside a transaction the script runs as one implicit transaction: if a
        statement fails, the earlier ones are rolled back too.
        """
        self._raise_first_error(await self._run(lambda pgconn: pgconn.send_query(sql.encode())))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN, then COMMIT, or ROLLBACK if the block raises (cancellation included).

        The rollback is shielded and bounded by *cleanup_timeout_s*; if it cannot be done
        the connection is given up (`broken`), which the server treats as a rollback.
        Transactions do not nest.
        """
        if self.in_transaction:
            raise RuntimeError("a transaction is already open on this connection")
        await self.execute("BEGIN")
        try:
            yield
        except BaseException:
            await self._rollback_shielded()
            raise
        try:
            status = (await self._query("COMMIT", ())).command_status
        except BaseException:
            await self._rollback_shielded()
            raise
        if status == b"ROLLBACK":
            # The server answers COMMIT of a failed transaction with a silent rollback.
            raise PgError(
                "transaction rolled back: a statement in it failed and was caught",
                sqlstate="25P02",
            )

    async def _rollback_shielded(self) -> None:
        with trio.move_on_after(self._cleanup_timeout_s, shield=True) as scope:
            if self.in_transaction:
                try:
                    await self._query("ROLLBACK", ())
                except PgError:
                    self._shut(broken=True)
        if scope.cancelled_caught:
            self._shut(broken=True)

    # -- notifications and liveness -------------------------------------------------

    async def listen(self, channel: str) -> None:
        """Subscribe to *channel* (any string: it is quoted as an identifier)."""
        await self.execute(f"LISTEN {self._quote_ident(channel)}")
        self._listening = True

    async def unlisten(self, channel: str) -> None:
        """Unsubscribe from *channel*; notifications already received stay queued."""
        await self.execute(f"UNLISTEN {self._quote_ident(channel)}")

    async def wait_notification(self) -> Notification:
        """The oldest notification not yet returned, waiting for one if needed.

        Notifications that arrive while statements run are queued, so none is missed
        between calls. Raises `ConnectionLost` once the queue is empty and the
        connection is gone. Statements on this connection can run meanwhile.
        """
        while not self._notifications:
            if self._closed:
                raise self._lost_error()
            await self._read_while_idle(lambda: bool(self._notifications))
        return self._notifications.popleft()

    async def follow_notifications(self, receive: Callable[[Notification], None]) -> None:
        """Pass each notification to ``receive`` as it arrives, oldest first, until the
        connection is lost or closed: then `ConnectionLost`.

        What `wait_notification` in a loop does, for less: the idle socket is read
        under one cancel scope and one hold of the lock for as long as no statement
        wants the connection, not one of each per notification (a lease holder
        hears every notice of its cluster). ``receive`` runs in this task and must
        neither block nor raise. Statements on this connection can run meanwhile.
        """
        while True:
            self._pass_notifications(receive)
            if self._closed:
                raise self._lost_error()
            await self._read_while_idle(lambda: self._closed, receive)

    def _pass_notifications(self, receive: Callable[[Notification], None]) -> None:
        while self._notifications:
            receive(self._notifications.popleft())

    async def wait_closed(self) -> None:
        """Return as soon as the connection is lost or closed.

        Reads the socket while the connection is idle, so a server-side termination is
        noticed within milliseconds and a silent network failure as soon as TCP
        keepalives give up. Statements on this connection can run meanwhile; received
        notifications are queued for `wait_notification`.
        """
        while not self._closed:
            await self._read_while_idle(lambda: self._closed)

    async def _read_while_idle(
        self, done: Callable[[], bool], receive: Callable[[Notification], None] | None = None
    ) -> None:
        """One round of reading the idle socket (or of waiting for whoever does); with
        ``receive``, reading on, passing notifications to it, until ``done``."""
        if self._idle_reader_scope is not None:
            # Another idle reader owns the socket; it reports what it reads.
            await self._changed.wait()
            return
        scope = trio.CancelScope()
        self._idle_reader_scope = scope
        try:
            with scope:
                await take(self._lock)  # the socket wait is the schedule point
                try:
                    while not (done() or self._closed):
                        if receive is not None:
                            # Those a statement received while this waited for the lock.
                            self._pass_notifications(receive)
                        await self._wait_readable()
                        self._consume_input()
                        if receive is None:
                            break
                finally:
                    self._lock.release()
        except ConnectionLost:
            pass  # recorded in self._closed; the callers' loops end on it
        finally:
            self._idle_reader_scope = None
            self._signal_change()

    # -- protocol -------------------------------------------------------------------

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[PGconn]:
        if self._idle_reader_scope is not None:
            self._idle_reader_scope.cancel()  # it resumes after us
        await trio.lowlevel.checkpoint_if_cancelled()
        await take(self._lock)  # statements always wait on the socket (see ``turns``)
        try:
            if self._closed:
                raise self._lost_error()
            yield self._pgconn
        finally:
            self._lock.release()

    async def _query(self, sql: str, params: Sequence[Param], *, prepare: bool = False) -> PGresult:
        values, oids, formats = encode_params(params)
        command = sql.encode()
        # In a failed transaction every statement fails alike: no point preparing.
        if prepare and self._prepared_statements and self._pgconn.transaction_status != _TX_INERROR:
            return await self._query_prepared((command, tuple(oids)), values, formats)

        def send(pgconn: PGconn) -> None:
            pgconn.send_query_params(command, values, oids, formats)

        return self._single(await self._run(send))

    def _single(self, results: list[PGresult]) -> PGresult:
        self._raise_first_error(results)
        if len(results) != 1:
            raise PgError(f"expected one result, got {len(results)}; use execute_script")
        return results[0]

    async def _query_prepared(
        self, key: StatementKey, values: list[bytes | None], formats: list[int] | None
    ) -> PGresult:
        """Execute the statement prepared for *key*, preparing it first if needed.

        The whole exchange holds the connection, so two tasks never prepare the same
        statement twice.
        """
        async with self._exclusive() as pgconn:
            retried = False
            while True:
                name = self._statements.get(key)
                if name is None:
                    name = await self._prepare(pgconn, key)
                results = await self._round_trip(
                    pgconn, partial(_send_prepared, name, values, formats)
                )
                sqlstate = _sqlstate(results)
                if sqlstate in _PLAN_GONE:
                    self._statements.discard(key, deallocate=sqlstate != _NO_SUCH_STATEMENT)
                    if not retried and pgconn.transaction_status == _TX_IDLE:
                        retried = True
                        continue
                return self._single(results)

    async def _prepare(self, pgconn: PGconn, key: StatementKey) -> bytes:
        if pgconn.transaction_status == _TX_IDLE:
            # DEALLOCATE is refused in a failed transaction; outside one it is harmless.
            for retired in self._statements.take_retired():
                results = await self._round_trip(
                    pgconn, partial(_send_simple, b"DEALLOCATE " + retired)
                )
                if _sqlstate(results) not in {None, _NO_SUCH_STATEMENT}:
                    self._raise_first_error(results)
        name = self._statements.new_name()
        command, oids = key
        results = await self._round_trip(pgconn, partial(_send_prepare, name, command, list(oids)))
        self._raise_first_error(results)
        self._statements.add(key, name)
        return name

    async def _run(self, send: Callable[[PGconn], None]) -> list[PGresult]:
        """Send a statement and collect its results on the exclusively held connection."""
        async with self._exclusive() as pgconn:
            return await self._round_trip(pgconn, send)

    async def _round_trip(self, pgconn: PGconn, send: Callable[[PGconn], None]) -> list[PGresult]:
        """Send one statement and collect its results; the one place statements wait.

        The caller holds `_exclusive`.
        """
        try:
            send(pgconn)
        except psycopg.Error as exc:
            if pgconn.status == pq.ConnStatus.BAD:
                raise self._lose(f"cannot send: {exc}") from None
            raise PgError(f"cannot send: {exc}") from None
        try:
            results = await self._collect_results(pgconn)
        except ConnectionLost:
            raise
        except BaseException:
            # Cancelled (or worse) mid-statement: get the connection back in sync.
            await self._abandon_statement(pgconn)
            raise
        if pgconn.status == pq.ConnStatus.BAD:
            raise self._lose_after(results, "the connection was lost")
        return results

    async def _collect_results(self, pgconn: PGconn) -> list[PGresult]:
        while self._flush(pgconn):
            await self._wait_readable_or_writable()
            self._consume_input()
        results: list[PGresult] = []
        try:
            while True:
                while pgconn.is_busy():
                    await self._wait_readable()
                    self._consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                if result.status in _COPY_STATES:
                    raise self._lose("COPY is not supported by this driver")
                results.append(result)
        except ConnectionLost as lost:
            raise self._lose_after(results, str(lost)) from None
        self._take_notifications()
        return results

    async def _abandon_statement(self, pgconn: PGconn) -> None:
        """Cancel the running statement and drain its results, or give the connection up."""
        with trio.move_on_after(self._cleanup_timeout_s, shield=True):
            try:
                while True:
                    await self._request_cancel(pgconn)
                    with trio.move_on_after(_CANCEL_RETRY_S):
                        await self._collect_results(pgconn)
                        return
            except ConnectionLost:
                return
        self._shut(broken=True)

    async def _request_cancel(self, pgconn: PGconn) -> None:
        if not _NONBLOCKING_CANCEL:
            # Older libpq can only cancel with a blocking call (one round trip).
            try:
                pgconn.get_cancel().cancel()
            except psycopg.Error as exc:
                log.debug("cancel request failed: %s", exc)
            await trio.lowlevel.checkpoint()
            return
        try:
            cancel = pgconn.cancel_conn()
        except psycopg.Error:
            return  # the drain that follows fails too, and gives the connection up
        try:
            cancel.start()
            while (status := cancel.poll()) != pq.PollingStatus.OK:
                if status == pq.PollingStatus.READING:
                    await trio.lowlevel.wait_readable(cancel.socket)
                elif status == pq.PollingStatus.WRITING:
                    await trio.lowlevel.wait_writable(cancel.socket)
                else:
                    log.debug("cancel request failed: %s", cancel.get_error_message())
                    return
        except psycopg.Error as exc:
            log.debug("cancel request failed: %s", exc)
        finally:
            cancel.finish()

    def _flush(self, pgconn: PGconn) -> bool:
        """Send buffered output; True while some is left."""
        try:
            return pgconn.flush() != 0
        except psycopg.Error as exc:
            raise self._lose(f"cannot send: {exc}") from None

    def _consume_input(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.Error as exc:
            self._harvest_fatal_error()
            raise self._lose(str(exc).strip()) from None
        self._take_notifications()

    def _harvest_fatal_error(self) -> None:
        """Keep the server's last words (e.g. 57P01) that libpq parsed before the EOF."""
        for _ in range(8):  # bounded: a dead connection yields a few results, then None
            if self._pgconn.is_busy() or (result := self._pgconn.get_result()) is None:
                return
            if self._fatal_notice is None and result.error_field(pq.DiagnosticField.SQLSTATE):
                self._fatal_notice = self._error_from_result(result, ConnectionLost)

    def _take_notifications(self) -> None:
        received = False
        while (notify := self._pgconn.notifies()) is not None:
            self._notifications.append(
                Notification(notify.relname.decode(), notify.extra.decode(), notify.be_pid)
            )
            received = True
        if received:
            self._signal_change()

    async def _wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError:
            raise self._lost_error() from None

    async def _wait_readable_or_writable(self) -> None:
        # libpq wants both while flushing: the server may refuse our data until we read.
        closed = False

        async def wait(wait_fn: Callable[[int], Any]) -> None:
            nonlocal closed
            try:
                await wait_fn(self._fd)
            except trio.ClosedResourceError:
                closed = True
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, trio.lowlevel.wait_readable)
            nursery.start_soon(wait, trio.lowlevel.wait_writable)
        if closed:
            raise self._lost_error()

    def _on_notice(self, result: PGresult) -> None:
        # Called by libpq; a FATAL arriving while idle (e.g. pg_terminate_backend) comes
        # here, not as a result: keep it to explain the disconnection that follows.
        severity = result.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
        if severity in {b"FATAL", b"PANIC"}:
            self._fatal_notice = self._error_from_result(result, ConnectionLost)
        else:
            level = logging.WARNING if severity == b"WARNING" else logging.DEBUG
            log.log(level, "server says: %s", result.get_error_message().strip())

    # -- errors and shutdown --------------------------------------------------------

    def _raise_first_error(self, results: list[PGresult]) -> None:
        for result in results:
            if result.status not in _SUCCESS:
                error = self._error_from_result(result, None)
                if isinstance(error, ConnectionLost):
                    self._shut(broken=True)
                raise error

    @staticmethod
    def _error_from_result(result: PGresult, cls: type[PgError] | None) -> PgError:
        def field(code: pq.DiagnosticField) -> str | None:
            value = result.error_field(code)
            return None if value is None else value.decode(errors="replace")

        sqlstate = field(pq.DiagnosticField.SQLSTATE)
        message = field(pq.DiagnosticField.MESSAGE_PRIMARY) or (
            result.get_error_message().strip() or "unknown error"
        )
        detail = field(pq.DiagnosticField.MESSAGE_DETAIL)
        return (cls or error_class_for(sqlstate))(message, sqlstate=sqlstate, detail=detail)

    def _lose(self, reason: str) -> ConnectionLost:
        """Give the connection up; the error to raise about it."""
        if not self._closed:
            self._lost_reason = reason
        self._shut(broken=True)
        return self._lost_error()

    def _lose_after(self, results: list[PGresult], reason: str) -> ConnectionLost:
        # The server usually says why before hanging up (e.g. 57P01 on shutdown).
        for result in results:
            if result.error_field(pq.DiagnosticField.SQLSTATE):
                self._fatal_notice = self._error_from_result(result, ConnectionLost)
                break
        return self._lose(reason)

    def _lost_error(self) -> ConnectionLost:
        if not self._broken:
            return ConnectionLost("the connection is closed")
        if self._fatal_notice is not None:
            fatal = self._fatal_notice
            return ConnectionLost(fatal.message, sqlstate=fatal.sqlstate, detail=fatal.detail)
        return ConnectionLost(self._lost_reason)

    def _check_idle(self) -> bool:
        """Without waiting, whether an idle connection still looks usable (pool checkout).

        A server that terminated the session has usually sent a FATAL notice and EOF
        already; reading them here spares the next statement a `ConnectionLost`.
        """
        if self._closed:
            return False
        try:
            self._consume_input()
        except ConnectionLost:
            return False
        if self._fatal_notice is not None or self._pgconn.status == pq.ConnStatus.BAD:
            self._lose("the server ended the session")
            return False
        return True

    def _shut(self, *, broken: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._broken = broken
        try:
            # Wakes any task waiting on the socket with ClosedResourceError.
            with contextlib.suppress(RuntimeError):  # not inside Trio: nobody is waiting
                trio.lowlevel.notify_closing(self._fd)
        finally:
            self._pgconn.notice_handler = None
            self._pgconn.finish()
            self._signal_change()

    def _signal_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _quote_ident(self, name: str) -> str:
        if self._closed:
            raise self._lost_error()
        return pq.Escaping(self._pgconn).escape_identifier(name.encode()).decode()
