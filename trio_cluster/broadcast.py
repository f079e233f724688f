"""Broadcast: one message to every live runner, or to every entity of a type.

Two kinds of broadcast, each a method of :class:`~trio_cluster.Runner`:

- ``runner.broadcast_runners(rpc, payload)``: a *runner message* to every
  live runner. A runner message is a volatile :class:`~trio_cluster.Rpc`
  (of an entity type you declare for the purpose) that each runner handles
  with a function registered as ``open_runner(...,
  runner_handlers=[RunnerHandler(rpc, function)])``, not with an entity:
  configuration reloads, cache flushes, "what do you hold" questions.
- ``runner.broadcast(rpc, payload, to=RESIDENT | STORED)``: the RPC to every
  entity of its type that is resident on some runner (asked of each live
  runner), or that has stored state (listed from storage, page by page).
  A volatile RPC is delivered best effort (at most once each); a persisted
  one at least once per entity, under one primary key per broadcast
  (``broadcast_key(broadcast_id)``), so running the same broadcast again
  after a crash delivers nothing twice.

Either way the caller gets one :class:`BroadcastOutcome` per target, within one
deadline and with bounded concurrency. The exact semantics are in
docs/concepts.md (Broadcast).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, Literal, TypeVar

import attrs

from .core.reserved import RESERVED_PREFIX
from .entity import Rpc
from .errors import ClusterError

__all__ = [
    "RESIDENT",
    "STORED",
    "Audience",
    "BroadcastOutcome",
    "BroadcastResult",
    "RunnerHandler",
    "broadcast_key",
]

S = TypeVar("S")
P = TypeVar("P")
T_co = TypeVar("T_co", covariant=True)

Audience = Literal["resident", "stored"]
RESIDENT: Audience = "resident"
"""Every entity of the type resident on a live runner when that runner is asked."""
STORED: Audience = "stored"
"""Every entity of the type with stored state when its page of ids is read."""

BROADCAST_KEY_PREFIX = "broadcast:"


def broadcast_key(broadcast_id: str) -> str:
    """The primary key each entity's request of a persisted broadcast is stored under."""
    return BROADCAST_KEY_PREFIX + broadcast_id


def _runner_rpc(_instance: object, _attribute: object, rpc: Rpc[Any, Any]) -> None:
    if not isinstance(rpc, Rpc):
        raise TypeError(f"RunnerHandler takes an Rpc (got {rpc!r})")
    if rpc.persisted:
        raise ValueError(f"{rpc!r}: a runner message is volatile (runners have no storage queue)")
    if rpc.entity.name.startswith(RESERVED_PREFIX):
        raise ValueError(f"{rpc!r}: entity names starting with {RESERVED_PREFIX!r} are reserved")


@attrs.frozen
class RunnerHandler(Generic[P, S]):
    """``function(payload)`` answers the runner message ``rpc`` on this runner.

    Its declared errors reach the caller as themselves; any other exception
    is the caller's ``RpcClientError`` (the runner goes on). Runner messages
    are handled concurrently, at most ``MAX_RUNNER_CALLS`` at once per
    runner; more are refused with ``MailboxFull``.
    """

    rpc: Rpc[P, S] = attrs.field(validator=_runner_rpc)
    function: Callable[[P], Awaitable[S]]


@attrs.frozen
class BroadcastOutcome(Generic[T_co]):
    """What one target of a broadcast answered: a ``value``, or an ``error``.

    ``error`` is the RPC's declared error or a ``ClusterError`` (``SendTimeout``
    when the broadcast's deadline passed first).
    """

    value: T_co | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T_co:
        """The value, or the error raised."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@attrs.frozen
class BroadcastResult(Generic[T_co]):
    """The outcome of a broadcast: per target (an entity id, or a runner's address).

    ``unlisted`` names the runners that could not say which entities they
    hold (a resident broadcast): their entities were not reached. When an
    ``on_outcome`` callback was given, ``outcomes`` is empty and only the
    counts are kept.
    """

    broadcast_id: str
    outcomes: Mapping[str, BroadcastOutcome[T_co]]
    delivered: int
    failed: int
    unlisted: Mapping[str, ClusterError] = attrs.field(factory=dict)

    @property
    def complete(self) -> bool:
        """Every target answered with a value, and every runner was listed."""
        return self.failed == 0 and not self.unlisted
