"""Storage interfaces the runtime depends on, and the in-memory implementation.

The runtime never imports an adapter: it takes any object with these
methods. The PostgreSQL adapter lives in :mod:`trio_cluster.postgres`.
"""

from .base import Lease, LeaseSession, MessageStorage, RunnerStorage, Saved, Storage
from .memory import MemoryStorage

__all__ = [
    "Lease",
    "LeaseSession",
    "MemoryStorage",
    "MessageStorage",
    "RunnerStorage",
    "Saved",
    "Storage",
]
