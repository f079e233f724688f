"""What the runtime needs from storage, as small protocols.

Who owns which shard (:class:`RunnerStorage`), which persisted requests
and replies exist (:class:`MessageStorage`), what state entities keep
(:class:`StateStorage`), and the two durable building blocks made of
persisted requests: entity timers (:class:`TimerStorage`) and deferreds
that suspended requests wait on (:class:`DeferredStorage`). They meet in
one place, fencing: a reply, and an entity's state, are written only with
the lease under which the entity ran, and storage refuses a lease that is
no longer the shard's current one.
A persisted request's reply and the state it left are written together, in
one transaction: both or neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs
import trio

from ..core.assignment import RunnerSpec
from ..core.envelope import Envelope
from ..core.hashing import ShardId
from .status import ClusterStatus


@attrs.frozen
class Lease:
    """The right to run a shard's entities, valid while ``epoch`` is the shard's current one.

    The epoch is the fencing token: it only grows, so a writer holding an
    old lease can always be told apart from the current owner.
    """

    shard: ShardId
    machine_id: int
    epoch: int


Triage = Callable[["Notice"], bool]
"""A follower's first look at a notice, in the task that received it: True when it
dealt with the notice there and then (nothing to wait for), so the notice is not
queued. It must not block; an exception it raises is logged and the notice queued.
Most notices concern another runner, or resolve a waiting caller: dealt with
where they arrive, they wake no follower task."""

NO_ORIGIN = -1
"""The ``origin`` of a notice no runner sent itself (a completed deferred woke a request):
every runner acts on it, the one that caused it included."""


@attrs.frozen
class Stored:
    """A notice that ``origin`` stored a request for ``shard``: its owner should fetch it."""

    shard: ShardId
    request_id: int
    origin: int


@attrs.frozen
class Replied:
    """A notice that ``origin`` stored a final reply to ``request_id``.

    Callers waiting on another runner (or on a duplicate's original) learn
    of their reply this way, with no socket between them; ``origin`` has
    already answered its own callers. The notice carries the ``reply`` when
    it fits (None: read it from storage).
    """

    request_id: int
    origin: int
    reply: bytes | None = None


@attrs.frozen
class InterruptStored:
    """A notice that ``origin`` marked request ``request_id`` of ``shard`` interrupted:
    its caller withdrew it, so the shard's owner cancels its handler if one runs it."""

    shard: ShardId
    request_id: int
    origin: int


@attrs.frozen
class ChunkStored:
    """A notice that the owner of a persisted stream stored its chunk ``seq``.

    Carries the ``chunk`` when it fits (None: read it from storage); its
    caller takes it from here, or reads from storage after a missed notice.
    """

    request_id: int
    seq: int
    origin: int
    chunk: bytes | None = None


@attrs.frozen
class ChunksAcked:
    """A notice that the caller of a persisted stream consumed its chunks below ``acked``:
    the owner, waiting for room in the window, looks again."""

    request_id: int
    acked: int
    origin: int


@attrs.frozen
class MembershipChanged:
    """A runner registered or unregistered: owners recompute the assignment now.

    A runner that dies without unregistering sends no notice itself: the
    runner watching it announces the death (in PostgreSQL, see
    ``trio_cluster.postgres.watcher``), and a slow safety poll covers the rest.
    """


@attrs.frozen
class Gap:
    """Notices may have been missed (a listener reconnected, a buffer overflowed).

    The owner rescans its shards, so a missed notice delays a request but
    never strands it.
    """


Notice = Stored | Replied | InterruptStored | ChunkStored | ChunksAcked | MembershipChanged | Gap


@attrs.frozen
class StateWrite:
    """An entity's new state (encoded ``data``), or its deletion (``data is None``)."""

    entity_type: str
    entity_id: str
    data: bytes | None


@attrs.frozen
class Saved:
    """What saving a request found.

    ``request_id`` is the stored request's id: the new one, or, for a
    duplicate primary key, the original's, whose reply the caller should
    wait for. ``reply`` is the original's final reply when it already has one.
    """

    request_id: int
    duplicate: bool = False
    reply: bytes | None = None


class LeaseSession(Protocol):
    """A runner's registration and the leases it holds, open while the runner runs.

    Closing the session unregisters the runner and releases every lease.
    """

    @property
    def machine_id(self) -> int:
        """Unique among live runners; the Snowflake machine id."""
        ...

    async def acquire(self, shard: ShardId) -> Lease | None:
        """Take the shard's lease, or return None when another runner holds it."""
        ...

    async def acquire_many(self, shards: Sequence[ShardId]) -> list[Lease]:
        """Take the leases of those of ``shards`` no other runner holds, in few round
        trips (a runner joining, or taking over from a dead one, takes hundreds)."""
        ...

    async def release(self, lease: Lease) -> None: ...

    async def confirmed(self, shard: ShardId) -> None:
        """Return once ``shard``'s lease is surely still held, or is not held at all.

        Called before every handler starts (the hot path: return at once when
        nothing is in doubt). A runner that was frozen (SIGSTOP, a stalled VM)
        cannot know whether it still holds its leases until storage answers
        it again; starting the handlers already queued meanwhile would run
        them beside the shard's new owner. This waits for that answer, and
        never longer: a lease found lost returns too, and the loss itself
        stops the shard's entities.
        """
        ...

    async def leave(self) -> None:
        """Stop being assigned shards (leases stay until released): the start of a handoff."""
        ...

    def notices(
        self, triage: Triage | None = None
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Notice]]:
        """Follow what the runners store, for as long as the ``async with`` lasts.

        Notices come with the session, not the message storage: PostgreSQL
        delivers them on the lock connection, so a runner's notices live and
        die with its registration and cost no connection of their own. The
        channel is bounded: a follower that falls behind gets a :class:`Gap`
        instead of unbounded memory, and so does one whose session reconnected.
        ``triage``, when given, sees each notice first, as it arrives (see
        `Triage`); only those it leaves come through the channel.
        """
        ...


