"""The runner: a small facade over the parts that host entities, and ``open_runner``.

``open_runner`` wires the parts and is the whole lifecycle in one ``async
with``: register, take shards, serve; on the way out (normal exit, an
exception or cancellation) drain each shard within the termination
timeout, release the leases and unregister, shielded so that a cancelled
parent still gets a clean handoff.

The parts, each with one job and each a failure boundary of its own:

- :class:`~.routing.Router`: where a request goes; requests from peers;
- :class:`~.keeper.ShardKeeper`: the assignment, acquiring and handing off shards
  and singleton leases;
- :class:`~.singletons.SingletonRuntime`: one singleton held here, its function supervised;
- :mod:`~.schedules`: the loop a schedule's singleton runs;
- :class:`~.residency.Residency`: which entities stay resident (idle passivation, the cap);
- :class:`~.notices.NoticeFollower`: acting on storage notices;
- :class:`~.client.Client`: ``ask`` and ``tell``;
- :class:`~.shard.ShardRuntime` and :class:`~.mailbox.ActiveEntity`, which see only
  the narrow :class:`~.services.Services`;
- the socket transport (``trio_cluster.transport``) and the storage session.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence, Set
from contextlib import asynccontextmanager
from datetime import datetime
from itertools import count
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from .._util import NoPublicConstructor
from ..broadcast import Audience, BroadcastOutcome, BroadcastResult
from ..config import ShardingConfig
from ..core.assignment import RunnerSpec
from ..core.hashing import ShardId
from ..core.reserved import RESERVED_PREFIX, SCHEDULE_PREFIX, schedule_name, singleton_shard
from ..core.timetable import from_ms
from ..entity import Entity, Implementation, Rpc
from ..health import HealthConfig, Readiness
from ..instrument import Instrument
from ..schedule import Schedule
from ..singleton import Singleton
from ..storage.base import Lease, LeaseSession, StateStorage, Storage
from ..storage.memory import MemoryStorage
from ..storage.status import ClusterStatus, ShardStatus
from ..transport.network import Network, TransportConfig, open_listeners
from .broadcasting import Broadcaster
from .client import Client
from .expiry import Expiries
from .hooks import Hooks
from .keeper import ShardKeeper
from .metrics import Counters, Snapshot
from .notices import NoticeFollower
from .replies import StoredReplies
from .residency import Residency
from .routing import Router
from .runner_calls import RunnerCalls
from .runner_calls import runner_handlers as _runner_handlers
from .schedules import ScheduleServices, schedule_singleton, wall_clock
from .services import Hosted, Services
from .shard import ShardRuntime
from .singletons import SingletonRuntime, SingletonServices
from .stored_streams import StreamWatchers
from .supervision import keep_running
from .withdrawals import Withdrawals

if TYPE_CHECKING:
    from .probes import HealthServer

log = logging.getLogger("trio_cluster.runner")

LINK_CLOSE_GRACE = 1.0
"""Bound on sending the last replies and Goodbyes when a runner stops."""
FRAME_OVERHEAD = 64 * 1024
"""Room in a frame for what travels beside a payload (ids, entity id, headers)."""

_runner_numbers = count(1)

P = TypeVar("P")
S = TypeVar("S")


class Runner(metaclass=NoPublicConstructor):
    """Hosts entities and sends to any entity of the cluster. Made by :func:`open_runner`."""

    def __init__(
        self,
        *,
        address: str,
        config: ShardingConfig,
        session: LeaseSession,
        client: Client,
        shards: Mapping[ShardId, ShardRuntime],
        keeper: ShardKeeper,
        residency: Residency,
        metrics: Counters,
        hooks: Hooks,
        router: Router,
        states: StateStorage,
        read_status: Callable[..., Awaitable[ClusterStatus]] | None,
        hosted: frozenset[str],
        schedules: Mapping[str, Schedule],
        schedule_clock: Callable[[], int],
        broadcaster: Broadcaster,
    ) -> None:
        self.address = address
        self.config = config
        self.client = client
        self.ask = client.ask
        self.tell = client.tell
        self.stream = client.stream
        self.complete_deferred = client.complete_deferred
        self.fail_deferred = client.fail_deferred
        self.generate_id = client.generate_id
        self._session = session
        self._router = router
        self._shards = shards
        self._keeper = keeper
        self._residency = residency
        self._metrics = metrics
        self._hooks = hooks
        self._states = states
        self._read_status = read_status
        self._hosted = hosted
        self._schedules = schedules
        self._schedule_clock = schedule_clock
        self._broadcaster = broadcaster
        self._phase = "starting"
        self._health: HealthServer | None = None

    @property
    def machine_id(self) -> int:
        """This runner's machine id (unique among live runners; the Snowflake machine id)."""
        return self._session.machine_id

    @property
    def assignment(self) -> Mapping[ShardId, str]:
        """Every shard's owner, as this runner sees the cluster now."""
        return MappingProxyType(self._router.assignment)

    @property
    def shards(self) -> Mapping[ShardId, Lease]:
        """The shards this runner holds now (draining ones included), with their leases."""
        return {shard_id: shard.lease for shard_id, shard in self._shards.items()}

    @property
    def singletons(self) -> Set[str]:
        """Names of the singletons whose lease this runner holds now (running or restarting)."""
        return frozenset(self._keeper.singletons)

    @property
    def singleton_owners(self) -> Mapping[str, str]:
        """Each declared singleton's runner address, as this runner sees the cluster now."""
        return MappingProxyType(self._keeper.singleton_owners)

    @property
    def schedules(self) -> Set[str]:
        """Names of the schedules this runner drives now (their singleton's lease held here)."""
        return frozenset(
            name for name in map(schedule_name, self._keeper.singletons) if name is not None
        )

    def next_fire_times(self, name: str, n: int) -> list[datetime]:
        """The next ``n`` moments the declared schedule ``name`` fires after now, as its
        schedules' clock reads it (see
        :meth:`Schedule.next_fire_times <trio_cluster.Schedule.next_fire_times>`).

        Raises KeyError for a schedule not declared on this runner.
        """
        schedule = self._schedules.get(name)
        if schedule is None:
            raise KeyError(f"no schedule {name!r} is declared on this runner")
        return schedule.next_fire_times(n, from_ms(self._schedule_clock()))

    @property
    def resident(self) -> Set[str]:
        """Keys (``Type/id``) of the entities resident on this runner now."""
        return self._residency.keys()

    @property
    def instruments(self) -> tuple[Instrument, ...]:
        """The instruments given to :func:`open_runner` that are still installed (one
        that raised was removed)."""
        return self._hooks.instruments

    def readiness(self) -> Readiness:
        """Whether the runner should get work now, and why (the ``/readyz`` probe)."""
        if self._phase != "serving":
            return Readiness(False, self._phase)
        if not self._keeper.owns_its_assignment():
            return Readiness(False, "not serving every shard assigned to it")
        return Readiness(True, "serving its shards")

    @property
    def health_address(self) -> tuple[str, int] | None:
        """Where the health server listens (None without one)."""
        return None if self._health is None else self._health.address

    def mailbox_depth(self) -> int:
        """Requests waiting in the mailboxes of the entities resident here now."""
        return self._residency.queued()

    async def backlog(self) -> dict[ShardId, ShardStatus]:
        """The persisted requests waiting in each shard this runner serves, from one
        status read of the storage (for metrics at scrape time, not a hot path).
        Empty for a storage that cannot report its status."""
        if self._read_status is None:
            return {}
        status = await self._read_status(shards_per_group=self.config.shards_per_group)
        me = self.machine_id
        return {
            ShardId(group.name, shard.index): shard
            for group in status.groups
            for shard in group.shards
            if shard.owner == me
        }

    def owns_its_assignment(self) -> bool:
        return self._keeper.owns_its_assignment()

    def is_local(self, entity: Entity, entity_id: str) -> bool:
        """Whether the entity would run here now: its type is hosted here and its
        shard is served here, taking requests.

        False while the shard drains for a handoff (it takes nothing new
        then) and once its lease is lost. A hint for placing work near its
        data, never a lock: the shard may move the next moment, so act on
        it only where a wrong guess costs time, not correctness.
        """
        if entity.name not in self._hosted:
            return False
        shard = self._shards.get(entity.shard_of(entity_id, self.config.shards_per_group))
        return shard is not None and shard.accepting

    async def stored_state_ids(
        self, entity: Entity, *, after: str = "", limit: int = 1000
    ) -> list[str]:
        """Ids of ``entity``'s entities that have stored state, in order: a page of at most
        ``limit`` after ``after`` (pass the last id of a page to get the next)."""
        return await self._states.state_ids(entity.name, after=after, limit=limit)

    async def broadcast(
        self,
        rpc: Rpc[P, S],
        payload: P,
        *,
        to: Audience,
        broadcast_id: str | None = None,
        concurrency: int = 16,
        timeout: float | None = None,  # noqa: ASYNC109 - SendTimeout is part of the contract
        on_outcome: Callable[[str, BroadcastOutcome[S]], None] | None = None,
    ) -> BroadcastResult[S]:
        """Send ``rpc`` to every entity of its type that ``to`` names: ``RESIDENT`` (on
        some live runner) or ``STORED`` (with stored state). One outcome per entity id.

        At most ``concurrency`` requests are in flight; everything ends within
        ``timeout`` (default ``ShardingConfig.send_timeout``; an entity not
        answered by then has ``SendTimeout``). A persisted RPC is stored once per
        entity under the primary key ``broadcast_key(broadcast_id)``: run the
        broadcast again with the same ``broadcast_id`` (from the result) and no
        entity gets it twice. ``on_outcome`` takes each outcome as it comes, in
        place of the result keeping them all. See docs/concepts.md (Broadcast).
        """
        return await self._broadcaster.to_entities(
            rpc,
            payload,
            to=to,
            broadcast_id=broadcast_id,
            concurrency=concurrency,
            timeout=timeout,
            on_outcome=on_outcome,
        )

    async def broadcast_runners(
        self,
        rpc: Rpc[P, S],
        payload: P,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - SendTimeout is part of the contract
    ) -> BroadcastResult[S]:
        """Send the runner message ``rpc`` to every live runner (this one included),
        all at once; one outcome per runner address. Each runner answers with its
        ``RunnerHandler`` for ``rpc``; one without has ``MalformedMessage``."""
        return await self._broadcaster.to_runners(rpc, payload, timeout=timeout)

    async def settled(self) -> None:
        """Wait until this runner serves exactly the shards assigned to it.

        A readiness probe for rolling deploys, and how tests wait for a
        rebalance to finish without sleeping.
        """
        await self._keeper.settled()

    async def changed(self) -> None:
        """Wait for the next change of the assignment or of the shards owned here."""
        await self._keeper.changed()

    def snapshot(self) -> Snapshot:
        counters = self._metrics
        return Snapshot(
            processed=counters.processed,
            defects=counters.defects,
            mailbox_full=counters.mailbox_full,
            activations=counters.activations,
            passivations=counters.passivations,
            refused=counters.refused,
            contained_failures=counters.contained_failures,
            resident_entities=len(self._residency),
            owned_shards=len(self._shards),
            waiting_callers=counters.waiting_callers,
            redelivered=counters.redelivered,
            lease_losses=counters.lease_losses,
            errors=dict(counters.errors),
            live_runners=len(counters.live_runners),
            singletons_running=counters.singletons_running,
            singleton_failures=counters.singleton_failures,
            timers_armed=counters.timers["armed"],
            timers_fired=counters.timers["fired"],
            timers_cancelled=counters.timers["cancelled"],
            deferreds_suspended=counters.deferreds_suspended,
            deferreds_completed=counters.deferreds_completed,
            deferreds_failed=counters.deferreds_failed,
            schedules_running=len(self.schedules),
            schedule_firings=counters.schedule_firings,
            schedule_skips=counters.schedule_skips,
            schedule_failures=counters.schedule_failures,
        )

    async def _shutdown(self) -> None:
        self._phase = "leaving"  # not ready from the first moment of the handoff
        await self._keeper.shutdown()
        network = self._router.network
        if network is not None:
            await network.aclose("runner shutting down", grace=LINK_CLOSE_GRACE)


