"""A small PostgreSQL driver for Trio, over libpq's non-blocking API (``psycopg.pq``).

Why our own: the design card's trio-asyncpg is not on PyPI; triopg, the
nearest library, measured 4 to 8 times slower here, needs a dependency it
does not declare, swaps the process-wide asyncio event loop policy, and does
not notice a terminated LISTEN connection. This package drives libpq with
Trio's socket waits instead and knows nothing of the cluster: the storage
adapter (:mod:`trio_cluster.postgres`) is its only user in the library.
See ``connection`` for the concurrency design, ``codec`` for type mapping,
``errors`` for the SQLSTATE-based exceptions, ``pool`` for the connection
pool and ``server`` for a throwaway server for tests and benchmarks.
"""

from trio_cluster.pgdriver.codec import Param
from trio_cluster.pgdriver.connection import (
    Connection,
    ConnectOptions,
    Notification,
    open_connection,
)
from trio_cluster.pgdriver.errors import (
    ConnectionLost,
    DeadlockDetected,
    LockNotAvailable,
    PgError,
    QueryCanceled,
    SerializationFailure,
    UniqueViolation,
)
from trio_cluster.pgdriver.pool import Pool, open_pool

__all__ = [
    "ConnectOptions",
    "Connection",
    "ConnectionLost",
    "DeadlockDetected",
    "LockNotAvailable",
    "Notification",
    "Param",
    "PgError",
    "Pool",
    "QueryCanceled",
    "SerializationFailure",
    "UniqueViolation",
    "open_connection",
    "open_pool",
]
