"""Storage interfaces the runtime depends on, and the in-memory implementation.

The runtime depends on these protocols alone (it imports the in-memory
storage only as its default): any object with these methods will do. The
PostgreSQL adapter lives in :mod:`trio_cluster.postgres`.
"""

from .base import (
    NO_ORIGIN,
    DeferredStorage,
    Gap,
    InterruptStored,
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
    TimerStorage,
)
from .memory import MemoryStorage

__all__ = [
    "NO_ORIGIN",
    "DeferredStorage",
    "Gap",
    "InterruptStored",
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
    "TimerStorage",
]
