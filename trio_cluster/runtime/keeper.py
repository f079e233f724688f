"""Shard keeping: own exactly the shards the assignment gives this runner.

The keeper is the one writer of the routing table. It reads the live runners,
computes the assignment (the same pure function on every runner), hands off
shards assigned elsewhere (drained, then released) and acquires the ones
assigned here as soon as their previous owner lets go. It runs again on a
membership notice (storage announces joins, leaves and deaths), after
notices may have been missed (a ``Gap``), on a lost lease, a lost link to
an owner, and every ``membership_poll_interval``: the safety poll, for a
change nobody announced.

Singletons are kept the same way: each is the one shard of a reserved group
(see :mod:`trio_cluster.core.reserved`), assigned among the runners that
declare it, acquired and handed off like any shard, and run by a
:class:`~.singletons.SingletonRuntime` instead of a shard runtime. They
stay out of the routing table: no request is ever routed to them.

A failure inside one pass (a storage outage, a bug) ends that pass, not the
keeper: the next pass comes after a backoff. So does a pass that could not
read the membership: it goes on with the last membership it read, but the
change that woke it is still unseen, so it must not wait for the next
notice or the safety poll to look again.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from ..config import ShardingConfig
from ..core.assignment import VNODES, RunnerSpec, assign
from ..core.hashing import ShardId
from ..core.lifecycle import ShardState
from ..core.reserved import group_indices, singleton_name
from ..errors import ClusterError, PersistenceError
from ..storage.base import Lease, LeaseSession, RunnerStorage
from .hooks import Hooks
from .routing import Router
from .shard import ShardRuntime
from .singletons import SingletonRuntime
from .supervision import RESTART

log = logging.getLogger("trio_cluster.runner")

HANDOFF_RETRY = 0.05
"""How soon to try again for a shard whose previous owner still holds it."""
PEER_LOST_WATCH = 0.5
"""After a link to an owner drops, how long membership is re-read every HANDOFF_RETRY."""


INLINE_WORK = 5_000
"""Plans of at most this much work (shards + VNODES x runners) run on the event loop.

About 1 to 2 µs of CPU a unit, so at most ~5 to 10 ms; larger ones (94,000 units at
1,000 runners x 30,000 shards, 0.1 to 0.2 s) run in a worker thread, and the event loop
keeps serving meanwhile: the GIL passes back every ``sys.getswitchinterval()`` (5 ms),
and ``assign`` cuts its C-level passes into short slices so that it can.
"""


@enum.unique
class Again(enum.Enum):
    """When the keeper's next pass is due, as one pass found."""

    LATER = "later"
    """Nothing pending: at the next wake-up, else after the safety poll."""
    SOON = "soon"
    """A shard assigned here is not taken yet: after ``HANDOFF_RETRY``."""
    BACKOFF = "backoff"
    """The membership could not be read: after a backoff (``RESTART``)."""


def _by_shard(lease: Lease) -> ShardId:
    return lease.shard


Plan = tuple[dict[ShardId, str], dict[ShardId, str]]
"""Each entity shard's owner, and each singleton's lease shard's owner."""


def plan(runners: list[RunnerSpec], groups: list[str], per_group: int) -> Plan:
    """Assign every shard of ``groups``; split entity shards from singletons' lease shards.

    ``assign`` places each group on its own, so the two kinds are assigned apart,
    from shard lists made once per layout: building 10,000 ``ShardId``s and
    sorting the answer by kind cost as much as the assignment itself, on every
    membership change (a failover's critical path).
    """
    entity_shards, singleton_shards = _shard_lists(tuple(groups), per_group)
    return assign(entity_shards, runners), assign(singleton_shards, runners)


@functools.lru_cache(maxsize=4)
def _shard_lists(
    groups: tuple[str, ...], per_group: int
) -> tuple[tuple[ShardId, ...], tuple[ShardId, ...]]:
    """Every shard of ``groups``: the entity groups' shards, and the singletons' leases."""
    kinds: tuple[list[ShardId], list[ShardId]] = ([], [])
    for group in groups:
        kind = kinds[singleton_name(group) is not None]
        kind.extend(ShardId(group, index) for index in group_indices(group, per_group))
    return tuple(kinds[0]), tuple(kinds[1])


