"""The ClusterError family: every way the cluster itself (not your handler) can fail a call.

Each reason is its own class so that callers can ``except MailboxFull`` or
``match`` on the class; :data:`AnyClusterError` is the closed union for an
exhaustive ``match`` checked by the type checker::

    match err:
        case MailboxFull() | SendTimeout():
            retry_later()
        case _:
            assert_never(err)  # fails type checking when a reason is forgotten

Errors that cross a process boundary are rebuilt from their :attr:`reason`
and :attr:`message`; the original exception object stays on the side where
it was raised.
"""

from __future__ import annotations

from typing import ClassVar, Literal, TypeAlias

Reason: TypeAlias = Literal[
    "MailboxFull",
    "EntityNotAssignedToRunner",
    "AlreadyProcessingMessage",
    "MalformedMessage",
    "PersistenceError",
    "RunnerNotRegistered",
    "RunnerUnavailable",
    "SendTimeout",
    "Suspended",
    "RpcClientError",
    "SerializationError",
    "Interrupted",
    "DeferredAlreadyCompleted",
    "DeferredFailed",
]


class ClusterError(Exception):
    """Base of every error the cluster raises on its own account.

    ``entity_id`` and ``request_id`` are set when the failure concerns one
    call, so that logs and metrics can point at it without parsing text.
    """

    reason: ClassVar[Reason]

    def __init__(
        self,
        message: str,
        *,
        entity_id: str | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.entity_id = entity_id
        self.request_id = request_id

    #: Whether trying the same call again later can succeed. Senders and the
    #: retry helpers use this instead of a list of class names.
    retryable: ClassVar[bool] = False


class MailboxFull(ClusterError):
    """A volatile message found the entity's bounded mailbox full.

    Persisted messages never see this: they wait in storage until there is
    room. Back off and retry, or make the RPC persisted.
    """

    reason = "MailboxFull"
    retryable = True


class EntityNotAssignedToRunner(ClusterError):
    """The runner that received the message does not own the entity's shard.

    Raised while shards move between runners; the sender retries it within
    ``ShardingConfig.send_retry`` before giving up with this error.
    """

    reason = "EntityNotAssignedToRunner"
    retryable = True


class AlreadyProcessingMessage(ClusterError):
    """The entity is busy with a turn that this call would have to wait on.

    Raised at once, instead of a deadlock, when a turn-based entity (or a
    chain of them) would ask itself; and when a volatile request id arrives
    again while its first copy is queued. Retrying cannot help.
    """

    reason = "AlreadyProcessingMessage"


class MalformedMessage(ClusterError):
    """A payload could not be decoded into the RPC's declared type.

    Only the request that carried it fails; the entity and runner go on.
    """

    reason = "MalformedMessage"


class PersistenceError(ClusterError):
    """The storage failed or was unreachable; nothing acknowledged was lost."""

    reason = "PersistenceError"
    retryable = True


class RunnerNotRegistered(ClusterError):
    """The runner is not (or no longer) registered, so it may not take shards or send."""

    reason = "RunnerNotRegistered"


class RunnerUnavailable(ClusterError):
    """The runner that owns the shard could not be reached, or is shutting down."""

    reason = "RunnerUnavailable"
    retryable = True


class SendTimeout(ClusterError):
    """No reply arrived within the call's timeout.

    For a persisted message the request is still stored and will be
    processed; asking again with the same primary key returns its reply.
    """

    reason = "SendTimeout"
    retryable = True


class Suspended(ClusterError):
    """A handler parked the request until a signal resumes it.

    ``ctx.deferred(...)`` raises it in a persisted request's handler when the
    deferred has no outcome yet: the request is then stored as suspended and
    its caller goes on waiting, nobody sees this error. A handler that raises
    it itself ends its request with it (the final reply); ``resume_token``
    tells the caller what to wait on. It is not a defect, so the entity is
    not restarted.
    """

    reason = "Suspended"

    def __init__(
        self,
        message: str,
        *,
        resume_token: str = "",
        entity_id: str | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message, entity_id=entity_id, request_id=request_id)
        self.resume_token = resume_token


class RpcClientError(ClusterError):
    """The handler failed with an undeclared exception (a defect) and retries gave up.

    ``cause_type`` and the message describe the original exception, which is
    also chained as ``__cause__`` when it was raised in this process.
    """

    reason = "RpcClientError"

    def __init__(
        self,
        message: str,
        *,
        cause_type: str = "",
        entity_id: str | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message, entity_id=entity_id, request_id=request_id)
        self.cause_type = cause_type


class SerializationError(ClusterError):
    """A payload, reply or declared error could not be encoded for the wire or storage.

    Raised to the caller of ``ask``/``tell`` for its own payload, before
    anything is stored or sent; for a reply, only that request fails.
    """

    reason = "SerializationError"


class Interrupted(ClusterError):
    """The request was withdrawn by its caller before its handler finished.

    Its ``ask`` timed out or was cancelled with ``interrupt`` on: the handler
    was cancelled (or never started), and whatever it changed in the
    entity's durable state was rolled back. A persisted request keeps this
    as its final, stored reply, so asking again with the same primary key
    gets it again: retrying cannot help.
    """

    reason = "Interrupted"


class DeferredAlreadyCompleted(ClusterError):
    """A deferred was completed (or failed) a second time: the first outcome stands.

    Raised to whoever completes it, by ``complete_deferred`` and
    ``fail_deferred``; the suspended request sees only the first outcome.
    """

    reason = "DeferredAlreadyCompleted"


class DeferredFailed(ClusterError):
    """The deferred a handler waits on was failed by whoever held its resume token.

    Raised by ``ctx.deferred(...)`` in the handler, with the message the
    failer gave; a handler that does not catch it ends its request with it,
    and the caller gets it.
    """

    reason = "DeferredFailed"


AnyClusterError: TypeAlias = (
    MailboxFull
    | EntityNotAssignedToRunner
    | AlreadyProcessingMessage
    | MalformedMessage
    | PersistenceError
    | RunnerNotRegistered
    | RunnerUnavailable
    | SendTimeout
    | Suspended
    | RpcClientError
    | SerializationError
    | Interrupted
    | DeferredAlreadyCompleted
    | DeferredFailed
)

CLUSTER_ERRORS: tuple[type[ClusterError], ...] = (
    MailboxFull,
    EntityNotAssignedToRunner,
    AlreadyProcessingMessage,
    MalformedMessage,
    PersistenceError,
    RunnerNotRegistered,
    RunnerUnavailable,
    SendTimeout,
    Suspended,
    RpcClientError,
    SerializationError,
    Interrupted,
    DeferredAlreadyCompleted,
    DeferredFailed,
)
"""Every ClusterError class, for ``except CLUSTER_ERRORS`` narrowed to the reasons."""

ERROR_TYPES: dict[str, type[ClusterError]] = {cls.reason: cls for cls in CLUSTER_ERRORS}
"""Reason -> class, for rebuilding an error that crossed a process boundary."""
