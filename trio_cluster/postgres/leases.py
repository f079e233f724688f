"""Runner registration, shard leases and notices: one dedicated connection.

Why one connection, used by nothing else: a session advisory lock lives
exactly as long as its backend, so whoever holds the connection holds the
leases, and the connection's death is the leases' death. The pool never
touches it, so no borrowed connection can leak or re-enter a lock.

The same connection LISTENs for the runner's notices: they are read while
it is idle, between its short statements, so they cost the runner no
connection of its own, and a frozen runner, whose lock session the server
ends (``idle_session_timeout``), cannot hold back the server's notification
queue for long either. A reconnect sends every follower a ``Gap``.

How loss is noticed:
- the socket is read while idle, by the task waiting for notices: a
  terminated backend is seen within milliseconds;
- a heartbeat must complete within ``liveness_timeout``: a wedged or
  partitioned connection cannot answer, so it is declared lost after that
  bound, without waiting on the wedged connection itself;
- TCP keepalives and a user timeout on both ends bound how long the server
  keeps a partitioned holder's locks.
On loss every lease is reported lost at once (the runner stops those
shards' entities), then the session reconnects and re-registers, keeping
its machine id when it is still free.

Because a window between losing a lease and noticing it always exists,
completing a message is fenced by the shard's epoch (see ``messages``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Self

import attrs
import trio

from ..config import LEASE_ENV_PREFIX, load_env, load_mapping, unstructure
from ..core.assignment import RunnerSpec
from ..core.hashing import ShardId
from ..core.retry import RetryPolicy
from ..core.snowflake import MACHINE_IDS
from ..core.validation import number
from ..errors import ClusterError, PersistenceError
from ..pgdriver.connection import Connection, Notification, open_connection
from ..pgdriver.errors import ConnectionLost, PgError
from ..pgdriver.pool import Pool
from ..storage.base import Gap, Lease, Notice, Triage
from ..storage.notices import Followers
from .boundary import translated
from .messages import reply_channel
from .schema import lock_namespace

log = logging.getLogger("trio_cluster.postgres.leases")

ACQUIRE_BATCH = 1_000
"""Shards one acquiring statement try-locks at most: a bounded statement and lock count."""
REPLY_IDS = 8
"""Most machine ids whose reply channels a runner listens on: it keeps listening on
the ids it had before a reconnect gave it another (a request stored under one waits
for its reply there), up to this many."""
RECONNECT = RetryPolicy(base_delay=0.05, max_delay=1.0, max_attempts=2**62, max_elapsed=2.0**62)


@attrs.frozen
class LeaseTiming:
    """How fast a lost lock connection is given up, on our side and the server's.

    The client declares loss at most ``heartbeat_interval +
    liveness_timeout`` after its connection stops answering; the server drops a
    silent client after about ``keepalive_idle + keepalive_interval *
    keepalive_count`` seconds (or ``user_timeout_ms``), and only then frees
    the locks. Keep the server's bound the larger, so a partitioned holder
    stops its entities before anyone else can take its shards.

    A frozen process (SIGSTOP, a stalled VM) still answers TCP keepalives
    from its kernel, so the server also ends a lock session that has not
    sent its heartbeat for ``idle_session_timeout_ms``; the holder, if it
    ever runs again, finds its connection closed, and its late replies are
    refused by the epoch fence.
    """

    heartbeat_interval: float = attrs.field(
        default=1.0, validator=number(minimum=0, inclusive=False)
    )
    liveness_timeout: float = attrs.field(default=2.0, validator=number(minimum=0, inclusive=False))
    keepalive_idle: int = attrs.field(default=2, validator=number(minimum=1, integer=True))
    keepalive_interval: int = attrs.field(default=1, validator=number(minimum=1, integer=True))
    keepalive_count: int = attrs.field(default=3, validator=number(minimum=1, integer=True))
    user_timeout_ms: int = attrs.field(default=5000, validator=number(minimum=1, integer=True))
    idle_session_timeout_ms: int = attrs.field(
        default=5000, validator=number(minimum=0, integer=True)
    )
    """0 leaves the server's setting (usually: no timeout)."""
    pool_unreachable_timeout: float = attrs.field(
        default=10.0, validator=number(minimum=0, inclusive=False)
    )
    """How long the storage's pool may fail to open any connection (the server at
    ``max_connections``, a pooler down) before the runner leaves the membership: it
    cannot serve its shards, so it lets others take them, and joins again once the
    pool connects."""

    def __attrs_post_init__(self) -> None:
        if 0 < self.idle_session_timeout_ms <= 1000 * self.heartbeat_interval:
            raise ValueError(
                "idle_session_timeout_ms: must exceed heartbeat_interval, or the server ends"
                f" the lock session between two heartbeats (got {self.idle_session_timeout_ms})"
            )

    @property
    def held_for_sure(self) -> float:
        """Seconds after the lock connection last answered during which its locks are
        surely still held: the runner's own bound on declaring them lost, or the
        server's on freeing them, whichever is sooner (an operator terminating the
        backend aside)."""
        server = [
            self.user_timeout_ms / 1000,
            self.keepalive_idle + self.keepalive_interval * self.keepalive_count,
        ]
        if self.idle_session_timeout_ms:
            server.append(self.idle_session_timeout_ms / 1000)
        return min(self.heartbeat_interval + self.liveness_timeout, *server)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Load from plain data; same rules as ``ShardingConfig.from_mapping``."""
        return load_mapping(cls, data)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, prefix: str = LEASE_ENV_PREFIX
    ) -> Self:
        """Load from ``TRIO_CLUSTER_LEASE_<FIELD>`` variables; rules of ``ShardingConfig``."""
        return load_env(cls, environ, prefix)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data that ``from_mapping`` accepts back."""
        return unstructure(self)


