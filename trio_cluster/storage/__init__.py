"""Storage interfaces the runtime depends on, and the in-memory implementation.

The runtime depends on these protocols alone (it imports the in-memory
storage only as its default): any object with these methods will do. The
PostgreSQL adapter lives in :mod:`trio_cluster.postgres`.
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
    ScheduleStorage,
    StateStorage,
    StateWrite,
    StatusStorage,
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
    "ScheduleStorage",
    "StateStorage",
    "StateWrite",
    "StatusStorage",
    "Storage",
    "Stored",
]
