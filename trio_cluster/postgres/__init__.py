"""The PostgreSQL storage: runners, leases, messages and entity state in one database.

``open_postgres_storage(dsn)`` is what an application needs; ``LeaseTiming``
tunes how fast a lost lock connection is given up, ``Retention`` how long processed
requests (and so their dedup keys) are kept. The SQL lives here, one
module per concern (``leases``, ``messages``, ``states``, ``schema``,
``status``); the wire protocol is :mod:`trio_cluster.pgdriver`'s.
"""

from ..storage.retention import Retention
from .leases import LeaseTiming
from .startup import DEFAULT_CONNECT_DEADLINE
from .storage import PostgresStorage, open_postgres_storage

__all__ = [
    "DEFAULT_CONNECT_DEADLINE",
    "LeaseTiming",
    "PostgresStorage",
    "Retention",
    "open_postgres_storage",
]