@asynccontextmanager
async def open_lock_connection(
    dsn: str, timing: LeaseTiming, application_name: str
) -> AsyncIterator[Connection]:
    """A connection whose loss both ends bound by ``timing``: the lock connection, the watcher's."""
    async with open_connection(
        dsn,
        keepalives_idle_s=timing.keepalive_idle,
        keepalives_interval_s=timing.keepalive_interval,
        keepalives_count=timing.keepalive_count,
        tcp_user_timeout_ms=timing.user_timeout_ms,
        application_name=application_name[:63],
    ) as conn:
        # The server's side of the same bound: it drops a silent holder,
        # and with it the locks, within seconds rather than hours.
        await conn.execute_script(
            f"SET tcp_keepalives_idle = {timing.keepalive_idle};"
            f"SET tcp_keepalives_interval = {timing.keepalive_interval};"
            f"SET tcp_keepalives_count = {timing.keepalive_count};"
            f"SET tcp_user_timeout = {timing.user_timeout_ms};"
            f"SET idle_session_timeout = {timing.idle_session_timeout_ms};"
        )
        yield conn


def _indices_by_group(shards: Iterable[ShardId]) -> dict[str, list[int]]:
    """Shard indices per group, in order: one lock statement per group."""
    by_group: dict[str, list[int]] = {}
    for shard in shards:
        by_group.setdefault(shard.group, []).append(shard.index)
    return by_group


@attrs.define
class _Unlocks:
    """Releases waiting for one unlock statement, and its end."""

    shards: list[ShardId] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)