class RunnerStorage(Protocol):
    async def live_runners(self) -> list[RunnerSpec]:
        """The runners registered now, whose sessions are alive: the input of assignment."""
        ...

    def session(
        self, spec: RunnerSpec, on_lease_lost: Callable[[ShardId], None]
    ) -> AbstractAsyncContextManager[LeaseSession]:
        """Register a runner for the duration of an ``async with``.

        ``on_lease_lost`` is called, synchronously and at most once per
        lease, when storage learns a held lease is gone (its connection
        dropped, say), so the runner can stop that shard's entities at once.
        """
        ...


class MessageStorage(Protocol):
    async def save_request(self, envelope: Envelope, origin: int, *, announce: bool) -> Saved:
        """Store a persisted request before anything delivers it, and notify its owner.

        A request whose dedup key is already stored is not stored again.
        ``origin`` is the storing runner's machine id, so that runner can
        ignore its own notice. Without ``announce`` no notice is sent: the
        storing runner owns the shard and offers the request itself (should
        the shard move meanwhile, its next owner's redelivery scan finds it).
        """
        ...

    async def fetch(self, shard: ShardId, request_ids: Sequence[int]) -> list[Envelope]:
        """Those of ``request_ids`` that are still unprocessed, oldest first."""
        ...

    async def save_reply(
        self, request_id: int, reply: bytes, lease: Lease, state: StateWrite | None = None
    ) -> None:
        """Store the final reply and mark the request processed, fenced by ``lease``.

        With ``state``, the entity's state is written (or deleted) in the same
        transaction, and only if the reply is: a request's effect on its
        entity's state is committed exactly when its reply is.

        Raises EntityNotAssignedToRunner when ``lease`` is no longer the
        shard's current lease; the current owner will process the request.
        A second final reply for one request is ignored, with its state: the
        first one stands.
        """
        ...

    async def reply_for(self, request_id: int) -> bytes | None: ...

    async def watch_reply(self, request_id: int) -> bytes | None:
        """``reply_for`` another runner's request (a duplicate's original), whose
        reply's notice this runner must then hear as well: a storage may announce a
        reply to its caller alone until asked this."""
        ...

    async def interrupt(self, request_id: int, origin: int) -> bool:
        """Mark an unprocessed request interrupted (its caller withdrew it) and notify
        its shard's owner; False when it has a final reply already, or is marked.

        Anyone may mark a request, unfenced: the mark only asks. The owner
        answers the request ``Interrupted`` (fenced, as any reply), and every
        later read returns it with ``interrupted`` set, so a redelivery
        answers it so too, without running it.
        """
        ...

    async def unprocessed(
        self,
        shard: ShardId,
        *,
        entity: tuple[str, str] | None = None,
        after: int = 0,
        due_by: int | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        """Requests of the shard (or of one ``(entity_type, entity_id)``) without a final reply.

        Oldest first, so redelivery keeps each entity's order; ``after`` is
        the last request id of the previous page; with ``due_by`` (Unix ms),
        only requests whose ``deliver_at`` has come.
        """
        ...


class StateStorage(Protocol):
    async def load_state(self, entity_type: str, entity_id: str) -> bytes | None:
        """The entity's last committed state, or None when it has none."""
        ...

    async def save_state(self, lease: Lease, state: StateWrite) -> None:
        """Write (or delete) an entity's state on its own, fenced by its shard's ``lease``.

        Raises EntityNotAssignedToRunner when ``lease`` is no longer current.
        """
        ...

    async def state_ids(self, entity_type: str, *, after: str = "", limit: int = 1000) -> list[str]:
        """Ids of entities of ``entity_type`` with stored state, in order, after ``after``."""
        ...


class TimerStorage(Protocol):
    """An entity's named timers: persisted requests to itself, with a ``deliver_at``.

    A timer is known by ``(entity_type, entity_id, name)`` while it is not
    yet due; once due it is an ordinary unprocessed request, delivered and
    answered like any other (re-arming its name then arms a new timer beside it).
    """

    async def arm_timer(
        self, lease: Lease, name: str, envelope: Envelope, now_ms: int
    ) -> list[int]:
        """Store ``envelope`` as the timer ``name`` of its entity, fenced by ``lease``.

        A timer of that name not yet due at ``now_ms`` (Unix ms) is deleted in
        the same transaction; its request id is returned, for the runtime to
        drop what it holds of it. No notice is sent: the caller owns the shard.
        Raises EntityNotAssignedToRunner when ``lease`` is no longer current.
        """
        ...

    async def cancel_timer(
        self, lease: Lease, entity: tuple[str, str], name: str, now_ms: int
    ) -> list[int]:
        """Delete the entity's timer ``name`` if not yet due at ``now_ms``; its request id."""
        ...


class DeferredStorage(Protocol):
    """Deferreds: values a suspended persisted request waits on, named within that request.

    A suspended request is stored as processed with no reply: no scan
    offers it, no caller is answered, retention keeps it. Completing one
    of its deferreds stores the value and makes the request unprocessed
    again, announcing it to its shard's owner (a :class:`Stored` notice from
    no runner, ``origin`` -1), in one transaction.
    """

    async def suspend(self, request_id: int, name: str, lease: Lease) -> bool:
        """Park the unprocessed request on its deferred ``name``, fenced by ``lease``.

        False when that deferred is already completed: nothing is parked, and
        the request should run again now. Raises EntityNotAssignedToRunner
        when ``lease`` is no longer current.
        """
        ...

    async def complete_deferred(self, request_id: int, name: str, result: bytes) -> None:
        """Store ``result`` (an encoded reply: a value or a failure) as the deferred's outcome.

        Raises DeferredAlreadyCompleted when it has one already (the first
        stands), MalformedMessage when no such request is stored.
        """
        ...

    async def deferred_result(self, request_id: int, name: str) -> bytes | None:
        """The deferred's stored outcome, or None while it has none."""
        ...


class ScheduleStorage(Protocol):
    """Where each schedule stands: its last settled instant (Unix ms), one row per schedule.

    Kept in a row of its own, not derived from the dedup keys of the
    requests a schedule stored: those are deleted with their requests after
    the retention window, and a function target stores no request at all.
    Both writes are fenced by the lease of the schedule's singleton, as
    replies are, so a holder that lost its lease cannot move a schedule.
    """

    async def schedule_cursor(self, lease: Lease, name: str, start: int) -> int:
        """The schedule's last settled instant; the first time, ``start`` is stored and
        returned (a new schedule begins from now, it does not catch up on the past).

        Raises EntityNotAssignedToRunner when ``lease`` is no longer current.
        """
        ...

    async def advance_schedule(self, lease: Lease, name: str, instant: int) -> bool:
        """Record that the schedule fired ``instant``, if it is later than the stored one.

        False when it is not (the instant was settled before): the caller must
        not fire it. Raises EntityNotAssignedToRunner when ``lease`` is stale.
        """
        ...


class StreamStorage(Protocol):
    """The chunks of persisted streams, and how far each stream's caller consumed them.

    A persisted stream is a persisted request whose handler yields chunks:
    its owner stores each one, numbered from 0, fenced by its shard's lease
    as a reply is; its caller reads them and records what it consumed (the
    ack), so a new owner after a crash or a shard move resumes from there.
    Its stored reply ends the stream, after every chunk. Retention deletes
    chunks and ack with their request.
    """

    async def save_chunk(self, request_id: int, seq: int, chunk: bytes, lease: Lease) -> None:
        """Store chunk ``seq`` of the stream and notify its caller, fenced by ``lease``.

        A chunk stored twice (a new owner produced it again) keeps its first
        copy. Raises EntityNotAssignedToRunner when ``lease`` is stale.
        """
        ...

    async def chunks(self, request_id: int, start: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` stored chunks of the stream from index ``start``, in order."""
        ...

    async def ack(self, request_id: int, acked: int, origin: int) -> None:
        """Record that the caller consumed every chunk below ``acked`` and notify the owner;
        an ack below the stored one changes nothing (it only moves forward)."""
        ...

    async def acked(self, request_id: int) -> int:
        """How many chunks the caller consumed (0 when it acknowledged none)."""
        ...


class StatusStorage(Protocol):
    """What the status view reads; the runtime itself never needs it.

    Apart from :class:`Storage` so a storage written for the runtime alone
    still type-checks as one.
    """

    async def read_status(self, *, shards_per_group: int | None = None) -> ClusterStatus:
        """A snapshot of runners, shard leases and backlog, read without taking any lock.

        Given ``shards_per_group`` (the cluster's layout, which storage does
        not keep), every shard of every known group is listed, unowned ones
        included; without it, the shards storage knows of.
        """
        ...


class Storage(Protocol):
    @property
    def runners(self) -> RunnerStorage: ...

    @property
    def messages(self) -> MessageStorage: ...

    @property
    def states(self) -> StateStorage: ...

    @property
    def timers(self) -> TimerStorage: ...

    @property
    def deferreds(self) -> DeferredStorage: ...

    @property
    def schedules(self) -> ScheduleStorage: ...

    @property
    def streams(self) -> StreamStorage: ...
