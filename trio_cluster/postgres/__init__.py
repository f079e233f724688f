"""Trio access to PostgreSQL: a small driver over libpq (``psycopg.pq``).

No maintained Trio-native PostgreSQL driver exists, so this package drives libpq's
non-blocking API with Trio's socket waits. See `connection` for the concurrency design,
`codec` for type mapping, `errors` for the SQLSTATE-based exceptions and `server` for a
throwaway server for tests.
"""

from trio_cluster.postgres.codec import Param
from trio_cluster.postgres.connection import (
    Connection,
    ConnectOptions,
    Notification,
    open_connection,
)
from trio_cluster.postgres.errors import (
    ConnectionLost,
    DeadlockDetected,
    LockNotAvailable,
    PgError,
    QueryCanceled,
    SerializationFailure,
    UniqueViolation,
)
from trio_cluster.postgres.pool import Pool, open_pool

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