def _check_frame_room(config: ShardingConfig, transport: TransportConfig | None) -> None:
    if (
        transport is not None
        and config.max_message_size > transport.max_frame_size - FRAME_OVERHEAD
    ):
        raise ValueError(
            f"ShardingConfig.max_message_size ({config.max_message_size}) must leave "
            f"{FRAME_OVERHEAD} bytes of TransportConfig.max_frame_size ({transport.max_frame_size})"
        )


async def _start_probes(stack: contextlib.AsyncExitStack, server: HealthServer) -> None:
    """Serve the probes in a nursery of their own, stopped when ``stack`` closes."""
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)
    await nursery.start(server.serve)


@attrs.frozen
class _Probes:
    server: HealthServer | None = None
    instruments: tuple[Instrument, ...] = ()
    """Instruments the server brings: its metrics, unless the user gave theirs."""


def _probes(health: HealthConfig | None, instruments: Sequence[Instrument]) -> _Probes:
    """The health server, and its metrics. The extras are imported only when asked for."""
    if health is None:
        return _Probes()
    from .probes import HealthServer  # noqa: PLC0415 - the health extra, only when asked for

    if not health.metrics:
        return _Probes(HealthServer(health, None))
    from ..prometheus import PrometheusMetrics  # noqa: PLC0415 - the prometheus extra

    given = next((i for i in instruments if isinstance(i, PrometheusMetrics)), None)
    metrics = given or PrometheusMetrics()
    return _Probes(HealthServer(health, metrics.scrape), () if given else (metrics,))


