"""One owned shard: a lease, a nursery, and the entities living in it.

The shard's nursery owns its entity tasks, so releasing the shard is
cancelling one scope: exactly that shard's entities stop, at once when
the lease is lost, or after draining their mailboxes on a graceful stop.
"""

from __future__ import annotations

import functools
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ..core.envelope import Envelope
from ..core.retry import RetryPolicy
from ..errors import ClusterError, EntityNotAssignedToRunner, PersistenceError, RunnerUnavailable
from ..storage.base import Lease, MessageStorage
from .mailbox import ActiveEntity

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("trio_cluster.shard")

REDELIVERY_PAGE = 1000
STORAGE_RECOVERY = RetryPolicy(
    base_delay=0.05, max_delay=2.0, max_attempts=2**62, max_elapsed=float(2**62)
)
"""Backoff for reads that must eventually succeed: capped, and never giving up."""
RELEASE_TIMEOUT = 5.0
"""Bound on releasing a lease: a storage that does not answer must not hold up shutdown."""


def wall_clock_ms() -> int:
    """``deliver_at`` is wall-clock time, shared with other processes and storage."""
    return time.time_ns() // 1_000_000


class ShardRuntime:
    __slots__ = (
        "_done_while_reading",
        "_draining",
        "_helpers",
        "_nursery",
        "_readers",
        "_scanning",
        "_scheduled",
        "_scope",
        "_set_aside",
        "_stopped",
        "_timer_changed",
        "_timers",
        "accepting",
        "entities",
        "lease",
        "lost",
        "runner",
    )

    def __init__(self, runner: Runner, lease: Lease) -> None:
        self.runner = runner
        self.lease = lease
        self.entities: dict[str, ActiveEntity] = {}
        self.accepting = False
        self.lost = False
        self._scope = trio.CancelScope()
        self._draining = trio.Event()
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Ids completed while a storage read is outstanding (see _read).
        self._readers = 0
        # The first scan is due from birth: nothing may overtake it, even
        # before its task first runs.
        self._scanning = 1
        self._set_aside: list[int] = []
        self._done_while_reading: set[int] = set()
        # Requests whose deliver_at is still ahead, soonest first.
        self._timers: list[tuple[int, int, Envelope]] = []
        self._scheduled: set[int] = set()
        self._timer_changed = trio.Event()
        self._helpers = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.accepting = True
                    task_status.started()
                    nursery.start_soon(self._run_helpers)
                    await self._draining.wait()
                    self.accepting = False
                    self._helpers.cancel()
                    self._abandon_timers()
                    for entity in list(self.entities.values()):
                        entity.close()
        finally:
            self.accepting = False
            self.runner.shard_stopped(self)
            if not self.lost:
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                    try:
                        await self.runner.session.release(self.lease)
                    except ClusterError:
                        log.warning("could not release %s; it expires with the session", self.lease)
            self._stopped.set()

    def offer(self, envelope: Envelope, *, scanned: bool = False) -> None:
        """Queue a request for its entity, now or at its ``deliver_at``.

        While a redelivery scan runs, a newly stored request must not
        overtake older ones the scan has yet to reach: it is set aside and
        delivered when the scan is done.
        """
        if not self.accepting:
            raise EntityNotAssignedToRunner(
                f"shard {self.lease.shard} is stopping on {self.runner.address}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        due = envelope.deliver_at_ms
        if due is not None and due > wall_clock_ms():
            self._schedule(envelope, due)
            return
        if self._scanning and envelope.persisted and not scanned:
            self._set_aside.append(envelope.request_id)
            return
        self.offer_now(envelope)

    def offer_now(self, envelope: Envelope) -> None:
        """Queue on the entity, activating it if needed, whatever ``deliver_at`` says."""
        key = envelope.entity_key
        entity = self.entities.get(key)
        if entity is None:
            entity = self._activate(envelope, key)
        entity.offer(envelope)
        self.runner.touch(entity)

    async def _run_helpers(self) -> None:
        """Shard-level work that stops when draining starts, unlike entities."""
        with self._helpers:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(self.redeliver, first=True))
                nursery.start_soon(self._run_timers)

    def _abandon_timers(self) -> None:
        """Persisted timers live on in storage; volatile ones fail now, not at their timeout."""
        for _, request_id, envelope in self._timers:
            if not envelope.persisted:
                self.runner.replies.fail(
                    request_id,
                    RunnerUnavailable(
                        f"shard {self.lease.shard} stopped before the request was due",
                        entity_id=envelope.entity_id,
                    ),
                )
        self._timers.clear()
        self._scheduled.clear()

    def _schedule(self, envelope: Envelope, due: int) -> None:
        if envelope.request_id in self._scheduled:
            return
        self._scheduled.add(envelope.request_id)
        heapq.heappush(self._timers, (due, envelope.request_id, envelope))
        self._timer_changed.set()

    async def _run_timers(self) -> None:
        """Offer scheduled requests at their time: one task and a heap, not a task each."""
        while True:
            self._timer_changed = trio.Event()
            if not self._timers:
                await self._timer_changed.wait()
                continue
            due = self._timers[0][0]
            with trio.move_on_after(max(0.0, (due - wall_clock_ms()) / 1000)):
                await self._timer_changed.wait()
                continue
            _, request_id, envelope = heapq.heappop(self._timers)
            self._scheduled.discard(request_id)
            try:
                self.offer_now(envelope)
            except ClusterError as error:
                if envelope.persisted:
                    log.debug("left %s in storage: %s", request_id, error)
                else:
                    self.runner.replies.fail(request_id, error)

    def _activate(self, envelope: Envelope, key: str) -> ActiveEntity:
        runner = self.runner
        hosted = runner.hosted.get(envelope.entity_type)
        if hosted is None:
            raise EntityNotAssignedToRunner(
                f"runner {runner.address} hosts no entity type {envelope.entity_type!r}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        assert self._nursery is not None
        runner.make_room()
        implementation, options = hosted
        entity = ActiveEntity(self, implementation, options, envelope.entity_id, key)
        self.entities[key] = entity
        runner.resident[key] = entity
        runner.metrics.activations += 1
        self._nursery.start_soon(entity.run, name=f"entity {key}")
        return entity

    def passivate(self, entity: ActiveEntity) -> None:
        """Unmap an idle entity and close its mailbox; its task then ends."""
        self.forget(entity)
        entity.close()
        self.runner.metrics.passivations += 1

    def forget(self, entity: ActiveEntity) -> None:
        if self.entities.get(entity.key) is entity:
            del self.entities[entity.key]
            del self.runner.resident[entity.key]

    async def complete(self, envelope: Envelope, reply: bytes) -> None:
        """Make a reply final: stored under this shard's lease if persisted, then delivered."""
        if envelope.persisted and not await self.runner.store_reply(envelope, reply, self.lease):
            return
        if self._readers:
            self._done_while_reading.add(envelope.request_id)
        self.runner.metrics.processed += 1
        self.runner.replies.resolve(envelope.request_id, reply)

    async def _read(
        self, query: Callable[[], Awaitable[list[Envelope]]], limit: int | None = None
    ) -> tuple[list[Envelope], int | None]:
        """Run a storage read; return what is still to do, and the next page's cursor.

        Storage reads are snapshots: a request read as unprocessed may
        complete before the read returns, so what completed meanwhile is
        filtered out, and redelivery never runs a handler twice. A storage
        outage is waited out for as long as the shard is ours: these
        requests are acknowledged, so giving up would strand them.
        """
        self._readers += 1
        try:
            delays = STORAGE_RECOVERY.delays()
            while True:
                try:
                    found = await query()
                    break
                except PersistenceError as error:
                    log.warning("reading %s failed, retrying: %s", self.lease.shard, error)
                    await trio.sleep(next(delays))
            cursor = found[-1].request_id if limit is not None and len(found) >= limit else None
            done = self._done_while_reading
            return [e for e in found if e.request_id not in done], cursor
        finally:
            self._readers -= 1
            if not self._readers:
                self._done_while_reading.clear()

    async def read_backlog(
        self, entity: tuple[str, str], limit: int
    ) -> tuple[list[Envelope], bool]:
        """An entity's due, unprocessed requests, oldest first, and whether more remain."""
        messages = self.runner.storage.messages
        found, cursor = await self._read(
            lambda: messages.unprocessed(
                self.lease.shard, entity=entity, due_by=wall_clock_ms(), limit=limit
            ),
            limit,
        )
        return found, cursor is not None

    async def deliver_stored(self, request_ids: Sequence[int]) -> None:
        """Offer requests another runner stored for this shard, as its notice said."""
        messages = self.runner.storage.messages
        found, _ = await self._read(lambda: messages.fetch(self.lease.shard, request_ids))
        self._offer_all(found, scanned=False)

    async def redeliver(self, *, first: bool = False) -> None:
        """Offer everything unprocessed: on acquiring the shard, and after missed notices."""
        messages = self.runner.storage.messages
        cursor: int | None = 0
        if not first:
            self._scanning += 1
        try:
            await self._scan(messages, cursor)
            # What arrived meanwhile is newer than all the scan found.
            while self._set_aside and self.accepting:
                request_ids, self._set_aside = self._set_aside, []
                found, _ = await self._read(
                    functools.partial(messages.fetch, self.lease.shard, request_ids)
                )
                self._offer_all(found, scanned=True)
        finally:
            self._scanning -= 1

    async def _scan(self, messages: MessageStorage, cursor: int | None) -> None:
        while cursor is not None and self.accepting:
            page, cursor = await self._read(
                functools.partial(
                    messages.unprocessed, self.lease.shard, after=cursor, limit=REDELIVERY_PAGE
                ),
                REDELIVERY_PAGE,
            )
            self._offer_all(page, scanned=True)

    def _offer_all(self, envelopes: list[Envelope], *, scanned: bool) -> None:
        for envelope in envelopes:
            try:
                self.offer(envelope, scanned=scanned)
            except ClusterError as error:
                log.debug("left %s in storage: %s", envelope.request_id, error)

    def lose(self) -> None:
        """The lease is gone: stop every entity now, without draining or releasing.

        The shard leaves the runner's maps at once, so a new lease for the
        same shard can start serving while this one's tasks unwind.
        """
        self.lost = True
        self.accepting = False
        self._scope.cancel()
        self._abandon_timers()
        self.runner.shard_stopped(self)

    async def stop(self, grace: float) -> None:
        """Drain gracefully for up to ``grace`` seconds, then cancel whatever still runs."""
        self._draining.set()
        with trio.move_on_after(grace):
            await self._stopped.wait()
        self._scope.cancel()
        await self._stopped.wait()
