"""One owned shard: a lease, a nursery, and the entities living in it.

The shard's nursery owns its entity tasks, so releasing the shard is
cancelling one scope: exactly that shard's entities stop, at once when
the lease is lost, or after draining their mailboxes on a graceful stop.

The shard is a failure boundary: whatever fails inside it (its storage
reads, its timers, a bug) ends this shard alone. It is FAILED, its lease
released, and the shard keeper acquires it again. Its lifecycle
(STARTING, SERVING, DRAINING, then RELEASED, LOST or FAILED) is the table in
:mod:`trio_cluster.core.lifecycle`.

Storage is read in order: the shard's own task scans on acquiring the
shard (and after missed notices), and the notice follower reads the
requests that notices announce, once each (a failed read becomes a rescan
by the shard itself, so the follower never waits out one shard's outage).
A request stored while a scan runs is set aside until the scan is done, so
nothing overtakes an older request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable

import trio

from ..core import reply as replies
from ..core.envelope import Envelope, entity_key
from ..core.hashing import shard_index
from ..core.lifecycle import SHARD_LIFECYCLE, Lifecycle, ShardEvent, ShardState
from ..core.retry import RetryPolicy
from ..errors import (
    ClusterError,
    EntityNotAssignedToRunner,
    MalformedMessage,
    PersistenceError,
    RunnerUnavailable,
)
from ..storage.base import Lease, StateWrite
from .context import EntityAddress
from .delivery import Delivery
from .interrupts import ShardInterrupts
from .mailbox import ActiveEntity
from .scheduled import Scheduled
from .services import Services

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
        "_helper_nursery",
        "_helpers",
        "_life",
        "_nursery",
        "_on_stopped",
        "_readers",
        "_reads_wanted",
        "_rescan",
        "_scanning",
        "_scheduled",
        "_scope",
        "_set_aside",
        "_stopped",
        "_timer_changed",
        "_timers_running",
        "entities",
        "interrupts",
        "lease",
        "services",
    )

    def __init__(
        self, services: Services, lease: Lease, on_stopped: Callable[[ShardRuntime], None]
    ) -> None:
        self.services = services
        self.lease = lease
        self._on_stopped = on_stopped
        self._life = Lifecycle(f"shard {lease.shard}", SHARD_LIFECYCLE, ShardState.STARTING)
        self.entities: dict[str, ActiveEntity] = {}
        self.interrupts = ShardInterrupts()
        """Its persisted requests withdrawn by their callers (through storage's notices)."""
        self._scope = trio.CancelScope()
        self._draining = trio.Event()
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._helpers = trio.CancelScope()
        # Ids completed while a storage read is outstanding (see _read).
        self._readers = 0
        self._done_while_reading: set[int] = set()
        # The first scan is due from birth: nothing may overtake it, even
        # before its task first runs.
        self._scanning = 1
        self._set_aside: list[int] = []
        self._rescan = False
        self._reads_wanted = trio.Event()
        self._scheduled = Scheduled(services.config.max_scheduled_per_shard)
        self._timer_changed = trio.Event()
        self._helper_nursery: trio.Nursery | None = None
        self._timers_running = False
        """The timers task runs only while requests are scheduled (see ``_run_timers``)."""

    def __repr__(self) -> str:
        return f"<shard {self.lease.shard} epoch {self.lease.epoch}: {self._life.state.value}>"

    @property
    def state(self) -> ShardState:
        return self._life.state

    @property
    def accepting(self) -> bool:
        return self._life.state is ShardState.SERVING

    @property
    def draining(self) -> bool:
        return self._life.state is ShardState.DRAINING

    # -- lifecycle --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until drained or lost; never raises but for cancellation from outside."""
        started = False
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self._life.state is ShardState.STARTING:
                        self._life.fire(ShardEvent.STARTED)
                    task_status.started()
                    started = True
                    if self.accepting:
                        nursery.start_soon(self._run_helpers)
                        await self._draining.wait()
                    self._helpers.cancel()
                    self._abandon_scheduled()
                    for entity in list(self.entities.values()):
                        entity.close()
        except* Exception as bug:
            log.exception("%s failed; releasing it to be taken again", self, exc_info=bug)
            self.services.hooks.contained_failure("shard", bug)
            self._life.fire(ShardEvent.FAIL)
        finally:
            if not started:  # a start() caller must not wait for ever
                task_status.started()
            self._abandon_scheduled()
            self._on_stopped(self)
            if self._life.state is not ShardState.LOST:
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                    try:
                        await self.services.release(self.lease)
                    except (ClusterError, OSError) as error:
                        log.warning("could not release %s, left to expire: %s", self, error)
                if self._life.state in (ShardState.STARTING, ShardState.SERVING):
                    self._life.fire(ShardEvent.DRAIN)  # stopped from outside, all at once
                if self._life.state is ShardState.DRAINING:
                    self._life.fire(ShardEvent.DRAINED)
            self._stopped.set()

    def lose(self) -> None:
        """The lease is gone: stop every entity now, without draining or releasing.

        The shard leaves the runner's maps at once, so a new lease for the
        same shard can start serving while this one's tasks unwind.
        """
        self._life.fire(ShardEvent.LOSE)
        self._scope.cancel()
        self._abandon_scheduled()
        for entity in list(self.entities.values()):
            self.forget(entity)
        self._on_stopped(self)

    async def stop(self, grace: float) -> None:
        """Drain gracefully for up to ``grace`` seconds, then cancel whatever still runs."""
        self._life.fire(ShardEvent.DRAIN)
        self._draining.set()
        with trio.move_on_after(grace):
            await self._stopped.wait()
        self._scope.cancel()
        await self._stopped.wait()

    # -- requests in --------------------------------------------------------------

    def offer(self, delivery: Delivery, *, scanned: bool = False) -> None:
        """Queue a request for its entity, now or at its ``deliver_at``.

        While a redelivery scan runs, a newly stored request must not
        overtake older ones the scan has yet to reach: it is set aside and
        delivered when the scan is done.
        """
        envelope = delivery.envelope
        if self._life.state is not ShardState.SERVING:
            raise EntityNotAssignedToRunner(
                f"shard {self.lease.shard} is {self._life.state.value} on {self.services.address}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        due = envelope.deliver_at_ms
        if due is not None and due > wall_clock_ms():
            self._scheduled.add(delivery, due)
            self._timer_changed.set()
            self._start_timers()
            return
        if self._scanning and envelope.persisted and not scanned:
            self._set_aside.append(envelope.request_id)
            return
        self.offer_now(delivery)

    def offer_now(self, delivery: Delivery) -> None:
        """Queue on the entity, activating it if needed, whatever ``deliver_at`` says."""
        envelope = delivery.envelope
        key = envelope.entity_key
        entity = self.entities.get(key)
        if entity is None:
            entity = self._activate(envelope, key)
        entity.offer(delivery)
        self.services.residency.touch(entity)

    async def deliver_stored(self, request_ids: list[int]) -> None:
        """Offer requests another runner stored for this shard, as its notice said.

        One read, in the caller's task (the notice follower): when storage
        fails it, the shard rescans in its own task instead, for as long as
        it takes, and the follower goes on to other notices.
        """
        if not self.accepting:
            return  # the shard's next owner finds them by its scan
        messages = self.services.messages
        try:
            found, _ = await self._read(
                functools.partial(messages.fetch, self.lease.shard, request_ids), retry=False
            )
        except PersistenceError as error:
            log.warning("reading announced requests of %s failed (%s); rescanning", self, error)
            self.rescan()
            return
        await self._offer_stored(found, scanned=False)

    def rescan(self) -> None:
        """Notices may have been missed: read every unprocessed request again."""
        self._rescan = True
        self._reads_wanted.set()

    def _activate(self, envelope: Envelope, key: str) -> ActiveEntity:
        services = self.services
        hosted = services.hosted.get(envelope.entity_type)
        if hosted is None:
            raise EntityNotAssignedToRunner(
                f"runner {services.address} hosts no entity type {envelope.entity_type!r}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        shard = self.lease.shard
        if shard_index(envelope.entity_id, services.config.shards_per_group) != shard.index:
            # Stored by a runner with another shard layout: served here it would
            # be a second copy of an entity that lives in another shard.
            raise MalformedMessage(
                f"{envelope.entity_key} does not belong to shard {shard} under "
                f"shards_per_group={services.config.shards_per_group}: do all runners "
                "use the same shard layout?",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        assert self._nursery is not None  # accepting implies the nursery is open
        entity = ActiveEntity(self, hosted, envelope.entity_id, key)
        services.residency.admit(entity)
        self.entities[key] = entity
        services.hooks.entity_activated(entity.address)
        # From the runner's base context, not the activating caller's.
        start = functools.partial(self._nursery.start_soon, entity.run, name=f"entity {key}")
        services.base_context.run(start)
        return entity

    def passivate(self, entity: ActiveEntity) -> None:
        """Unmap an idle entity and close its mailbox; its task then ends."""
        self.forget(entity)
        entity.close()

    def forget(self, entity: ActiveEntity) -> None:
        """Unmap an entity (passivated, stopped with its shard, or failed), once."""
        if self.entities.get(entity.key) is entity:
            del self.entities[entity.key]
            self.services.hooks.entity_passivated(entity.address)
        self.services.residency.forget(entity)

    # -- replies out ----------------------------------------------------------------

    async def complete(
        self, delivery: Delivery, reply: bytes, state: StateWrite | None = None
    ) -> bool:
        """Make a reply final: stored under this shard's lease if persisted (with the
        entity's ``state``, in one transaction), then delivered. False when it could
        not be stored: fenced off (the new owner answers), or storage stayed down (the
        request is redelivered when the shard is next acquired); ``state`` then was
        not written either."""
        envelope = delivery.envelope
        if envelope.persisted:
            stored = await self._fenced(
                "reply",
                f"the reply to {envelope.request_id}",
                functools.partial(
                    self.services.messages.save_reply,
                    envelope.request_id,
                    reply,
                    self.lease,
                    state,
                ),
            )
            if not stored:
                return False
        if self._readers:
            self._done_while_reading.add(envelope.request_id)
        delivery.target.resolve(reply)
        return True

    async def save_state(self, state: StateWrite) -> bool:
        """Write an entity's state on its own under this shard's lease; False when that
        failed (fenced off, or storage down for longer than ``send_retry``)."""
        return await self._fenced(
            "state",
            f"the state of {state.entity_type}/{state.entity_id}",
            functools.partial(self.services.states.save_state, self.lease, state),
        )

    # -- timers and deferreds -------------------------------------------------------

    async def arm_timer(self, name: str, envelope: Envelope) -> None:
        """Store a timer under this lease (replacing its name's, not yet due), then hold it.

        Storage errors reach the handler that armed it (a defect, retried
        by its policy); what was stored is the shard's to deliver, here or,
        should the shard move first, by its next owner's scan.
        """
        replaced = await self.services.timers.arm_timer(self.lease, name, envelope, wall_clock_ms())
        self._withdraw(replaced, envelope.entity_key)
        self.services.hooks.timer_changed(self._address_of(envelope), name, "armed")
        target = self.services.stored_replies.target(envelope.request_id)
        try:
            self.offer(Delivery(envelope, target))
        except ClusterError as error:
            log.debug("left timer %s in storage: %s", envelope.request_id, error)

    async def cancel_timer(self, entity: tuple[str, str], name: str) -> bool:
        """Delete the entity's timer ``name`` if not yet due, and drop what is held of it."""
        cancelled = await self.services.timers.cancel_timer(
            self.lease, entity, name, wall_clock_ms()
        )
        self._withdraw(cancelled, entity_key(*entity))
        if cancelled:
            address = EntityAddress(entity[0], entity[1], self.lease.shard)
            self.services.hooks.timer_changed(address, name, "cancelled")
        return bool(cancelled)

    def _withdraw(self, request_ids: list[int], key: str) -> None:
        """Forget requests storage deleted: held for their time, queued, or being read."""
        entity = self.entities.get(key)
        for request_id in request_ids:
            self._scheduled.discard(request_id)
            if self._readers:
                self._done_while_reading.add(request_id)
            if entity is not None:
                entity.withdraw(request_id)

    def _address_of(self, envelope: Envelope) -> EntityAddress:
        return EntityAddress(envelope.entity_type, envelope.entity_id, self.lease.shard)

    async def suspend(self, delivery: Delivery, name: str) -> bool | None:
        """Store the request as suspended on deferred ``name``, under this lease.

        True: suspended (nobody is answered); False: the deferred is completed
        already, run the request again; None: not stored (fenced off, or storage
        stayed down: the request stays unprocessed, to run again).
        """
        request_id = delivery.envelope.request_id
        parked = False

        async def write() -> None:
            nonlocal parked
            parked = await self.services.deferreds.suspend(request_id, name, self.lease)

        if not await self._fenced("suspension", f"the suspension of {request_id}", write):
            return None
        if parked and self._readers:
            self._done_while_reading.add(request_id)
        return parked

    async def deferred_result(self, request_id: int, name: str) -> bytes | None:
        """A deferred's stored outcome (storage errors reach the handler: a defect, retried)."""
        return await self.services.deferreds.deferred_result(request_id, name)

    async def load_state(self, entity_type: str, entity_id: str) -> bytes | None:
        """An entity's committed state, waiting out storage outages while the shard is ours."""
        delays = STORAGE_RECOVERY.delays()
        while True:
            try:
                return await self.services.states.load_state(entity_type, entity_id)
            except PersistenceError as error:
                log.warning(
                    "loading the state of %s/%s failed, retrying: %s", entity_type, entity_id, error
                )
                await trio.sleep(next(delays))

    async def _fenced(
        self, operation: str, what: str, write: Callable[[], Awaitable[None]]
    ) -> bool:
        """A write fenced by the lease, retrying storage outages; False when refused or given up."""
        delays = self.services.config.send_retry.delays()
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            while True:
                try:
                    await write()
                except EntityNotAssignedToRunner as refusal:
                    log.info("%s fenced off: %s is stale", what, self.lease)
                    outcome = refusal.reason
                    return False
                except PersistenceError as error:
                    delay = next(delays, None)
                    if delay is None:
                        # What is not stored is still unprocessed in storage: a rescan
                        # (which waits out the outage) offers it again, on this lease.
                        log.exception("could not store %s; rescanning %s", what, self)
                        self.rescan()
                        outcome = error.reason
                        return False
                    await trio.sleep(delay)
                else:
                    outcome = "success"
                    return True
        finally:
            self.services.hooks.storage_written(operation, time.perf_counter() - started, outcome)

    # -- storage reads ----------------------------------------------------------------

    async def _run_helpers(self) -> None:
        """Shard-level work that stops when draining starts, unlike entities.

        The storage scans run in this task itself, and the timers task only while
        requests are scheduled: an idle shard runs two tasks, not four, so fewer
        objects for Python's collector to go through when a runner holds thousands
        of shards (see docs/operations.md)."""
        with self._helpers:
            async with trio.open_nursery() as nursery:
                self._helper_nursery = nursery
                self._start_timers()  # for what was scheduled before the helpers began
                intervals = [
                    hosted.options.state_save_interval
                    for hosted in self.services.hosted.values()
                    if hosted.implementation.state is not None
                    and hosted.options.state_save == "interval"
                ]
                if intervals:
                    nursery.start_soon(self._flush_states, min(intervals))
                try:
                    await self._follow_storage()
                finally:
                    self._helper_nursery = None

    async def _flush_states(self, interval: float) -> None:
        """Ask idle entities with unsaved volatile changes to save them, every ``interval``.

        Only asks: each entity writes its own state, between its requests.
        """
        while True:
            await trio.sleep(interval)
            for entity in list(self.entities.values()):
                entity.nudge()

    async def _follow_storage(self) -> None:
        """The shard's own scans: the first one, then one per rescan asked for."""
        await self._redeliver()
        while True:
            await self._reads_wanted.wait()
            self._reads_wanted = trio.Event()
            if self._rescan:
                self._rescan = False
                self._scanning += 1
                await self._redeliver()

    async def _read(
        self,
        query: Callable[[], Awaitable[list[Envelope]]],
        limit: int | None = None,
        *,
        retry: bool = True,
    ) -> tuple[list[Envelope], int | None]:
        """Run a storage read; return what is still to do, and the next page's cursor.

        Storage reads are snapshots: a request read as unprocessed may
        complete before the read returns, so what completed meanwhile is
        filtered out, and redelivery never runs a handler twice. A storage
        outage is waited out for as long as the shard is ours: these
        requests are acknowledged, so giving up would strand them (unless
        the caller has another way to read them: ``retry=False``).
        """
        self._readers += 1
        try:
            delays = STORAGE_RECOVERY.delays()
            while True:
                try:
                    found = await query()
                    break
                except PersistenceError as error:
                    if not retry:
                        raise
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
        messages = self.services.messages
        found, cursor = await self._read(
            lambda: messages.unprocessed(
                self.lease.shard, entity=entity, due_by=wall_clock_ms(), limit=limit
            ),
            limit,
        )
        return found, cursor is not None

    async def _redeliver(self) -> None:
        """Offer everything unprocessed (``_scanning`` counts this scan, begun by the caller)."""
        messages = self.services.messages
        try:
            cursor: int | None = 0
            while cursor is not None and self.accepting:
                page, cursor = await self._read(
                    functools.partial(
                        messages.unprocessed, self.lease.shard, after=cursor, limit=REDELIVERY_PAGE
                    ),
                    REDELIVERY_PAGE,
                )
                await self._offer_stored(page, scanned=True, redelivered=True)
            # What arrived meanwhile is newer than all the scan found.
            while self._set_aside and self.accepting:
                request_ids, self._set_aside = self._set_aside, []
                found, _ = await self._read(
                    functools.partial(messages.fetch, self.lease.shard, request_ids)
                )
                await self._offer_stored(found, scanned=True)
        finally:
            self._scanning -= 1

    async def _offer_stored(
        self, envelopes: list[Envelope], *, scanned: bool, redelivered: bool = False
    ) -> None:
        stored = self.services.stored_replies
        # Those offered directly while the scan read them (set aside) are not read back:
        # without the scan they would have gone straight to the entity.
        direct = frozenset(self._set_aside) if redelivered else frozenset()
        for envelope in envelopes:
            target = stored.target(envelope.request_id)
            again = redelivered and envelope.request_id not in direct
            delivery = Delivery(envelope, target, redelivered=again)
            try:
                self.offer(delivery, scanned=scanned)
            except MalformedMessage as error:
                # It can never be served: make that its final reply, rather
                # than offer it again at every scan.
                await self.complete(delivery, replies.failure(error, envelope.request_id))
            except ClusterError as error:
                log.debug("left %s in storage: %s", envelope.request_id, error)

    # -- deliver_at -------------------------------------------------------------------

    def _start_timers(self) -> None:
        """Start the timers task if requests are scheduled and it is not running."""
        nursery = self._helper_nursery
        if nursery is None or self._timers_running or self._scheduled.next_due() is None:
            return
        self._timers_running = True
        nursery.start_soon(self._run_timers)

    async def _run_timers(self) -> None:
        """Offer scheduled requests at their time: one task and a heap, not a task each.

        It ends once nothing is scheduled; the next scheduled request starts it again
        (``_start_timers``): between the check and the end there is no checkpoint."""
        try:
            await self._offer_when_due()
        finally:
            self._timers_running = False

    async def _offer_when_due(self) -> None:
        while True:
            self._timer_changed = trio.Event()
            due = self._scheduled.next_due()
            if due is None:
                return
            with trio.move_on_after(max(0.0, (due - wall_clock_ms()) / 1000)):
                await self._timer_changed.wait()
                continue
            # The wait ran on Trio's clock (a mock one in tests): what it waited for is due.
            ready, overflowed = self._scheduled.pop_due(max(due, wall_clock_ms()))
            for delivery in ready:
                try:
                    self.offer_now(delivery)
                except ClusterError as error:
                    if delivery.envelope.persisted:
                        log.debug("left %s in storage: %s", delivery.envelope.request_id, error)
                    else:
                        delivery.fail(error)
            if overflowed:
                self.rescan()

    def _abandon_scheduled(self) -> None:
        """Persisted requests live on in storage; volatile ones fail now, not at their timeout."""
        for delivery in self._scheduled.clear():
            delivery.fail_if_volatile(
                RunnerUnavailable(
                    f"shard {self.lease.shard} stopped before the request was due",
                    entity_id=delivery.envelope.entity_id,
                )
            )
