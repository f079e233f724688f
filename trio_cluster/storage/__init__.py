"""Storage interfaces the runtime depends on, and the in-memory implementation.

The runtime never imports an adapter: it takes any object with these
methods. The PostgreSQL adapter lives in :mod:`trio_cluster.postgres`.
"""

from .base import (
    Gap,
    Lease,
    LeaseSession,
    MembershipChanged,
    MessageStorage,
    Notice,
    Replied,
    RunnerStorage,
    Saved,
    Storage,
    Stored,
)
from .memory import MemoryStorage

__all__ = [
    "Gap",
    "Lease",
    "LeaseSession",
    "MembershipChanged",
    "MemoryStorage",
    "MessageStorage",
    "Notice",
    "Replied",
    "RunnerStorage",
    "Saved",
    "Storage",
    "Stored",
]