def _singletons(singletons: Sequence[Singleton]) -> dict[ShardId, Singleton]:
    """The declared singletons by lease key; one name declared twice is a mistake."""
    declared: dict[ShardId, Singleton] = {}
    for singleton in singletons:
        if not isinstance(singleton, Singleton):
            raise TypeError(f"singletons must be Singleton instances (got {singleton!r})")
        if singleton.name.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"singleton names starting with {RESERVED_PREFIX!r} are reserved for the "
                f"cluster's own services: {singleton.name!r}"
            )
        key = singleton_shard(singleton.name)
        if key in declared:
            raise ValueError(f"singleton {singleton.name!r} is declared twice")
        declared[key] = singleton
    return declared


def _schedules(schedules: Sequence[Schedule]) -> dict[str, Schedule]:
    """The declared schedules by name; one name declared twice is a mistake."""
    declared: dict[str, Schedule] = {}
    for schedule in schedules:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedules must be Schedule instances (got {schedule!r})")
        if schedule.name in declared:
            raise ValueError(f"schedule {schedule.name!r} is declared twice")
        declared[schedule.name] = schedule
    return declared


def _groups(
    implementations: Iterable[Implementation],
    singletons: Iterable[ShardId],
    schedules: Iterable[str],
) -> frozenset[str]:
    """The shard groups a runner hosts: its entities', its singletons' and its schedules'."""
    return frozenset(
        {implementation.entity.shard_group for implementation in implementations}
        | {shard.group for shard in singletons}
        | {singleton_shard(SCHEDULE_PREFIX + name).group for name in schedules}
    )


