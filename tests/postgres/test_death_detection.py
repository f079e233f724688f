"""A dead runner is found by PostgreSQL's own session end, not by polling.

Three ``cluster_app`` processes whose safety poll is an hour, so whatever
heals within the test's bound was announced: a SIGKILL (the watcher is
granted the dead session's lock), a SIGSTOP past the lease and a frozen
event loop (the server ends the silent lock session for idleness; the
watcher is granted then), and a PostgreSQL restart (everyone reconnects,
re-registers with a notice, and re-reads the membership after its lock
connection, which also listens, comes back). After a SIGSTOP the resumed runner finds it has
lost everything, registers again and takes its share back.

Checked from outside, in the database: the runners alive (their lock held)
and the shards' locks held exactly as the runtime's assignment gives them.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable

import pytest
import trio

from trio_cluster.pgdriver import open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.storage.status import ClusterStatus

from .cluster_app import POLL_VARIABLE, create_runs
from .test_cluster_processes import Cluster
from .test_status_processes import owners, poll, settled_on

IDLE_SESSION_MS = 1500
ENV = {
    POLL_VARIABLE: "3600",
    "TRIO_CLUSTER_LEASE_HEARTBEAT_INTERVAL": "0.3",
    "TRIO_CLUSTER_LEASE_LIVENESS_TIMEOUT": "0.6",
    "TRIO_CLUSTER_LEASE_KEEPALIVE_IDLE": "1",
    "TRIO_CLUSTER_LEASE_KEEPALIVE_INTERVAL": "1",
    "TRIO_CLUSTER_LEASE_KEEPALIVE_COUNT": "2",
    "TRIO_CLUSTER_LEASE_USER_TIMEOUT_MS": "3000",
    "TRIO_CLUSTER_LEASE_IDLE_SESSION_TIMEOUT_MS": str(IDLE_SESSION_MS),
}
"""No safety poll to speak of; quick leases, so a stopped runner loses its own in 1.5 s."""


def settled_with(count: int) -> Callable[[ClusterStatus], bool]:
    """``count`` runners alive, each holding the shards assigned to it."""

    def check(status: ClusterStatus) -> bool:
        alive = {runner.machine_id for runner in status.runners if runner.alive}
        return len(alive) == count and settled_on(alive)(status)

    return check


@pytest.mark.parametrize("fault", ["kill", "stop", "freeze"])
async def test_a_silent_death_is_announced_and_its_shards_taken_over(
    pg_dsn: str, fault: str
) -> None:
    prefix = f"dd{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(pg_dsn, prefix, env=ENV)
    try:
        async with open_connection(pg_dsn) as conn:
            await create_runs(conn, prefix)  # before the apps, which would race creating it
            nodes = await cluster.start_many(3)
            ids = {node.machine_id for node in nodes}
            await poll(conn, prefix, settled_on(ids))
            victim = nodes[1]
            survivors = ids - {victim.machine_id}
            if fault == "kill":
                await cluster.kill(victim)
            elif fault == "stop":
                victim.process.send_signal(signal.SIGSTOP)
            else:
                victim.process.send_signal(signal.SIGUSR1)
            # The survivors take its shards while it is dead, stopped or frozen.
            status = await poll(conn, prefix, settled_on(survivors))
            assert victim.machine_id not in owners(status, "default").values()
            if fault == "stop":
                # Resumed, it finds its session gone, registers again and takes its share.
                victim.process.send_signal(signal.SIGCONT)
                await poll(conn, prefix, settled_with(3))
    finally:
        await cluster.cleanup()


async def test_a_postgres_restart_heals_without_the_safety_poll(
    own_pg_server: ThrowawayPostgres,
) -> None:
    prefix = f"dd{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(own_pg_server.dsn, prefix, env=ENV)
    try:
        async with open_connection(own_pg_server.dsn) as conn:
            await create_runs(conn, prefix)  # before the apps, which would race creating it
            nodes = await cluster.start_many(3)
            await poll(conn, prefix, settled_on({node.machine_id for node in nodes}))
        await trio.to_thread.run_sync(own_pg_server.restart)
        async with open_connection(own_pg_server.dsn) as conn:
            await poll(conn, prefix, settled_with(3))
        assert all(node.process.returncode is None for node in nodes)
    finally:
        await cluster.cleanup()
