"""A runner: the process-level owner of shards, entities and callers' reply slots.

``open_runner`` is the whole lifecycle in one ``async with``: register, take
shards, serve; on the way out (normal exit, an exception or cancellation)
drain each shard within the termination timeout, release the leases and
unregister, shielded so that a cancelled parent still gets a clean handoff.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from itertools import count

import trio

from ..config import EntityOptions, ShardingConfig
from ..core import reply as replies
from ..core.assignment import RunnerSpec, assign
from ..core.envelope import Envelope
from ..core.hashing import ShardId
from ..core.snowflake import SnowflakeGenerator
from ..entity import Implementation
from ..errors import ClusterError, EntityNotAssignedToRunner, PersistenceError
from ..storage.base import (
    Gap,
    Lease,
    LeaseSession,
    MembershipChanged,
    Notice,
    Replied,
    Storage,
    Stored,
)
from ..storage.memory import MemoryStorage
from ..transport.link import PeerLink
from ..transport.network import Network, TransportConfig, open_listeners
from .client import Client
from .mailbox import ActiveEntity
from .metrics import Counters, Snapshot
from .replies import ReplyWaiters
from .shard import ShardRuntime

log = logging.getLogger("trio_cluster.runner")

MIN_SWEEP_INTERVAL = 0.01
MAX_SWEEP_INTERVAL = 5.0
MEMBERSHIP_INTERVAL = 0.5
"""How often live runners are re-read: the bound on noticing a silent death."""
LINK_CLOSE_GRACE = 1.0
"""Bound on sending the last replies and Goodbyes when a runner stops."""
HANDOFF_RETRY = 0.05
"""How soon to try again for a shard whose previous owner still holds it."""
PEER_LOST_WATCH = 0.5
"""After a link to an owner drops, how long membership is re-read every HANDOFF_RETRY."""
NOTICE_BATCH = 500
"""Most notices turned into one storage read."""

_runner_numbers = count(1)


class Runner:
    """Hosts entities. Create with :func:`open_runner`; send with :attr:`client`."""

    def __init__(
        self,
        *,
        address: str,
        config: ShardingConfig,
        storage: Storage,
        session: LeaseSession,
        implementations: Iterable[Implementation],
    ) -> None:
        self.address = address
        self.config = config
        self.storage = storage
        self.session = session
        self.hosted: dict[str, tuple[Implementation, EntityOptions]] = {}
        for implementation in implementations:
            name = implementation.entity.name
            if name in self.hosted:
                raise ValueError(f"entity type {name!r} is implemented twice")
            self.hosted[name] = (
                implementation,
                implementation.options or config.entity_defaults,
            )
        self.shards: dict[ShardId, ShardRuntime] = {}
        # Every resident entity, least recently used first.
        self.resident: OrderedDict[str, ActiveEntity] = OrderedDict()
        self.replies = ReplyWaiters()
        self.ids = SnowflakeGenerator(session.machine_id % 1024)
        self.metrics = Counters()
        self.client = Client(self)
        self.ask = self.client.ask
        self.tell = self.client.tell
        self._wake = trio.Event()
        self.assignment: dict[ShardId, str] = {}
        self.network: Network | None = None
        self._watch_closely_until = 0.0
        self._shards_changed = trio.Event()

    # -- routing --------------------------------------------------------------

    def route(self, envelope: Envelope) -> str | None:
        """Queue a request whose shard is owned here; otherwise name the owner to send it to."""
        shard_id = ShardId(envelope.shard_group, envelope.shard_index)
        shard = self.shards.get(shard_id)
        if shard is not None:
            shard.offer(envelope)
            return None
        owner = self.assignment.get(shard_id)
        if owner is None or owner == self.address or self.network is None:
            raise EntityNotAssignedToRunner(
                f"shard {shard_id} is not owned by {self.address}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        return owner

    def on_remote_request(self, link: PeerLink, envelope: Envelope) -> None:
        """A peer sent a request for a shard it believes is ours: queue it or refuse it."""
        request_id = envelope.request_id
        shard = self.shards.get(ShardId(envelope.shard_group, envelope.shard_index))
        try:
            if shard is None:
                raise EntityNotAssignedToRunner(
                    f"shard {envelope.shard_group}/{envelope.shard_index} "
                    f"is not owned by {self.address}",
                    entity_id=envelope.entity_id,
                    request_id=request_id,
                )
            self.replies.forward(request_id, functools.partial(link.send_reply, request_id))
            shard.offer(envelope)
        except ClusterError as error:
            self.replies.unforward(request_id)
            link.send_reply(request_id, replies.cluster_error(error))

    def on_peer_lost(self, peer: str) -> None:
        """A link dropped: the peer may be dead, so look at the membership now.

        The database may not have ended the dead runner's lock session yet,
        so keep looking closely for a moment instead of waiting a full
        membership interval.
        """
        if peer in self.assignment.values():
            self._watch_closely_until = trio.current_time() + PEER_LOST_WATCH
            self._wake.set()

    async def store_reply(self, envelope: Envelope, reply: bytes, lease: Lease) -> bool:
        """Store a final reply, retrying storage outages; False when fenced off or given up.

        Fenced off means a newer lease exists: the new owner answers. Given
        up means storage stayed down: the request is still unprocessed in
        storage and is redelivered when the shard is next acquired.
        """
        delays = self.config.send_retry.delays()
        while True:
            try:
                await self.storage.messages.save_reply(envelope.request_id, reply, lease)
            except EntityNotAssignedToRunner:
                log.info("reply to %s fenced off: %s is stale", envelope.request_id, lease)
                return False
            except PersistenceError:
                delay = next(delays, None)
                if delay is None:
                    log.exception("could not store the reply to %s", envelope.request_id)
                    return False
                await trio.sleep(delay)
            else:
                return True

    # -- entity residency -----------------------------------------------------

    def touch(self, entity: ActiveEntity) -> None:
        self.resident.move_to_end(entity.key)

    def make_room(self) -> None:
        """Passivate least recently used idle entities until one more fits under the cap.

        An entity with work in hand is never chosen; when every resident
        entity is busy the cap is exceeded rather than a message dropped,
        and the next activation brings the count back down.
        """
        excess = len(self.resident) - self.config.max_resident_entities + 1
        if excess <= 0:
            return
        idle = (entity for entity in self.resident.values() if entity.idle)
        for entity in list(itertools.islice(idle, excess)):
            entity.shard.passivate(entity)

    # -- shards ---------------------------------------------------------------

    async def refresh_assignment(self) -> None:
        """Recompute who owns what from the live runners; keep the last answer on an outage."""
        try:
            runners = await self.storage.runners.live_runners()
        except PersistenceError as error:
            log.warning("cannot read the live runners: %s", error)
            return
        per_group = self.config.shards_per_group
        groups = sorted({group for spec in runners for group in spec.groups})
        shards = [ShardId(group, index) for group in groups for index in range(per_group)]
        try:
            assignment = assign(shards, runners)
        except ValueError:
            # Two runners claiming one address: a deployment mistake to
            # shout about, not a reason to stop serving what we own.
            log.exception("cannot compute the assignment")
            return
        if assignment != self.assignment:
            self.assignment = assignment
            self.note_shards_changed()

    async def keep_shards(
        self,
        nursery: trio.Nursery,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Own exactly the shards the assignment gives this runner.

        Shards assigned elsewhere are handed off gracefully (drained, then
        released); shards assigned here are acquired as soon as their
        previous owner lets go, then their stored requests redelivered.
        Runs again on a membership notice, a lost lease, or every
        ``MEMBERSHIP_INTERVAL`` (how a runner that died without a word is
        noticed). Shards run in ``nursery``, not under ``scope``, so that
        stopping this loop at shutdown leaves them to drain.
        """
        with scope:
            while True:
                self._wake = trio.Event()
                await self.refresh_assignment()
                mine = {s for s, owner in self.assignment.items() if owner == self.address}
                for shard in list(self.shards.values()):
                    if shard.lease.shard not in mine and shard.accepting:
                        nursery.start_soon(shard.stop, self.config.entity_termination_timeout)
                waiting = False
                for shard_id in sorted(mine - self.shards.keys()):
                    try:
                        lease = await self.session.acquire(shard_id)
                    except ClusterError as error:
                        log.warning("cannot acquire %s yet: %s", shard_id, error)
                        waiting = True
                        break
                    if lease is None:
                        waiting = True  # its previous owner is still handing it off
                        continue
                    shard = ShardRuntime(self, lease)
                    self.shards[shard_id] = shard
                    await nursery.start(shard.run)
                    self.note_shards_changed()
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                closely = waiting or trio.current_time() < self._watch_closely_until
                with trio.move_on_after(HANDOFF_RETRY if closely else MEMBERSHIP_INTERVAL):
                    await self._wake.wait()

    async def sweep_idle(self) -> None:
        """Passivate entities idle for longer than their ``max_idle_time``.

        One sweep of the resident set replaces a timer per entity; an
        entity therefore goes between ``max_idle_time`` and a quarter of
        it more after its last message.
        """
        idle_times = [
            options.max_idle_time for _, options in self.hosted.values() if not options.keep_alive
        ]
        if not idle_times:
            return
        interval = min(max(min(idle_times) / 4, MIN_SWEEP_INTERVAL), MAX_SWEEP_INTERVAL)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            expired = [
                entity
                for entity in self.resident.values()
                if entity.idle
                and not entity.options.keep_alive
                and now - entity.last_active >= entity.options.max_idle_time
            ]
            for entity in expired:
                entity.shard.passivate(entity)

    async def follow_notices(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Act on what other runners store: requests for shards owned here, awaited replies.

        Started before any shard is acquired, so every request stored after
        a shard's redelivery scan is announced to its new owner.
        """
        async with self.storage.messages.notices() as notices:
            task_status.started()
            async for first in notices:
                # Everything already waiting is handled in one pass.
                batch = [first]
                with contextlib.suppress(trio.WouldBlock):
                    while len(batch) < NOTICE_BATCH:
                        batch.append(notices.receive_nowait())
                await self._act_on(batch)

    async def _act_on(self, batch: list[Notice]) -> None:
        me = self.session.machine_id
        stored: dict[ShardId, list[int]] = {}
        for notice in batch:
            match notice:
                case Gap():
                    for request_id in self.replies.waiting():
                        await self._fetch_reply(request_id)
                    for shard in list(self.shards.values()):
                        await shard.redeliver()
                    return
                case MembershipChanged():
                    self._wake.set()
                case Replied(request_id, origin) if origin != me and request_id in self.replies:
                    await self._fetch_reply(request_id)
                case Stored(shard_id, request_id, origin) if origin != me:
                    stored.setdefault(shard_id, []).append(request_id)
        for shard_id, request_ids in stored.items():
            owner = self.shards.get(shard_id)
            if owner is not None:
                await owner.deliver_stored(request_ids)

    async def _fetch_reply(self, request_id: int) -> None:
        try:
            reply = await self.storage.messages.reply_for(request_id)
        except PersistenceError as error:
            # The caller's own timeout bounds its wait; a later notice or
            # duplicate ask can still find the stored reply.
            log.warning("could not read the reply to %s: %s", request_id, error)
            return
        if reply is not None:
            self.replies.resolve(request_id, reply)

    def owns_its_assignment(self) -> bool:
        mine = {s for s, owner in self.assignment.items() if owner == self.address}
        return mine == {s for s, shard in self.shards.items() if shard.accepting}

    async def settled(self) -> None:
        """Wait until this runner serves exactly the shards assigned to it.

        A readiness probe for rolling deploys, and how tests wait for a
        rebalance to finish without sleeping.
        """
        while not self.owns_its_assignment():
            await self.changed()

    async def changed(self) -> None:
        """Wait for the next change of the assignment or of the shards owned here."""
        await self._shards_changed.wait()

    def note_shards_changed(self) -> None:
        self._shards_changed.set()
        self._shards_changed = trio.Event()

    def on_lease_lost(self, shard_id: ShardId) -> None:
        shard = self.shards.get(shard_id)
        if shard is not None:
            log.warning("lease of %s lost: stopping its entities", shard_id)
            shard.lose()
        self._wake.set()

    def shard_stopped(self, shard: ShardRuntime) -> None:
        if self.shards.get(shard.lease.shard) is shard:
            del self.shards[shard.lease.shard]
            self.note_shards_changed()
        for entity in list(shard.entities.values()):
            shard.forget(entity)

    async def shutdown(self) -> None:
        """Leave the cluster, drain every shard within the termination timeout, release them.

        Leaving first lets the other runners reassign at once, so each shard
        is taken over the moment it is released rather than after all are.
        """
        try:
            await self.session.leave()
        except PersistenceError as error:
            log.warning("could not announce leaving: %s", error)
        timeout = self.config.entity_termination_timeout
        async with trio.open_nursery() as nursery:
            for shard in list(self.shards.values()):
                nursery.start_soon(shard.stop, timeout)
        if self.network is not None:
            await self.network.aclose("runner shutting down", grace=LINK_CLOSE_GRACE)

    def snapshot(self) -> Snapshot:
        counters = self.metrics
        return Snapshot(
            processed=counters.processed,
            defects=counters.defects,
            mailbox_full=counters.mailbox_full,
            activations=counters.activations,
            passivations=counters.passivations,
            resident_entities=len(self.resident),
            owned_shards=len(self.shards),
            waiting_callers=len(self.replies),
        )


@asynccontextmanager
async def open_runner(
    *implementations: Implementation,
    storage: Storage | None = None,
    config: ShardingConfig | None = None,
    transport: TransportConfig | None = None,
    weight: float = 1.0,
) -> AsyncIterator[Runner]:
    """Run a runner hosting ``implementations`` for the duration of the block.

    Without ``storage`` the runner uses a private :class:`MemoryStorage`:
    a complete single-process cluster. Share one storage between runners
    (in-process, or PostgreSQL across processes) to spread shards over
    them; give each a ``transport`` so volatile requests can cross between
    them (persisted ones travel through storage). A runner hosting no
    implementations owns no shards: a client. The block starts once the
    runner has taken its first shards; leaving it hands them off gracefully.
    """
    config = config or ShardingConfig()
    storage = storage or MemoryStorage()
    runner: Runner | None = None

    def on_lease_lost(shard_id: ShardId) -> None:
        if runner is not None:
            runner.on_lease_lost(shard_id)

    groups = frozenset(implementation.entity.shard_group for implementation in implementations)
    body_error: BaseException | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            listeners: list[trio.SocketListener] = []
            if transport is None:
                # Unique even across containers where every runner is PID 1.
                address = f"local-{secrets.token_hex(6)}-{next(_runner_numbers)}"
            else:
                listeners, address = await stack.enter_async_context(open_listeners(transport))
            spec = RunnerSpec(address, weight, groups)
            session = await stack.enter_async_context(storage.runners.session(spec, on_lease_lost))
            runner = Runner(
                address=address,
                config=config,
                storage=storage,
                session=session,
                implementations=implementations,
            )
            async with trio.open_nursery() as nursery:
                if transport is not None:
                    runner.network = Network(
                        transport,
                        address,
                        nursery,
                        on_request=runner.on_remote_request,
                        on_reply=runner.replies.resolve,
                        on_failure=runner.replies.fail,
                        on_peer_lost=runner.on_peer_lost,
                    )
                    await nursery.start(runner.network.serve, listeners)
                await nursery.start(runner.follow_notices)
                keeper = trio.CancelScope()
                await nursery.start(runner.keep_shards, nursery, keeper)
                nursery.start_soon(runner.sweep_idle)
                try:
                    yield runner
                except BaseException as error:
                    body_error = error
                    raise
                finally:
                    keeper.cancel()
                    with trio.CancelScope(shield=True):
                        await runner.shutdown()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own exception comes back as itself, not wrapped in
        # the group of a nursery it never opened.
        if body_error is not None and group.exceptions == (body_error,):
            raise body_error from None
        raise