def _hosted(implementations: Iterable[Implementation], config: ShardingConfig) -> dict[str, Hosted]:
    hosted: dict[str, Hosted] = {}
    for implementation in implementations:
        name = implementation.entity.name
        if name in hosted:
            raise ValueError(f"entity type {name!r} is implemented twice")
        options = implementation.options or config.entity_defaults
        if implementation.state is not None and options.concurrency != 1:
            # Concurrent handlers would commit each other's half-made changes.
            raise ValueError(f"entity type {name!r} has durable state: its concurrency must be 1")
        hosted[name] = Hosted(implementation, options)
    return hosted


@asynccontextmanager
async def open_runner(
    *implementations: Implementation,
    storage: Storage | None = None,
    config: ShardingConfig | None = None,
    transport: TransportConfig | None = None,
    weight: float = 1.0,
    instruments: Sequence[Instrument] = (),
    health: HealthConfig | None = None,
    singletons: Sequence[Singleton] = (),
    schedules: Sequence[Schedule] = (),
    runner_handlers: Sequence[Any] = (),
) -> AsyncIterator[Runner]:
    """Run a runner hosting ``implementations`` for the duration of the block.

    Without ``storage`` the runner uses a private :class:`MemoryStorage`:
    a complete single-process cluster. Share one storage between runners
    (in-process, or PostgreSQL across processes) to spread shards over
    them; give each a ``transport`` so volatile requests can cross between
    them (persisted ones travel through storage). A runner hosting no
    implementations owns no shards: a client. The block starts once the
    runner has taken its first shards; leaving it hands them off gracefully.
    ``instruments`` hear what the runner does (see :mod:`trio_cluster.instrument`);
    ``health`` serves the Kubernetes probes and ``/metrics`` (see :mod:`trio_cluster.health`).
    ``singletons`` may run here: each runs on one runner among those declaring it
    (see :mod:`trio_cluster.singleton`). ``schedules`` may fire here: each is driven by a
    singleton of its own (see :mod:`trio_cluster.schedule`).
    ``runner_handlers`` (each a ``RunnerHandler``) answer runner messages sent here
    (see :mod:`trio_cluster.broadcast`).
    """
    config = config or ShardingConfig()
    _check_frame_room(config, transport)
    hosted = _hosted(implementations, config)
    # Every declaration is checked before anything starts.
    declared, timed, handlers = (
        _singletons(singletons),
        _schedules(schedules),
        _runner_handlers(runner_handlers),
    )
    counters = Counters()
    probes = _probes(health, instruments)
    hooks = Hooks((*instruments, *probes.instruments), trusted=(counters,))
    storage = storage or MemoryStorage()
    # Entity tasks start from this context, never from an activating caller's.
    base_context = contextvars.copy_context()
    keeper: ShardKeeper | None = None

    def on_lease_lost(shard_id: ShardId) -> None:
        if keeper is not None:
            keeper.on_lease_lost(shard_id)

    groups = _groups(implementations, declared, timed)
    body_error: BaseException | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if probes.server is not None:
                # Before anything else, so that liveness answers while the runner
                # waits for the database and takes its shards, and until it is gone.
                await _start_probes(stack, probes.server)
            listeners: list[trio.SocketListener] = []
            if transport is None:
                # Unique even across containers where every runner is PID 1.
                address = f"local-{secrets.token_hex(6)}-{next(_runner_numbers)}"
            else:
                listeners, address = await stack.enter_async_context(open_listeners(transport))
            spec = RunnerSpec(address, weight, groups)
            session = await stack.enter_async_context(storage.runners.session(spec, on_lease_lost))
            parts = _assemble(
                address=address,
                config=config,
                storage=storage,
                session=session,
                hosted=hosted,
                base_context=base_context,
                hooks=hooks,
                counters=counters,
                singletons=declared,
                schedules=timed,
                runner_handlers=handlers,
            )
            keeper, runner = parts.keeper, parts.runner
            if probes.server is not None:
                runner._health = probes.server
                probes.server.readiness = runner.readiness
            async with trio.open_nursery() as nursery:
                await _start_parts(
                    nursery,
                    parts,
                    transport=transport,
                    listeners=listeners,
                    hosted=hosted,
                    hooks=hooks,
                )
                runner._phase = "serving"
                hooks.runner_opened(runner)
                try:
                    yield runner
                except BaseException as error:
                    body_error = error
                    raise
                finally:
                    with trio.CancelScope(shield=True):
                        await runner._shutdown()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own exception comes back as itself, not wrapped in
        # the groups of nurseries it never opened.
        if body_error is not None and _only(group, body_error):
            raise body_error from None
        raise


