"""The PostgreSQL storage: every storage protocol over one database.

``open_postgres_storage`` waits for the server (see ``startup``), migrates the
schema, opens the pool for message traffic, and gives each runner session its own
dedicated lock connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..core.assignment import RunnerSpec
from ..core.hashing import ShardId
from ..errors import PersistenceError
from ..pgdriver.errors import PgError
from ..pgdriver.pool import Pool, open_pool
from ..storage.retention import Retention, sweep_forever
from ..storage.status import ClusterStatus
from .boundary import translated
from .deferreds import PgDeferredStorage
from .leases import LeaseTiming, PgLeaseSession
from .membership import mark_dead, read_members
from .messages import PgMessageStorage, never_owned
from .schedules import PgScheduleStorage
from .schema import check_prefix, lock_namespace, migrate
from .startup import DEFAULT_CONNECT_DEADLINE, open_first_connection
from .states import PgStateStorage
from .status import read_status
from .streams import PgStreamStorage
from .timers import PgTimerStorage
from .watcher import MembershipView, PeerWatcher


class PostgresStorage:
    def __init__(
        self,
        dsn: str,
        prefix: str,
        pool: Pool,
        messages: PgMessageStorage,
        timing: LeaseTiming,
        *,
        connect_deadline: float | None = DEFAULT_CONNECT_DEADLINE,
        retention: Retention | None = None,
    ) -> None:
        self._dsn = dsn
        self._retention = retention
        self._prefix = prefix
        self._pool = pool
        self._messages = messages
        self._states = PgStateStorage(pool, prefix)
        self._timers = PgTimerStorage(pool, prefix)
        self._deferreds = PgDeferredStorage(pool, prefix, messages.channel)
        self._schedules = PgScheduleStorage(pool, prefix)
        self._streams = PgStreamStorage(pool, prefix, messages.channel)
        self._timing = timing
        self._connect_deadline = connect_deadline
        self._runners_namespace: int | None = None
        self._view = MembershipView()
        """The latest membership read, which this storage's watchers follow."""

    @property
    def runners(self) -> PostgresStorage:
        return self

    @property
    def messages(self) -> PgMessageStorage:
        return self._messages

    @property
    def states(self) -> PgStateStorage:
        return self._states

    @property
    def timers(self) -> PgTimerStorage:
        return self._timers

    @property
    def deferreds(self) -> PgDeferredStorage:
        return self._deferreds

    @property
    def schedules(self) -> PgScheduleStorage:
        return self._schedules

    @property
    def streams(self) -> PgStreamStorage:
        return self._streams

    async def live_runners(self) -> list[RunnerSpec]:
        """Registered runners whose lock connection still holds their machine-id lock.

        Liveness is the lock itself, not a heartbeat timestamp: a runner is
        dead the moment the server has ended its lock connection. A dead row
        found here is marked and announced (see ``membership``), and the read
        is what the watchers of this storage's sessions follow.
        """
        p = self._prefix
        started = trio.current_time()
        with translated("list runners"):
            async with self._pool.connection() as conn:
                if self._runners_namespace is None:
                    self._runners_namespace = await lock_namespace(conn, f"{p}:runners")
                namespace = self._runners_namespace
                members = await read_members(conn, p, namespace)
                dead = [member.machine_id for member in members if not member.live]
                if dead:
                    await mark_dead(conn, p, namespace, self._messages.channel, dead)
        live = [member for member in members if member.live]
        # Only runners that host shards are watched (see ``session``).
        hosts = frozenset(member.machine_id for member in live if member.spec.groups)
        self._view.update(hosts, started)
        return [member.spec for member in live]

    @asynccontextmanager
    async def session(
        self, spec: RunnerSpec, on_lease_lost: Callable[[ShardId], None]
    ) -> AsyncIterator[PgLeaseSession]:
        """Register a runner on a dedicated lock connection, supervised by its own task,
        and, when it hosts shards, watch its successor's (see ``watcher``). A runner
        that hosts none (a client) neither watches nor is watched: its death moves
        no shard, so it needs no connection beyond its lock connection.

        With a retention, the runner also purges the shards it holds (see
        `trio_cluster.storage.retention`).
        """
        session = PgLeaseSession(
            self._dsn,
            self._prefix,
            spec,
            on_lease_lost=on_lease_lost,
            timing=self._timing,
            channel=self._messages.channel,
            parse_notification=self._messages.parse_notification,
            pool=self._pool,
            register_deadline=self._connect_deadline,
        )
        watcher = PeerWatcher(
            dsn=self._dsn,
            prefix=self._prefix,
            channel=self._messages.channel,
            timing=self._timing,
            view=self._view,
            machine_id=lambda: session.machine_id,
            application_name=f"trio_cluster watcher {spec.address}",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            self._messages.owned = session.surely_holds
            if spec.groups:
                nursery.start_soon(watcher.run)
            if self._retention is not None:
                nursery.start_soon(
                    sweep_forever, self._retention, session.held, self._messages.purge
                )
            try:
                yield session
            finally:
                self._messages.owned = never_owned
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await session.unregister()
                nursery.cancel_scope.cancel()

    async def read_status(self, *, shards_per_group: int | None = None) -> ClusterStatus:
        """The status view's snapshot (see :mod:`.status`), read on a pooled connection."""
        with translated("read the cluster's status"):
            async with self._pool.connection() as conn:
                return await read_status(conn, self._prefix, shards_per_group=shards_per_group)


@asynccontextmanager
async def open_postgres_storage(
    dsn: str,
    *,
    prefix: str = "trio_cluster_",
    pool_size: int = 10,
    pool_dsn: str | None = None,
    prepared_statements: bool = True,
    timing: LeaseTiming | None = None,
    connect_deadline: float | None = DEFAULT_CONNECT_DEADLINE,
    retention: Retention | None = Retention(),  # noqa: B008 - frozen, so shared safely
) -> AsyncIterator[PostgresStorage]:
    """Storage for runners sharing the database at ``dsn``.

    Tables are named with ``prefix``, so clusters with different prefixes
    share a database without meeting. The schema is created or upgraded
    here, before any runner can use it.

    A server that is not up yet is waited for, up to ``connect_deadline``
    seconds (30 by default; ``None``: until cancelled; ``0``: fail at once),
    logging each failed attempt; past it, ``PersistenceError``. A runner's lock session
    waits as long for its first registration (``open_runner`` then waits too).

    The pool (``pool_size`` connections, opened on demand) connects to
    ``pool_dsn`` when given, ``dsn`` otherwise: put a transaction-mode pooler
    there, never in front of ``dsn``, whose lock and watcher connections hold
    session advisory locks and the LISTEN. Behind a pooler that does not keep
    prepared statements per client (PgBouncer before 1.21, or with
    ``max_prepared_statements = 0``), pass ``prepared_statements=False``: the
    pool's statements then go out unnamed, planned on every call.

    Processed requests and their replies are deleted ``retention.window`` seconds
    (a day by default) after their reply, by the runner owning their shard; a retry
    with the same primary key is deduplicated only within that window. ``None``
    keeps every request forever.
    """
    check_prefix(prefix)
    try:
        async with open_first_connection(
            dsn, deadline=connect_deadline, application_name="trio_cluster migrate"
        ) as conn:
            await migrate(conn, prefix)
    except (PgError, OSError) as error:
        raise PersistenceError(f"cannot prepare the schema: {error}") from error
    async with open_pool(
        pool_dsn or dsn,
        size=pool_size,
        application_name="trio_cluster",
        prepared_statements=prepared_statements,
    ) as pool:
        messages = PgMessageStorage(pool, prefix)
        async with messages.writing():
            yield PostgresStorage(
                dsn,
                prefix,
                pool,
                messages,
                timing or LeaseTiming(),
                connect_deadline=connect_deadline,
                retention=retention,
            )
