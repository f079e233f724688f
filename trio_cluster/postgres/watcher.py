"""Death detection by PostgreSQL's own session end: each host waits on one peer's lock.

A runner's liveness is its machine-id lock, held by its lock connection
(see ``leases``). A runner hosting shards is watched by the live host
before it in machine-id order (see ``ring``; the membership view holds
hosts only, since a client's death moves no shard). The watcher blocks on
a shared lock of the same key on a connection of its own: PostgreSQL
grants it the moment the watched session
ends, however it ended (SIGKILL, a closed socket, the idle-session timeout
of a frozen process). The watcher lets go at once, marks the row dead and
announces it with a membership notice (``membership.mark_dead``), and every
runner re-reads the membership then. Nobody polls ``pg_locks``; a blocked
backend costs PostgreSQL no CPU.

Where this could miss a death, a membership read catches it instead: every
read marks and announces the rows whose lock is gone (a runner that died
while the ring was changing, or whose watcher died with it), and the shard
keeper reads on every membership notice, after every reconnect of its
lock connection, which also listens (``Gap``), and on a slow safety poll
(``ShardingConfig.membership_poll_interval``).

The watcher follows the latest read (``MembershipView``): when its
successor changes it cancels the wait and waits on the new one. After a
death it waits for a read started after that death before waiting again,
so it never waits twice on a lock it just found free. Its connection is
opened only while it has someone to watch, with the lock connection's
keepalives and idle-session timeout (a frozen runner's watcher lets go of
a lock it was granted), and it is a failure boundary: nothing the database
does ends it, it reconnects under backoff.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from ..pgdriver.connection import Connection
from ..pgdriver.errors import PgError
from .leases import RECONNECT, LeaseTiming, open_lock_connection
from .membership import mark_dead
from .ring import successor
from .schema import lock_namespace

log = logging.getLogger("trio_cluster.postgres.watcher")


class MembershipView:
    """The live machine ids of hosts (runners with shard groups) in the latest
    membership read, and when that read started."""

    def __init__(self) -> None:
        self.live: frozenset[int] = frozenset()
        self.read_at = -math.inf
        self._changed = trio.Event()

    def update(self, live: frozenset[int], started: float) -> None:
        """Take a read's outcome, unless a read started later was taken already."""
        if started < self.read_at:
            return
        self.live, self.read_at = live, started
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class PeerWatcher:
    """One runner's watch on its successor's liveness lock."""

    def __init__(
        self,
        *,
        dsn: str,
        prefix: str,
        channel: str,
        timing: LeaseTiming,
        view: MembershipView,
        machine_id: Callable[[], int],
        application_name: str,
    ) -> None:
        self._dsn = dsn
        self._prefix = prefix
        self._channel = channel
        self._timing = timing
        self._view = view
        self._machine_id = machine_id
        self._application_name = application_name

    def _target(self, after: float) -> int | None:
        """Whom to watch, by a read started after ``after``; None: nobody, or no such read."""
        if self._view.read_at <= after:
            return None
        return successor(self._view.live, self._machine_id())

    async def run(self) -> None:
        """Watch for the runner's lifetime (cancel to stop)."""
        delays = RECONNECT.delays()
        after = -math.inf
        while True:
            while self._target(after) is None:
                await self._view.changed()
            try:
                async with open_lock_connection(
                    self._dsn, self._timing, self._application_name
                ) as conn:
                    namespace = await lock_namespace(conn, f"{self._prefix}:runners")
                    delays = RECONNECT.delays()
                    while (target := self._target(after)) is not None:
                        died = await self._wait_for_end(conn, namespace, target)
                        # A wait cancelled as it was granted may hold the lock: let go.
                        await conn.execute("SELECT pg_advisory_unlock_all()")
                        if died:
                            after = trio.current_time()
                            await mark_dead(conn, self._prefix, namespace, self._channel, [target])
                continue  # nobody to watch until the next read: the connection closes
            except* (PgError, OSError) as lost:
                # Grouped: the lock wait runs in a nursery (see _wait_for_end).
                log.warning(
                    "watcher connection of runner %s failed: %s",
                    self._machine_id(),
                    lost.exceptions[0],
                )
            except* Exception as bug:
                # A bug, not the database: reconnect rather than end the runner.
                log.exception("watching runner failed, reconnecting", exc_info=bug)
            await trio.sleep(next(delays))

    async def _wait_for_end(self, conn: Connection, namespace: int, target: int) -> bool:
        """Wait until ``target``'s lock session ends (True) or it is no longer the target."""
        async with trio.open_nursery() as nursery:

            async def retargeted() -> None:
                while self._target(-math.inf) == target:
                    await self._view.changed()
                nursery.cancel_scope.cancel()

            nursery.start_soon(retargeted)
            await conn.execute("SELECT pg_advisory_lock_shared($1, $2)", [namespace, target])
            nursery.cancel_scope.cancel()
            return True
        return False