async def plan_off_loop(runners: list[RunnerSpec], shards_per_group: int) -> Plan:
    """:func:`plan` for the groups the runners host, kept off the event loop when it
    would stall it."""
    groups = sorted({group for spec in runners for group in spec.groups})
    shards = sum(len(group_indices(group, shards_per_group)) for group in groups)
    if shards + VNODES * len(runners) <= INLINE_WORK:
        return plan(runners, groups, shards_per_group)
    return await trio.to_thread.run_sync(
        plan, runners, groups, shards_per_group, abandon_on_cancel=True
    )


class _Starts:
    """The task status the runtimes of one pass share: ``all_started`` and ``done()``
    once every one of them started (or ended before it could)."""

    def __init__(self, count: int, done: Callable[[], None]) -> None:
        self._left = count
        self._done = done
        self.all_started = trio.Event()

    def started(self, value: None = None) -> None:
        self._left -= 1
        if self._left == 0:
            self.all_started.set()
            self._done()


class Held(Protocol):
    """What the keeper needs of anything it holds a lease for: a shard or a singleton."""

    @property
    def lease(self) -> Lease: ...

    @property
    def accepting(self) -> bool: ...

    async def stop(self, grace: float) -> None: ...

    def lose(self) -> None: ...


NewSingleton = Callable[[Lease, Callable[[SingletonRuntime], None]], SingletonRuntime | None]
"""Make the runtime of the singleton whose lease this is (None: not declared here)."""


def _no_singletons(lease: Lease, on_stopped: Callable[[SingletonRuntime], None]) -> None:
    return None