class PgLeaseSession:
    """The registration of one runner and the shard leases it holds."""

    def __init__(
        self,
        dsn: str,
        prefix: str,
        spec: RunnerSpec,
        *,
        on_lease_lost: Callable[[ShardId], None],
        timing: LeaseTiming,
        channel: str,
        parse_notification: Callable[[str], list[Notice]],
        pool: Pool,
        register_deadline: float | None = 0,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._parse_notification = parse_notification
        self._followers = Followers()
        self._prefix = prefix
        self._spec = spec
        self._channel = channel
        self._on_lease_lost = on_lease_lost
        self._timing = timing
        self._held_for_sure = timing.held_for_sure
        """Read before every handler starts (``confirmed``): computed once."""
        self._register_deadline = register_deadline
        self._conn: Connection | None = None
        self._machine_id = -1
        self._reply_ids: list[int] = []
        """The machine ids this runner registered under, newest last: replies to the
        requests it stored are announced on those ids' channels (see ``messages``), so
        it listens on each, for as long as requests stored under them may wait."""
        self._held: dict[ShardId, Lease] = {}
        self._unlocks = _Unlocks()
        """Released shards whose locks the unlock task lets go of next (see ``release``)."""
        self._unlocks_wanted = trio.Event()
        self._namespaces: dict[str, int] = {}
        self._registered = trio.Event()
        self._answered = -math.inf
        """When the last statement that the lock connection answered was sent."""
        self._news = trio.Event()
        """Set, and replaced, whenever ``_answered`` moves or the leases are lost: what
        ``confirmed`` waits on."""

    @property
    def machine_id(self) -> int:
        return self._machine_id

    async def wait_registered(self) -> None:
        """Return once the lock connection is up and the runner registered on it."""
        await self._registered.wait()

    def held(self) -> list[Lease]:
        """The leases held now (the shards whose processed requests this runner purges)."""
        return list(self._held.values())

    def surely_holds(self, shard: ShardId) -> bool:
        """Whether ``shard``'s lease is held and provably still ours: the lock connection
        answered within ``LeaseTiming.held_for_sure``. A runner that was frozen (SIGSTOP,
        a stalled VM) past that no longer knows, whatever ``held`` still says."""
        recent = trio.current_time() - self._answered < self._held_for_sure
        return recent and shard in self._held

    async def confirmed(self, shard: ShardId) -> None:
        """Return once ``surely_holds(shard)``, or once the lease is gone: at once in the
        common case, else at the lock connection's next answer (or its loss)."""
        while not self.surely_holds(shard) and shard in self._held:
            await self._news.wait()

    def _answered_at(self, sent: float) -> None:
        self._answered = sent
        self._publish()

    def _publish(self) -> None:
        self._news.set()
        self._news = trio.Event()

    @property
    def backend_pid(self) -> int | None:
        """The lock connection's server process, for operators and tests."""
        return None if self._conn is None else self._conn.backend_pid

    # -- the lock connection's lifecycle --------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the lock connection; on loss report every lease lost and reconnect.

        The lock session is a failure boundary: once registered, nothing the
        database or the network does ends this task (and so the runner). The
        connection ending at any moment, a heartbeat in flight included, loses
        every lease and reconnects under backoff.
        """
        delays = RECONNECT.delays()
        first = True
        deadline = self._register_deadline
        give_up_at = math.inf if deadline is None else trio.current_time() + deadline
        while True:
            failure: BaseException | None = None
            try:
                await self._check_pool()
                async with self._connect() as conn:
                    await self._listen_and_register(conn, reconnected=not first)
                    self._conn = conn
                    self._registered.set()
                    if first:
                        task_status.started()
                        first = False
                    delays = RECONNECT.delays()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._heartbeat, conn)
                        nursery.start_soon(self._unlock_released, conn)
                        nursery.start_soon(self._watch_pool, conn)
                        # The follower reads the idle socket itself, so it sees the
                        # connection end too, and a notice wakes one task, not two.
                        await self._follow_notices(conn)
                        nursery.cancel_scope.cancel()
            except* (PgError, OSError, ClusterError) as lost:
                failure = lost.exceptions[0]
                if not first:
                    log.warning(
                        "lock connection of runner %s failed: %s", self._machine_id, failure
                    )
            except* Exception as bug:
                failure = bug
                log.exception("lock session of runner %s failed", self._machine_id, exc_info=bug)
            finally:
                self._conn = None
                if self._registered.is_set():
                    self._registered = trio.Event()
                # The locks of releases still queued ended with the session.
                self._unlocks.done.set()
                self._unlocks = _Unlocks()
                self._lose_all()
            delay = next(delays)
            if first and failure is not None:
                # Not registered yet: wait for the database up to the storage's
                # connect deadline; a bug is not waited on.
                if not isinstance(failure, PgError | OSError | ClusterError) or (
                    trio.current_time() + delay > give_up_at
                ):
                    raise PersistenceError(f"cannot register runner: {failure}") from failure
                log.warning(
                    "cannot register runner %s yet: %s; retrying in %.1f s",
                    self._spec.address,
                    " ".join(str(failure).split()),
                    delay,
                )
            await trio.sleep(delay)

    async def _check_pool(self) -> None:
        """A runner whose pool cannot connect could hold shards, not serve them."""
        failure = await self._pool_failure()
        if failure is not None:
            raise PersistenceError(f"the pool cannot connect: {failure}")

    async def _listen_and_register(self, conn: Connection, *, reconnected: bool) -> None:
        # Before registering: no notice about this runner's shards can be sent
        # before it listens. Before the gap: the replies it re-reads either are
        # stored already or will be heard.
        await conn.listen(self._channel)
        for machine_id in self._reply_ids:
            await conn.listen(reply_channel(self._prefix, machine_id))
        if reconnected:
            self._followers.send(Gap())
        sent = trio.current_time()
        await self._register(conn)
        self._answered_at(sent)

    def notices(
        self, triage: Triage | None = None
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Notice]]:
        """What the lock connection hears, for as long as the ``async with`` lasts."""
        return self._followers.follow(triage)

    async def _follow_notices(self, conn: Connection) -> None:
        """Pass each notification on, until the connection is lost or closed."""
        with contextlib.suppress(ConnectionLost):
            await conn.follow_notifications(self._pass_on)

    def _pass_on(self, notification: Notification) -> None:
        try:
            notices = self._parse_notification(notification.payload)
        except Exception:
            # A bug, not the database: this notification is lost, not the session.
            log.exception("reading notification %r failed", notification.payload[:200])
            notices = [Gap()]
        for notice in notices:
            self._followers.send(notice)

    def _connect(self) -> AbstractAsyncContextManager[Connection]:
        return open_lock_connection(
            self._dsn, self._timing, f"trio_cluster lock {self._spec.address}"
        )

    async def _register(self, conn: Connection) -> None:
        """Take a machine id (the previous one if still free) under a session lock."""
        namespace = await self._namespace(conn, "runners")
        candidate: int | None = None
        if self._machine_id >= 0 and await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", [namespace, self._machine_id]
        ):
            candidate = self._machine_id
        else:
            # The lowest free id, locked by the statement that finds it: the scan
            # stops at the first try-lock that succeeds (LIMIT 1), a failed one costs
            # about a microsecond, and nothing reads pg_locks, which copies every
            # lock on the server.
            found = await conn.fetchval(
                "SELECT g FROM generate_series(0, $2::int - 1) AS g"
                " WHERE pg_try_advisory_lock($1, g) LIMIT 1",
                [namespace, MACHINE_IDS],
            )
            candidate = None if found is None else int(found)
        if candidate is None:
            raise PersistenceError(f"no free machine id among {MACHINE_IDS}")
        if self._machine_id not in (-1, candidate):
            log.warning("runner %s re-registered as machine %s", self._machine_id, candidate)
        if candidate not in self._reply_ids:
            # Before any request can be stored under it (see ``machine_id``).
            await conn.listen(reply_channel(self._prefix, candidate))
            self._reply_ids = [*self._reply_ids[1 - REPLY_IDS :], candidate]
        self._machine_id = candidate
        spec = self._spec
        await conn.execute(
            f"WITH r AS (INSERT INTO {self._prefix}runners"
            " (machine_id, address, lock_pid, weight, groups)"
            " VALUES ($1, $2, pg_backend_pid(), $3, $4) ON CONFLICT (machine_id) DO UPDATE"
            " SET address = excluded.address, lock_pid = excluded.lock_pid,"
            " weight = excluded.weight, groups = excluded.groups,"
            " registered_at = now(), heartbeat_at = now() RETURNING 1)"
            " SELECT pg_notify($5, 'm:') FROM r",
            [
                candidate,
                spec.address,
                float(spec.weight),
                ",".join(sorted(spec.groups)),
                self._channel,
            ],
        )

    async def _heartbeat(self, conn: Connection) -> None:
        """Prove the connection answers in bounded time; close it when it does not."""
        timing = self._timing
        while True:
            await trio.sleep(timing.heartbeat_interval)
            sent = trio.current_time()
            with trio.move_on_after(timing.liveness_timeout) as deadline:
                # An empty query: one round trip that runs no statement and writes
                # nothing, yet proves the connection answers and resets the
                # server's idle-session timeout.
                await conn.execute_script("")
                self._answered_at(sent)
            if deadline.cancelled_caught:
                log.error(
                    "lock connection silent for %s s: giving up its leases", timing.liveness_timeout
                )
                conn.close()
                return

    async def _pool_failure(self) -> str | None:
        """None if the pool has, or opens within ``liveness_timeout``, a connection;
        else why not."""
        with trio.move_on_after(self._timing.liveness_timeout):
            try:
                await self._pool.check()
            except (PgError, OSError) as error:
                return str(error)
            return None
        return f"no connection within {self._timing.liveness_timeout} s"

    async def _watch_pool(self, conn: Connection) -> None:
        """Close the lock connection, leaving the membership, once the pool has been
        unreachable for ``pool_unreachable_timeout`` and still cannot connect.

        A task of its own, so a probe never delays a heartbeat."""
        timing = self._timing
        while True:
            await trio.sleep(timing.heartbeat_interval)
            if self._pool.unreachable_for() <= timing.pool_unreachable_timeout:
                continue
            failure = await self._pool_failure()
            if failure is not None:
                log.error(
                    "runner %s: no pooled connection for %.1f s (%s): leaving the membership"
                    " until the pool connects again",
                    self._machine_id,
                    self._pool.unreachable_for(),
                    failure,
                )
                conn.close()
                return

    def _lose_all(self) -> None:
        held, self._held = self._held, {}
        for shard in held:
            try:
                self._on_lease_lost(shard)
            except Exception:
                log.exception("reporting the loss of %s failed", shard)
        self._publish()

    async def _namespace(self, conn: Connection, name: str) -> int:
        number = self._namespaces.get(name)
        if number is None:
            number = self._namespaces[name] = await lock_namespace(conn, f"{self._prefix}:{name}")
        return number

    # -- leases ---------------------------------------------------------------

    def _connection(self) -> Connection:
        if self._conn is None:
            raise PersistenceError("the lock connection is down; reconnecting")
        return self._conn

    async def acquire(self, shard: ShardId) -> Lease | None:
        leases = await self.acquire_many([shard])
        return leases[0] if leases else None

    async def acquire_many(self, shards: Sequence[ShardId]) -> list[Lease]:
        """One statement per group and ``ACQUIRE_BATCH`` shards: try-lock each, and bump
        the epoch of those it locked (a shard another runner holds is left out, and so
        are the rest once a statement fails after some were taken)."""
        conn = self._connection()
        leases: list[Lease] = []
        # One still held (its release not yet asked for) is left out: taking its
        # lock again would count twice, and one release would not let it go.
        by_group = _indices_by_group(shard for shard in shards if shard not in self._held)
        batches = [
            (group, indices[at : at + ACQUIRE_BATCH])
            for group, indices in by_group.items()
            for at in range(0, len(indices), ACQUIRE_BATCH)
        ]
        for group, batch in batches:
            try:
                with translated("acquire %s shards of %s", len(batch), group):
                    namespace = await self._namespace(conn, f"group:{group}")
                    rows = await self._lock_and_bump(conn, namespace, group, batch)
            except ClusterError:
                if not leases:
                    raise
                # What was taken is held: return it; the rest, left out, is tried again.
                log.warning("acquiring the shards of %s failed after %d", group, len(leases))
                break
            for index, epoch in rows:
                lease = Lease(ShardId(group, int(index)), self._machine_id, int(epoch))
                self._held[lease.shard] = lease
                leases.append(lease)
        # Not those reported lost already (the connection ended between two statements).
        return [lease for lease in leases if self._held.get(lease.shard) == lease]

    async def _lock_and_bump(
        self, conn: Connection, namespace: int, group: str, indices: list[int]
    ) -> list[tuple[Any, ...]]:
        """The statement of :meth:`acquire_many`, atomic for the epochs: should it fail,
        the session locks it took (they outlive the failed transaction) are let go."""
        wanted = ",".join(map(str, indices))
        try:
            return await conn.fetch(
                "WITH locked AS MATERIALIZED (SELECT i FROM"
                " unnest(string_to_array($2, ',')::int[]) AS i"
                " WHERE pg_try_advisory_lock($1, i))"
                f" INSERT INTO {self._prefix}shards AS s"
                " (shard_group, shard_index, epoch, machine_id)"
                " SELECT $3, i, 1, $4 FROM locked"
                " ON CONFLICT (shard_group, shard_index) DO UPDATE"
                " SET epoch = s.epoch + 1, machine_id = $4, acquired_at = now()"
                " RETURNING shard_index, epoch",
                [namespace, wanted, group, self._machine_id],
            )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await conn.execute(
                    "SELECT pg_advisory_unlock($1, l.objid::int) FROM pg_locks AS l"
                    " WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid()"
                    " AND l.objsubid = 2 AND l.classid = $1::int::oid"
                    " AND l.objid::int = ANY (string_to_array($2, ',')::int[])",
                    [namespace, wanted],
                )
            raise

    async def release(self, lease: Lease) -> None:
        """Let go of ``lease``'s lock, in the unlock task's next statement (one for all
        the releases asked for meanwhile: a handoff releases hundreds at once)."""
        if self._held.get(lease.shard) != lease:
            return
        self._connection()  # down: the lock went with the session
        del self._held[lease.shard]
        unlocks = self._unlocks
        unlocks.shards.append(lease.shard)
        self._unlocks_wanted.set()
        await unlocks.done.wait()

    async def _unlock_released(self, conn: Connection) -> None:
        """The lock connection's releases, a batch at a time. A failure ends the
        connection (and the batch's locks with it), so every batch ends released."""
        while True:
            await self._unlocks_wanted.wait()
            self._unlocks_wanted = trio.Event()
            unlocks, self._unlocks = self._unlocks, _Unlocks()
            try:
                for group, indices in _indices_by_group(unlocks.shards).items():
                    with translated("release %s shards of %s", len(indices), group):
                        namespace = await self._namespace(conn, f"group:{group}")
                        await conn.execute(
                            "SELECT pg_advisory_unlock($1, i)"
                            " FROM unnest(string_to_array($2, ',')::int[]) AS i",
                            [namespace, ",".join(map(str, indices))],
                        )
            except BaseException:
                conn.close()
                raise
            finally:
                unlocks.done.set()

    async def leave(self) -> None:
        """Drop out of the live runners (the machine-id lock stays until the end)."""
        await self.unregister()

    async def unregister(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.execute(
                f"WITH r AS (DELETE FROM {self._prefix}runners"
                " WHERE machine_id = $1 AND lock_pid = pg_backend_pid() RETURNING 1)"
                " SELECT pg_notify($2, 'm:') FROM r",
                [self._machine_id, self._channel],
            )
        except (PgError, OSError) as error:
            log.warning("could not unregister runner %s: %s", self._machine_id, error)