async def _start_parts(
    nursery: trio.Nursery,
    parts: _Parts,
    *,
    transport: TransportConfig | None,
    listeners: list[trio.SocketListener],
    hosted: Mapping[str, Hosted],
    hooks: Hooks,
) -> None:
    """Start the network, the notice follower, the keeper (which takes the first
    shards) and the idle sweeper, in that order."""
    router, keeper = parts.router, parts.keeper
    parts.calls.start(nursery)
    if transport is not None:
        router.network = Network(
            transport,
            parts.runner.address,
            nursery,
            on_request=router.on_remote_request,
            on_peer_lost=keeper.on_peer_lost,
        )
        await nursery.start(router.network.serve, listeners)
    await nursery.start(parts.follower.run)
    nursery.start_soon(keep_running, "withdrawals", parts.withdrawals.run, hooks)
    nursery.start_soon(keep_running, "expiries", parts.expiries.run, hooks)
    await nursery.start(keeper.run, nursery)
    options = [entry.options for entry in hosted.values()]
    sweep = functools.partial(parts.residency.sweep_idle, options)
    nursery.start_soon(keep_running, "idle sweeper", sweep, hooks)


@attrs.frozen
class _Parts:
    runner: Runner
    router: Router
    keeper: ShardKeeper
    follower: NoticeFollower
    residency: Residency
    withdrawals: Withdrawals
    expiries: Expiries
    calls: RunnerCalls