class ShardKeeper:
    def __init__(
        self,
        *,
        address: str,
        config: ShardingConfig,
        runners: RunnerStorage,
        session: LeaseSession,
        router: Router,
        shards: dict[ShardId, ShardRuntime],
        hooks: Hooks,
        new_shard: Callable[[Lease, Callable[[ShardRuntime], None]], ShardRuntime],
        new_singleton: NewSingleton = _no_singletons,
    ) -> None:
        self._address = address
        self._config = config
        self._runners = runners
        self._session = session
        self._router = router
        self._shards = shards
        """The shards held now: written here alone, read by the router and the follower."""
        self._hooks = hooks
        self._live: frozenset[str] = frozenset()
        """The live runners' addresses at the last look (what the instruments heard of)."""
        self._new_shard = new_shard
        self._new_singleton = new_singleton
        self._singletons: dict[ShardId, SingletonRuntime] = {}
        """The singletons held here now (never routed to, so apart from the shards)."""
        self.singleton_owners: dict[str, str] = {}
        """Each singleton's runner, by name, as this runner computes the assignment."""
        self._singleton_shards: dict[ShardId, str] = {}
        """The singletons' lease keys and the runner each is assigned to."""
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._handing_off: set[ShardId] = set()
        """Shards and singleton leases whose handoff has begun (see ``_hand_off``)."""
        self._watch_closely_until = 0.0
        self._keeping = trio.CancelScope()
        self._assigned_for: frozenset[RunnerSpec] | None = None
        """The membership the current assignment was computed from."""
        self._passed_over = False
        """A pass left alone a runtime held here but assigned elsewhere: not accepting yet."""
        self._starts: _Starts | None = None
        """The latest pass's runtimes being started."""

    # -- what others tell the keeper ------------------------------------------------

    def wake(self) -> None:
        """Re-read the membership now (a notice said it changed)."""
        self._wake.set()

    def on_peer_lost(self, peer: str) -> None:
        """A link dropped: the peer may be dead, so look at the membership now.

        The database may not have ended the dead runner's lock session yet,
        so keep looking closely for a moment (its death notice may come first).
        """
        if peer in self._router.assignment.values():
            self._watch_closely_until = trio.current_time() + PEER_LOST_WATCH
            self._wake.set()

    def on_lease_lost(self, shard_id: ShardId) -> None:
        shard = self._shards.get(shard_id)
        if shard is not None:
            log.warning("lease of %s lost: stopping its entities", shard_id)
            shard.lose()
        singleton = self._singletons.get(shard_id)
        if singleton is not None:
            log.warning("lease of singleton %s lost: cancelling it", singleton.singleton.name)
            singleton.lose()
        self._wake.set()

    @property
    def singletons(self) -> Mapping[str, SingletonRuntime]:
        """The singletons held here now, by name."""
        return {runtime.singleton.name: runtime for runtime in self._singletons.values()}

    def _singleton_stopped(self, singleton: SingletonRuntime) -> None:
        shard_id = singleton.lease.shard
        if self._singletons.get(shard_id) is singleton:
            del self._singletons[shard_id]
            self._note_changed()
            if self._singleton_shards.get(shard_id) == self._address:
                self._wake.set()  # still assigned here (it failed): take it again

    def _shard_stopped(self, shard: ShardRuntime) -> None:
        shards = self._shards
        shard_id = shard.lease.shard
        if shards.get(shard_id) is shard:
            del shards[shard_id]
            self._note_changed()
            if self._router.assignment.get(shard_id) == self._address:
                self._wake.set()  # still assigned here (lost, or failed): take it again
            state = shard.state
            how = state.value if state in (ShardState.LOST, ShardState.FAILED) else "released"
            self._hooks.shard_stopped(shard.lease.shard, how)

    # -- readiness ------------------------------------------------------------------

    def owns_its_assignment(self) -> bool:
        held = {s for s, h in self._held().items() if h.accepting}
        return self._mine() == held

    def _mine(self) -> set[ShardId]:
        """The shards and singleton leases the assignment gives this runner."""
        assigned = (*self._router.assignment.items(), *self._singleton_shards.items())
        return {shard for shard, owner in assigned if owner == self._address}

    def _held(self) -> dict[ShardId, Held]:
        return {**self._shards, **self._singletons}

    async def settled(self) -> None:
        while not self.owns_its_assignment():
            await self.changed()

    async def changed(self) -> None:
        await self._changed.wait()

    def _note_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the keeping loop ---------------------------------------------------------------

    async def run(
        self, shards: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep shards in ``shards`` (the runner's nursery, so that stopping this loop at
        shutdown leaves them to drain) until cancelled."""
        failures = RESTART.delays()
        with self._keeping:
            while True:
                self._wake = trio.Event()
                try:
                    again = await self._keep(shards)
                except* Exception as failure:
                    log.exception("keeping shards failed; trying again", exc_info=failure)
                    self._hooks.contained_failure("shard keeper", failure)
                    again = Again.BACKOFF
                if again is Again.BACKOFF:
                    delay = next(failures)
                else:
                    failures = RESTART.delays()
                    closely = again is Again.SOON or trio.current_time() < self._watch_closely_until
                    delay = HANDOFF_RETRY if closely else self._config.membership_poll_interval
                if task_status is not trio.TASK_STATUS_IGNORED and self._starts is not None:
                    # The first pass's runtimes serve before the runner opens.
                    await self._starts.all_started.wait()
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                with trio.move_on_after(delay):
                    await self._wake.wait()
        task_status.started()  # cancelled before the first pass ended

    async def _keep(self, shards: trio.Nursery) -> Again:
        """One pass, on the membership it reads (else the last one read); when the next is due."""
        read = await self._refresh_assignment()
        mine = self._mine()
        held = self._held()
        for holding in held.values():
            shard_id = holding.lease.shard
            if shard_id in mine or shard_id in self._handing_off:
                continue
            if holding.accepting:
                self._handing_off.add(shard_id)
                shards.start_soon(self._hand_off, holding)
            else:  # still starting (or stopping): look again once the starts are done
                self._passed_over = True
        # Nothing left to take: the next pass at the next wake-up, unless the read failed.
        done = Again.LATER if read else Again.BACKOFF
        wanted = sorted(mine - held.keys())
        if not wanted:
            return done
        try:
            leases = await self._session.acquire_many(wanted)
        except ClusterError as error:
            log.warning("cannot acquire %s and %d more yet: %s", wanted[0], len(wanted) - 1, error)
            return Again.SOON
        # Those left out are still held by their previous owner, handing them off.
        waiting = len(leases) < len(wanted)
        # Every new lease is in the maps before any runtime starts: a loss reported
        # meanwhile finds its runtime and stops it (stopped before it started, it just ends).
        adopted = [(lease, self._adopt(lease)) for lease in sorted(leases, key=_by_shard)]
        starting = [new for _, new in adopted if new is not None]
        if starting:
            # All scheduled at once, not started one by one: each start would wait a
            # turn of the event loop behind the shards started before it (their first
            # reads), and 2,800 of them held this pass, and with it the next
            # membership change, for 5 s. Scheduling is synchronous, so a keeper
            # stopped now (a runner leaving) leaves none unstarted in the maps.
            status = self._starts = _Starts(len(starting), self._started)
            for new in starting:
                shards.start_soon(functools.partial(new.run, task_status=status))
        for lease, runtime in adopted:
            if runtime is None:  # assigned here, yet not declared here: a bug, let go
                await self._session.release(lease)
        return Again.SOON if waiting else done

    def _started(self) -> None:
        """A pass's runtimes have all started: a change, and a pass that came meanwhile
        passed over those it must hand off (they were not accepting yet)."""
        self._note_changed()
        if self._passed_over:
            self._passed_over = False
            self._wake.set()

    async def _hand_off(self, holding: Held) -> None:
        """Stop ``holding`` gracefully, once its lease is surely still held.

        A runner resuming from a freeze may read the membership (which has
        moved on without it) before its lock connection tells it the lease
        is gone: a graceful stop then would let its handlers run on beside
        the new owner. So the handoff waits for the lease to be confirmed,
        and a lease found lost meanwhile is a loss (its runtime stopped at
        once by ``on_lease_lost``), not a handoff.
        """
        shard_id = holding.lease.shard
        try:
            await self._session.confirmed(shard_id)
            if holding.accepting:
                await holding.stop(self._config.entity_termination_timeout)
        finally:
            self._handing_off.discard(shard_id)

    def _adopt(self, lease: Lease) -> ShardRuntime | SingletonRuntime | None:
        """A new lease's runtime, in the maps at once; None for a singleton not declared here."""
        if lease.shard in self._singleton_shards:
            singleton = self._new_singleton(lease, self._singleton_stopped)
            if singleton is not None:
                self._singletons[lease.shard] = singleton
            return singleton
        shard = self._new_shard(lease, self._shard_stopped)
        self._shards[lease.shard] = shard
        # Reported before it starts, so that its stop (even one during the
        # start) always comes after: instruments keep gauges from the pair.
        self._hooks.shard_acquired(lease.shard, lease.epoch)
        return shard

    async def _refresh_assignment(self) -> bool:
        """Recompute who owns what from the live runners; keep the last answer on an
        outage (False: the membership could not be read)."""
        try:
            runners = await self._runners.live_runners()
        except PersistenceError as error:
            log.warning("cannot read the live runners: %s", error)
            return False
        self._report_membership(frozenset(spec.address for spec in runners))
        membership = frozenset(runners)
        if membership == self._assigned_for:
            return True  # the assignment depends on the membership alone: nothing to redo
        try:
            assignment, singletons = await plan_off_loop(runners, self._config.shards_per_group)
        except ValueError:
            # Two runners claiming one address: a deployment mistake to
            # shout about, not a reason to stop serving what we own.
            log.exception("cannot compute the assignment")
            return True  # read: reading again soon would not mend it
        self._assigned_for = membership
        if assignment != self._router.assignment or singletons != self._singleton_shards:
            self._router.assignment = assignment
            self._singleton_shards = singletons
            self.singleton_owners = {
                str(singleton_name(shard_id.group)): owner for shard_id, owner in singletons.items()
            }
            self._note_changed()
        return True

    def _report_membership(self, live: frozenset[str]) -> None:
        before, self._live = self._live, live
        for address in sorted(live - before):
            self._hooks.runner_joined(address)
        for address in sorted(before - live):
            self._hooks.runner_left(address)

    async def shutdown(self) -> None:
        """Leave the cluster, then drain every shard within the termination timeout.

        Leaving first lets the other runners reassign at once, so each shard
        is taken over the moment it is released rather than after all are.
        """
        self._keeping.cancel()
        try:
            await self._session.leave()
        except PersistenceError as error:
            log.warning("could not announce leaving: %s", error)
        timeout = self._config.entity_termination_timeout
        async with trio.open_nursery() as nursery:
            for holding in list(self._held().values()):
                nursery.start_soon(holding.stop, timeout)
