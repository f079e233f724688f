"""trio_cluster: sharded virtual actors (entities) for Trio, coordinated by PostgreSQL alone.

Declare an :class:`Entity` and its RPCs, implement them in a handler class,
and host it with :func:`open_runner`. Everything a caller can catch is a
:class:`ClusterError` subclass or an error your RPC declared.
"""

from .broadcast import (
    RESIDENT,
    STORED,
    Audience,
    BroadcastOutcome,
    BroadcastResult,
    RunnerHandler,
    broadcast_key,
)
from .config import ConfigError, EntityOptions, ShardingConfig
from .core.hashing import ShardId
from .core.retry import RetryPolicy
from .entity import Entity, Implementation, Rpc, StreamRpc
from .errors import (
    CLUSTER_ERRORS,
    AlreadyProcessingMessage,
    AnyClusterError,
    ClusterError,
    DeferredAlreadyCompleted,
    DeferredFailed,
    EntityNotAssignedToRunner,
    Interrupted,
    MailboxFull,
    MalformedMessage,
    PersistenceError,
    RpcClientError,
    RunnerNotRegistered,
    RunnerUnavailable,
    SendTimeout,
    SerializationError,
    Suspended,
)
from .health import HealthConfig
from .instrument import Instrument
from .runtime.calls import Call, Handling, RequestInfo
from .runtime.client import Client
from .runtime.context import EntityAddress, EntityContext
from .runtime.metrics import Snapshot
from .runtime.runner import Runner, open_runner
from .runtime.signals import wait_for_termination
from .schedule import Firing, Missed, Schedule, ScheduledFunction, Tell
from .singleton import Singleton, SingletonContext
from .state import State
from .storage import (
    DeferredStorage,
    Lease,
    LeaseSession,
    MemoryStorage,
    MessageStorage,
    RunnerStorage,
    ScheduleStorage,
    StateStorage,
    StatusStorage,
    Storage,
    TimerStorage,
)
from .transport.config import TransportConfig

__all__ = [
    "CLUSTER_ERRORS",
    "RESIDENT",
    "STORED",
    "AlreadyProcessingMessage",
    "AnyClusterError",
    "Audience",
    "BroadcastOutcome",
    "BroadcastResult",
    "Call",
    "Client",
    "ClusterError",
    "ConfigError",
    "DeferredAlreadyCompleted",
    "DeferredFailed",
    "DeferredStorage",
    "Entity",
    "EntityAddress",
    "EntityContext",
    "EntityNotAssignedToRunner",
    "EntityOptions",
    "Firing",
    "Handling",
    "HealthConfig",
    "Implementation",
    "Instrument",
    "Interrupted",
    "Lease",
    "LeaseSession",
    "MailboxFull",
    "MalformedMessage",
    "MemoryStorage",
    "MessageStorage",
    "Missed",
    "PersistenceError",
    "RequestInfo",
    "RetryPolicy",
    "Rpc",
    "RpcClientError",
    "Runner",
    "RunnerHandler",
    "RunnerNotRegistered",
    "RunnerStorage",
    "RunnerUnavailable",
    "Schedule",
    "ScheduleStorage",
    "ScheduledFunction",
    "SendTimeout",
    "SerializationError",
    "ShardId",
    "ShardingConfig",
    "Singleton",
    "SingletonContext",
    "Snapshot",
    "State",
    "StateStorage",
    "StatusStorage",
    "Storage",
    "StreamRpc",
    "Suspended",
    "Tell",
    "TimerStorage",
    "TransportConfig",
    "broadcast_key",
    "open_runner",
    "wait_for_termination",
]
