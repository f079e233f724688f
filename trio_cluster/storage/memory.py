"""In-memory storage: the embedded default, and the storage of in-process test clusters.

It keeps every promise the PostgreSQL storage keeps within one process:
unique dedup keys, one final reply per request, fencing by lease epoch,
leases exclusive between runners that share it. What it cannot do is
survive the process. Each method checkpoints, so concurrent callers
interleave as they would against a real database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from itertools import count, islice

import attrs
import msgspec
import trio

from ..core.assignment import RunnerSpec
from ..core.envelope import Envelope
from ..core.hashing import ShardId
from ..errors import (
    DeferredAlreadyCompleted,
    EntityNotAssignedToRunner,
    MalformedMessage,
    PersistenceError,
    RunnerNotRegistered,
)
from .base import (
    NO_ORIGIN,
    ChunksAcked,
    ChunkStored,
    InterruptStored,
    Lease,
    MembershipChanged,
    Notice,
    Replied,
    Saved,
    StateWrite,
    Stored,
    Triage,
)
from .notices import Followers
from .retention import Retention, sweep_forever
from .status import ClusterStatus, RunnerStatus, shard_map


@attrs.define
class _Holder:
    machine_id: int
    epoch: int
    on_lost: Callable[[ShardId], None]


@attrs.define
class _Stored:
    envelope: Envelope
    stored_at: datetime
    reply: bytes | None = None
    timer: str | None = None
    """The timer name it was armed under, for a timer."""


class MemoryStorage:
    """The storage protocols over plain dicts.

    Set :attr:`available` to False to simulate an outage: every call then
    raises PersistenceError, as the PostgreSQL storage does when its server
    is unreachable. Processed requests are purged after ``retention`` as in
    PostgreSQL (see :mod:`.retention`), timed on Trio's clock; ``None`` keeps them.
    """

    def __init__(
        self,
        *,
        retention: Retention | None = Retention(),  # noqa: B008 - frozen, so shared safely
    ) -> None:
        self.available = True
        self._retention = retention
        self._machine_ids = count(1)
        self._live: dict[int, RunnerSpec] = {}
        self._registered_at: dict[int, datetime] = {}
        self._holders: dict[ShardId, _Holder] = {}
        self._epochs: dict[ShardId, int] = {}
        self._requests: dict[int, _Stored] = {}
        self._by_dedup_key: dict[str, int] = {}
        # Per shard, the ids of requests without a final reply, oldest first
        # (a dict is an ordered set).
        self._pending: dict[ShardId, dict[int, None]] = {}
        # Per shard, the ids of processed requests with their reply's Trio time,
        # oldest first: what retention deletes.
        self._replied: dict[ShardId, dict[int, float]] = {}
        self._states: dict[tuple[str, str], bytes] = {}
        # (request id, deferred name) -> its outcome, None while a request waits on it.
        self._deferreds: dict[tuple[int, str], bytes | None] = {}
        self._schedules: dict[str, int] = {}
        # Per persisted stream (request id): its chunks by index, and its caller's ack.
        self._chunks: dict[int, dict[int, bytes]] = {}
        self._acks: dict[int, int] = {}
        self._followers = Followers()

    @property
    def runners(self) -> MemoryStorage:
        return self

    @property
    def messages(self) -> MemoryStorage:
        return self

    @property
    def states(self) -> MemoryStorage:
        return self

    @property
    def timers(self) -> MemoryStorage:
        return self

    @property
    def deferreds(self) -> MemoryStorage:
        return self

    @property
    def schedules(self) -> MemoryStorage:
        return self

    @property
    def streams(self) -> MemoryStorage:
        return self

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self.available:
            raise PersistenceError("memory storage is marked unavailable")

    # -- runners and leases --------------------------------------------------

    async def live_runners(self) -> list[RunnerSpec]:
        await self._enter()
        return list(self._live.values())

    @asynccontextmanager
    async def session(
        self, spec: RunnerSpec, on_lease_lost: Callable[[ShardId], None]
    ) -> AsyncIterator[_MemorySession]:
        await self._enter()
        machine_id = next(self._machine_ids)
        self._live[machine_id] = spec
        self._registered_at[machine_id] = datetime.now(UTC)
        self._announce(MembershipChanged())
        try:
            async with trio.open_nursery() as nursery:
                if self._retention is not None:
                    held = partial(self._held_by, machine_id)
                    nursery.start_soon(sweep_forever, self._retention, held, self.purge)
                yield _MemorySession(self, machine_id, on_lease_lost)
                nursery.cancel_scope.cancel()
        finally:
            self._live.pop(machine_id, None)
            self._registered_at.pop(machine_id, None)
            for shard, holder in list(self._holders.items()):
                if holder.machine_id == machine_id:
                    del self._holders[shard]
            self._announce(MembershipChanged())

    def _held_by(self, machine_id: int) -> list[Lease]:
        return [
            Lease(shard, machine_id, holder.epoch)
            for shard, holder in self._holders.items()
            if holder.machine_id == machine_id
        ]

    def _announce(self, notice: Notice) -> None:
        self._followers.send(notice)

    def holder_of(self, shard: ShardId) -> int | None:
        """The machine id holding ``shard``, for tests and the shard map."""
        holder = self._holders.get(shard)
        return None if holder is None else holder.machine_id

    def revoke(self, shard: ShardId) -> None:
        """Take a lease away from its holder, as a dropped lock connection would.

        The holder is told through its ``on_lease_lost`` callback; writes
        under the old epoch are refused from now on.
        """
        holder = self._holders.pop(shard, None)
        if holder is not None:
            self._epochs[shard] = self._epochs.get(shard, 0) + 1
            holder.on_lost(shard)

    async def _acquire(
        self, machine_id: int, shards: Sequence[ShardId], on_lost: Callable[[ShardId], None]
    ) -> list[Lease]:
        await self._enter()
        if machine_id not in self._live:
            raise RunnerNotRegistered(f"runner {machine_id} is not registered")
        leases: list[Lease] = []
        for shard in shards:
            if shard in self._holders:  # by another, or by this runner until it releases it
                continue
            epoch = self._epochs.get(shard, 0) + 1
            self._epochs[shard] = epoch
            self._holders[shard] = _Holder(machine_id, epoch, on_lost)
            leases.append(Lease(shard, machine_id, epoch))
        return leases

    async def _leave(self, machine_id: int) -> None:
        await self._enter()
        if self._live.pop(machine_id, None) is not None:
            self._announce(MembershipChanged())

    async def _release(self, lease: Lease) -> None:
        await self._enter()
        holder = self._holders.get(lease.shard)
        if holder is not None and holder.epoch == lease.epoch:
            del self._holders[lease.shard]

    # -- messages ------------------------------------------------------------

    async def save_request(self, envelope: Envelope, origin: int, *, announce: bool) -> Saved:
        await self._enter()
        key = envelope.dedup_key
        if key is not None:
            original = self._by_dedup_key.get(key)
            if original is not None:
                return Saved(original, duplicate=True, reply=self._requests[original].reply)
            self._by_dedup_key[key] = envelope.request_id
        shard = self._store(envelope)
        if announce:
            self._announce(Stored(shard, envelope.request_id, origin))
        return Saved(envelope.request_id)

    def _store(self, envelope: Envelope, timer: str | None = None) -> ShardId:
        self._requests[envelope.request_id] = _Stored(envelope, datetime.now(UTC), timer=timer)
        shard = ShardId(envelope.shard_group, envelope.shard_index)
        self._pending.setdefault(shard, {})[envelope.request_id] = None
        return shard

    async def fetch(self, shard: ShardId, request_ids: Sequence[int]) -> list[Envelope]:
        await self._enter()
        pending = self._pending.get(shard, {})
        return [self._requests[i].envelope for i in sorted(request_ids) if i in pending]

    def _fence(self, lease: Lease, request_id: int | None = None) -> None:
        if self._epochs.get(lease.shard) != lease.epoch or lease.shard not in self._holders:
            raise EntityNotAssignedToRunner(
                f"lease epoch {lease.epoch} of shard {lease.shard} is stale",
                request_id=request_id,
            )

    async def save_reply(
        self, request_id: int, reply: bytes, lease: Lease, state: StateWrite | None = None
    ) -> None:
        await self._enter()
        self._fence(lease, request_id)
        stored = self._requests.get(request_id)
        if stored is None or stored.reply is not None:
            return
        stored.reply = reply
        if state is not None:
            self._write_state(state)
        self._pending.get(lease.shard, {}).pop(request_id, None)
        self._replied.setdefault(lease.shard, {})[request_id] = trio.current_time()
        self._announce(Replied(request_id, lease.machine_id, reply))

    async def interrupt(self, request_id: int, origin: int) -> bool:
        await self._enter()
        stored = self._requests.get(request_id)
        if stored is None or stored.reply is not None or stored.envelope.interrupted:
            return False
        envelope = stored.envelope = msgspec.structs.replace(stored.envelope, interrupted=True)
        shard = ShardId(envelope.shard_group, envelope.shard_index)
        self._announce(InterruptStored(shard, request_id, origin))
        return True

    async def purge(self, lease: Lease, window: float, limit: int) -> int:
        """Forget up to *limit* of the shard's requests replied over *window* seconds ago."""
        await self._enter()
        replied = self._replied.get(lease.shard, {})
        cutoff = trio.current_time() - window
        doomed = [i for i, at in islice(replied.items(), limit) if at <= cutoff]
        for request_id in doomed:
            del replied[request_id]
            stored = self._requests.pop(request_id)
            if stored.envelope.dedup_key is not None:
                self._by_dedup_key.pop(stored.envelope.dedup_key, None)
            for deferred in [d for d in self._deferreds if d[0] == request_id]:
                del self._deferreds[deferred]
            self._chunks.pop(request_id, None)
            self._acks.pop(request_id, None)
        return len(doomed)

    # -- persisted streams --------------------------------------------------------

    async def save_chunk(self, request_id: int, seq: int, chunk: bytes, lease: Lease) -> None:
        await self._enter()
        self._fence(lease, request_id)
        kept = self._chunks.setdefault(request_id, {}).setdefault(seq, chunk)
        self._announce(ChunkStored(request_id, seq, lease.machine_id, kept))

    async def chunks(self, request_id: int, start: int, limit: int) -> list[tuple[int, bytes]]:
        await self._enter()
        stored = self._chunks.get(request_id, {})
        return [(seq, stored[seq]) for seq in sorted(stored) if seq >= start][:limit]

    async def ack(self, request_id: int, acked: int, origin: int) -> None:
        await self._enter()
        # As in PostgreSQL, whose ack row references its request: none for an unknown one.
        if request_id in self._requests and acked > self._acks.get(request_id, 0):
            self._acks[request_id] = acked
            self._announce(ChunksAcked(request_id, acked, origin))

    async def acked(self, request_id: int) -> int:
        await self._enter()
        return self._acks.get(request_id, 0)

    # -- timers -------------------------------------------------------------------

    async def arm_timer(
        self, lease: Lease, name: str, envelope: Envelope, now_ms: int
    ) -> list[int]:
        await self._enter()
        self._fence(lease)
        replaced = self._drop_timer(
            lease.shard, envelope.entity_type, envelope.entity_id, name, now_ms
        )
        self._store(envelope, timer=name)
        return replaced

    async def cancel_timer(
        self, lease: Lease, entity: tuple[str, str], name: str, now_ms: int
    ) -> list[int]:
        await self._enter()
        self._fence(lease)
        return self._drop_timer(lease.shard, *entity, name, now_ms)

    def _drop_timer(
        self, shard: ShardId, entity_type: str, entity_id: str, name: str, now_ms: int
    ) -> list[int]:
        pending = self._pending.get(shard, {})
        doomed = []
        for request_id in pending:
            stored = self._requests[request_id]
            envelope = stored.envelope
            if (
                stored.timer == name
                and (envelope.entity_type, envelope.entity_id) == (entity_type, entity_id)
                and (envelope.deliver_at_ms or 0) > now_ms
            ):
                doomed.append(request_id)
        for request_id in doomed:
            del pending[request_id]
            del self._requests[request_id]
        return doomed

    # -- deferreds ------------------------------------------------------------------

    async def suspend(self, request_id: int, name: str, lease: Lease) -> bool:
        await self._enter()
        self._fence(lease, request_id)
        if self._deferreds.get((request_id, name)) is not None:
            return False
        self._deferreds[(request_id, name)] = None
        self._pending.get(lease.shard, {}).pop(request_id, None)
        return True

    async def complete_deferred(self, request_id: int, name: str, result: bytes) -> None:
        await self._enter()
        stored = self._requests.get(request_id)
        if stored is None:
            raise MalformedMessage(f"no stored request {request_id} has deferreds")
        if self._deferreds.get((request_id, name)) is not None:
            raise DeferredAlreadyCompleted(
                f"deferred {name!r} of request {request_id} is already completed",
                request_id=request_id,
            )
        self._deferreds[(request_id, name)] = result
        if stored.reply is None:
            envelope = stored.envelope
            shard = ShardId(envelope.shard_group, envelope.shard_index)
            pending = self._pending.setdefault(shard, {})
            if request_id not in pending:
                # Oldest first, as every scan expects.
                pending[request_id] = None
                self._pending[shard] = dict.fromkeys(sorted(pending))
            self._announce(Stored(shard, request_id, NO_ORIGIN))

    async def deferred_result(self, request_id: int, name: str) -> bytes | None:
        await self._enter()
        return self._deferreds.get((request_id, name))

    # -- entity state -----------------------------------------------------------

    def _write_state(self, state: StateWrite) -> None:
        key = (state.entity_type, state.entity_id)
        if state.data is None:
            self._states.pop(key, None)
        else:
            self._states[key] = state.data

    async def load_state(self, entity_type: str, entity_id: str) -> bytes | None:
        await self._enter()
        return self._states.get((entity_type, entity_id))

    async def save_state(self, lease: Lease, state: StateWrite) -> None:
        await self._enter()
        self._fence(lease)
        self._write_state(state)

    async def state_ids(self, entity_type: str, *, after: str = "", limit: int = 1000) -> list[str]:
        await self._enter()
        ids = sorted(i for t, i in self._states if t == entity_type and i > after)
        return ids[:limit]

    async def reply_for(self, request_id: int) -> bytes | None:
        await self._enter()
        stored = self._requests.get(request_id)
        return None if stored is None else stored.reply

    async def watch_reply(self, request_id: int) -> bytes | None:
        """Every follower here hears every reply already: nothing to mark."""
        return await self.reply_for(request_id)

    async def unprocessed(
        self,
        shard: ShardId,
        *,
        entity: tuple[str, str] | None = None,
        after: int = 0,
        due_by: int | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        await self._enter()
        found: list[Envelope] = []
        for request_id in self._pending.get(shard, {}):
            if request_id <= after:
                continue
            envelope = self._requests[request_id].envelope
            if due_by is not None and (envelope.deliver_at_ms or 0) > due_by:
                continue
            if entity is None or (envelope.entity_type, envelope.entity_id) == entity:
                found.append(envelope)
                if len(found) >= limit:
                    break
        return found

    # -- schedules --------------------------------------------------------------

    async def schedule_cursor(self, lease: Lease, name: str, start: int) -> int:
        await self._enter()
        self._fence(lease)
        return self._schedules.setdefault(name, start)

    async def advance_schedule(self, lease: Lease, name: str, instant: int) -> bool:
        await self._enter()
        self._fence(lease)
        if self._schedules.get(name, -1) >= instant:
            return False
        self._schedules[name] = instant
        return True

    # -- the status view --------------------------------------------------------

    async def read_status(self, *, shards_per_group: int | None = None) -> ClusterStatus:
        """Registered runners, held leases and pending requests, at this instant.

        A runner is alive while registered: within one process it has no other
        liveness to lose. Nothing beats here, so no runner has a heartbeat.
        """
        await self._enter()
        now = datetime.now(UTC)
        runners = tuple(
            RunnerStatus(
                machine_id=machine_id,
                address=spec.address,
                alive=True,
                weight=spec.weight,
                groups=tuple(sorted(spec.groups)),
                registered_at=self._registered_at.get(machine_id),
                heartbeat_at=None,
            )
            for machine_id, spec in sorted(self._live.items())
        )
        backlog = {
            shard: (len(ids), (now - self._requests[next(iter(ids))].stored_at).total_seconds())
            for shard, ids in self._pending.items()
            if ids
        }
        groups = shard_map(
            groups=(group for spec in self._live.values() for group in spec.groups),
            shards_per_group=shards_per_group,
            owners={shard: holder.machine_id for shard, holder in self._holders.items()},
            epochs=self._epochs,
            backlog=backlog,
        )
        return ClusterStatus(
            read_at=now, shards_per_group=shards_per_group, runners=runners, groups=groups
        )


@attrs.frozen
class _MemorySession:
    storage: MemoryStorage
    machine_id: int
    on_lost: Callable[[ShardId], None]

    async def acquire(self, shard: ShardId) -> Lease | None:
        leases = await self.acquire_many([shard])
        return leases[0] if leases else None

    async def acquire_many(self, shards: Sequence[ShardId]) -> list[Lease]:
        return await self.storage._acquire(self.machine_id, shards, self.on_lost)

    async def release(self, lease: Lease) -> None:
        await self.storage._release(lease)

    async def confirmed(self, shard: ShardId) -> None:
        """At once: a lease in memory is never in doubt (revoking it is immediate)."""

    async def leave(self) -> None:
        await self.storage._leave(self.machine_id)

    def notices(
        self, triage: Triage | None = None
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Notice]]:
        return self.storage._followers.follow(triage)