def _assemble(
    *,
    address: str,
    config: ShardingConfig,
    storage: Storage,
    session: LeaseSession,
    hosted: Mapping[str, Hosted],
    base_context: contextvars.Context,
    hooks: Hooks,
    counters: Counters,
    singletons: Mapping[ShardId, Singleton],
    schedules: Mapping[str, Schedule],
    runner_handlers: list[tuple[Rpc[Any, Any], Callable[[Any], Awaitable[Any]]]],
) -> _Parts:
    """Build the runner's parts, each given only what it uses."""
    stored_replies = StoredReplies()
    watchers = StreamWatchers()
    residency = Residency(config.max_resident_entities)
    shards: dict[ShardId, ShardRuntime] = {}
    router = Router(address, config, hooks, shards)
    withdrawals = Withdrawals(
        messages=storage.messages,
        shards=shards,
        machine_id=lambda: session.machine_id,
        hooks=hooks,
    )
    expiries = Expiries()
    client = Client(
        config=config,
        router=router,
        messages=storage.messages,
        deferreds=storage.deferreds,
        stored_replies=stored_replies,
        streams=storage.streams,
        watchers=watchers,
        session=session,
        hooks=hooks,
        withdrawals=withdrawals,
        expiries=expiries,
    )
    services = Services(
        address=address,
        config=config,
        messages=storage.messages,
        states=storage.states,
        timers=storage.timers,
        deferreds=storage.deferreds,
        stored_replies=stored_replies,
        streams=storage.streams,
        watchers=watchers,
        hooks=hooks,
        residency=residency,
        hosted=hosted,
        client=client,
        release=session.release,
        confirmed=session.confirmed,
        base_context=base_context,
    )
    singleton_services = SingletonServices(address, client, hooks, session.release)
    timing = ScheduleServices(
        storage.schedules, hooks, lambda: session.machine_id, wall_clock.get()
    )
    for schedule in schedules.values():
        driver = schedule_singleton(schedule, timing)
        singletons = {**singletons, singleton_shard(driver.name): driver}

    def new_singleton(
        lease: Lease, on_stopped: Callable[[SingletonRuntime], None]
    ) -> SingletonRuntime | None:
        singleton = singletons.get(lease.shard)
        if singleton is None:
            return None
        return SingletonRuntime(singleton, singleton_services, lease, on_stopped)

    keeper = ShardKeeper(
        address=address,
        config=config,
        runners=storage.runners,
        session=session,
        router=router,
        shards=shards,
        hooks=hooks,
        new_shard=functools.partial(ShardRuntime, services),
        new_singleton=new_singleton,
    )
    follower = NoticeFollower(
        messages=storage.messages,
        notices=session.notices,
        shards=shards,
        stored_replies=stored_replies,
        watchers=watchers,
        machine_id=lambda: session.machine_id,
        membership_changed=keeper.wake,
        hooks=hooks,
    )
    calls = RunnerCalls(
        address=address,
        config=config,
        router=router,
        hooks=hooks,
        residency=residency,
        generate_id=client.generate_id,
        handlers=runner_handlers,
    )
    router.on_runner_request = calls.on_request
    broadcaster = Broadcaster(
        config=config, client=client, calls=calls, runners=storage.runners, states=storage.states
    )
    runner = Runner._create(
        address=address,
        config=config,
        session=session,
        client=client,
        router=router,
        shards=shards,
        keeper=keeper,
        residency=residency,
        metrics=counters,
        hooks=hooks,
        states=storage.states,
        read_status=getattr(storage, "read_status", None),
        hosted=frozenset(hosted),
        schedules=schedules,
        schedule_clock=timing.clock,
        broadcaster=broadcaster,
    )
    return _Parts(runner, router, keeper, follower, residency, withdrawals, expiries, calls)


def _only(group: BaseExceptionGroup, error: BaseException) -> bool:
    """Whether ``group`` is nothing but ``error``, however many groups deep.

    A group raised by the body may come back as a copy of itself: Trio
    splits cancellations out of a group by deriving a new one. The copy holds
    the same exceptions, which is what is compared then.
    """
    current: BaseException = group
    while isinstance(current, BaseExceptionGroup) and len(current.exceptions) == 1:
        current = current.exceptions[0]
        if current is error or _same_group(current, error):
            return True
    return False


def _same_group(candidate: BaseException, error: BaseException) -> bool:
    return (
        isinstance(candidate, BaseExceptionGroup)
        and isinstance(error, BaseExceptionGroup)
        and candidate.message == error.message
        and _leaves(candidate) == _leaves(error)
    )


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]
