"""A fixed-size pool of connections, opened lazily and replaced when broken."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Unpack

import trio

from trio_cluster.pgdriver.codec import Param
from trio_cluster.pgdriver.connection import Connection, ConnectOptions, _connect
from trio_cluster.pgdriver.turns import take

__all__ = ["Pool", "open_pool"]


@asynccontextmanager
async def open_pool(
    dsn: str, size: int = 10, **connect_options: Unpack[ConnectOptions]
) -> AsyncIterator[Pool]:
    """A pool of at most *size* connections to *dsn*; all are closed when the block exits.

    No connection is opened up front, so a server that is down at start-up only makes the
    first statements fail, not the pool.
    """
    pool = Pool(dsn, size, connect_options)
    try:
        yield pool
    finally:
        pool.close()


class Pool:
    """Hands out connections one task at a time.

    A returned connection is reused only if it is healthy, outside a transaction and
    not LISTENing; otherwise it is closed and a new one is opened on demand. Session
    state (SET, temporary tables, session advisory locks) survives reuse, so keep it
    off pooled connections. Prepared statements (``prepare=True``) are such state on
    purpose: each connection keeps its own, and a replaced connection starts afresh.
    """

    def __init__(self, dsn: str, size: int, connect_options: ConnectOptions) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self._dsn = dsn
        self._size = size
        self._connect_options = connect_options
        # A token per connection that may exist: held by every borrower, so idle plus
        # borrowed connections never exceed size.
        self._slots = trio.Semaphore(size)
        self._idle: list[Connection] = []
        self._open = 0
        self._closed = False
        self._unreachable_since: float | None = None
        """When an attempt to connect, with none open, began (``unreachable_for``)."""

    @property
    def size(self) -> int:
        return self._size

    @property
    def open_connections(self) -> int:
        """Connections currently open, idle or borrowed."""
        return self._open

    def unreachable_for(self) -> float:
        """Seconds since an attempt to open a connection began, with none open, that
        nothing has succeeded since: 0 while the pool has or opens connections.

        A runner whose pool has been unreachable for long cannot serve its shards
        (see ``trio_cluster.postgres.leases``): its lock connection alone is no use.
        """
        if self._unreachable_since is None:
            return 0.0
        return trio.current_time() - self._unreachable_since

    async def check(self) -> None:
        """Return if a connection is open or can be opened; else `ConnectionLost`."""
        if self._open and self._unreachable_since is None:
            return
        async with self.connection():
            pass

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Borrow a connection for the block.

        Waits while all *size* connections are borrowed (FIFO); bound the wait with a
        cancel scope. Raises `ConnectionLost` if a new connection cannot be opened.
        """
        if self._closed:
            raise trio.ClosedResourceError("the pool is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        await take(self._slots)  # the block's statements wait on the socket (see ``turns``)
        try:
            conn = await self._take()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._slots.release()

    async def fetch(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> list[tuple[Any, ...]]:
        """`Connection.fetch` on a borrowed connection."""
        async with self.connection() as conn:
            return await conn.fetch(sql, params, prepare=prepare)

    async def fetchrow(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> tuple[Any, ...] | None:
        """`Connection.fetchrow` on a borrowed connection."""
        async with self.connection() as conn:
            return await conn.fetchrow(sql, params, prepare=prepare)

    async def fetchval(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> Any:
        """`Connection.fetchval` on a borrowed connection."""
        async with self.connection() as conn:
            return await conn.fetchval(sql, params, prepare=prepare)

    async def execute(
        self, sql: str, params: Sequence[Param] = (), *, prepare: bool = False
    ) -> int:
        """`Connection.execute` on a borrowed connection."""
        async with self.connection() as conn:
            return await conn.execute(sql, params, prepare=prepare)

    def close(self) -> None:
        """Close idle connections now and borrowed ones when they come back."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())

    async def _take(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()  # most recently used: warm, least likely timed out
            if conn._check_idle():
                return conn
            self._discard(conn)
        if self._closed:
            raise trio.ClosedResourceError("the pool is closed")
        if not self._open and self._unreachable_since is None:
            # Counted from the attempt's start: a connect that hangs (a host that
            # drops packets) counts as much as one refused at once.
            self._unreachable_since = trio.current_time()
        conn = await _connect(self._dsn, **self._connect_options)
        self._unreachable_since = None
        self._open += 1
        return conn

    def _give_back(self, conn: Connection) -> None:
        if self._closed or conn.closed or conn.in_transaction or conn.listening:
            self._discard(conn)
        else:
            self._idle.append(conn)

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1
