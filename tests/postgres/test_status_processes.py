"""``python -m trio_cluster status`` against a live cluster of runner processes.

Three ``tests.postgres.cluster_app`` processes serve the default group;
persisted requests sent to a group no runner serves wait in storage, a
backlog that stays exactly what was sent. The command, run as a
subprocess, must show the three runners alive, each shard owned as the
runtime's own assignment says, and that backlog; after a SIGKILL, the
killed runner dead and its shards owned by the survivors.

Nothing sleeps to synchronise: the cluster's settling has no event an
outsider can wait on, so it is polled (``read_status``, bounded); the
command is then run once on the settled cluster.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable

import msgspec
import trio

from trio_cluster import Entity, ShardId, open_runner
from trio_cluster.core.assignment import RunnerSpec, assign
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.status import read_status
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.storage.status import ClusterStatus, Totals

from .cluster_app import CONFIG, SHARDS, Post, create_runs
from .test_cluster_processes import ROOT, WAIT_S, Cluster, read_line

POLL_S = 0.05

Parked = Entity("Parked", shard_group="parked")
"""No runner process hosts it: what is sent to it waits in storage."""
park = Parked.rpc("park", Post, int, persisted=True)
PARKED = [f"p{number}" for number in range(7)]


class WithTotals(msgspec.Struct):
    """The document's header numbers (decoding as ClusterStatus ignores them)."""

    totals: Totals


async def status_command(dsn: str, prefix: str, *options: str) -> str:
    """The command's stdout; it must exit 0."""
    argv = [sys.executable, "-m", "trio_cluster", "status", "--dsn", dsn, "--prefix", prefix]
    with trio.fail_after(WAIT_S):
        result = await trio.run_process([*argv, *options], cwd=ROOT, capture_stdout=True)
    return result.stdout.decode()


async def status_json(dsn: str, prefix: str) -> tuple[ClusterStatus, Totals]:
    text = await status_command(dsn, prefix, "--json", "--shards-per-group", str(SHARDS))
    assert text.count("\n") == 1, "one JSON document on one line"
    totals = msgspec.json.decode(text, type=WithTotals).totals
    return msgspec.json.decode(text, type=ClusterStatus), totals


def owners(status: ClusterStatus, group: str) -> dict[int, int | None]:
    (found,) = (g for g in status.groups if g.name == group)
    return {shard.index: shard.owner for shard in found.shards}


def assigned(status: ClusterStatus) -> dict[int, int]:
    """What the runtime's assignment gives the alive runners: default shard -> machine id."""
    alive = [runner for runner in status.runners if runner.alive]
    machine_of = {runner.address: runner.machine_id for runner in alive}
    assignment = assign(
        [ShardId("default", index) for index in range(SHARDS)],
        [RunnerSpec(r.address, r.weight, frozenset(r.groups)) for r in alive],
    )
    return {shard.index: machine_of[address] for shard, address in assignment.items()}


def settled_on(machine_ids: set[int]) -> Callable[[ClusterStatus], bool]:
    """Exactly ``machine_ids`` alive, each holding the shards assigned to it."""

    def check(status: ClusterStatus) -> bool:
        alive = {runner.machine_id for runner in status.runners if runner.alive}
        return alive == machine_ids and owners(status, "default") == assigned(status)

    return check


async def poll(
    conn: Connection, prefix: str, condition: Callable[[ClusterStatus], bool]
) -> ClusterStatus:
    status = None
    with trio.move_on_after(WAIT_S):
        while True:
            status = await read_status(conn, prefix, shards_per_group=SHARDS)
            if condition(status):
                return status
            await trio.sleep(POLL_S)
    raise AssertionError(f"not so within {WAIT_S} s; last seen: {status}")


def check_backlog(status: ClusterStatus) -> None:
    parked = Counter(Parked.shard_of(entity_id, SHARDS).index for entity_id in PARKED)
    (group,) = (g for g in status.groups if g.name == "parked")
    assert {s.index: s.backlog for s in group.shards} == {i: parked[i] for i in range(SHARDS)}
    assert all(s.owner is None and s.epoch is None for s in group.shards)
    assert all((s.oldest_age is None) == (not s.backlog) for s in group.shards)
    assert sum(s.backlog for g in status.groups if g.name != "parked" for s in g.shards) == 0


async def test_the_status_command_follows_a_live_cluster_through_a_kill(pg_dsn: str) -> None:
    prefix = f"status_{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(pg_dsn, prefix)
    try:
        async with open_connection(pg_dsn) as conn:
            # Created once here: the processes creating it at once would race.
            await create_runs(conn, prefix)
            nodes = await cluster.start_many(3)
            # A client that leaves once its tells are stored, so only the nodes stay registered.
            async with (
                open_postgres_storage(pg_dsn, prefix=prefix, pool_size=2) as storage,
                open_runner(storage=storage, config=CONFIG) as client,
            ):
                for entity_id in PARKED:
                    await client.tell(park, entity_id, Post(f"park-{entity_id}", 1))

            await poll(conn, prefix, settled_on({node.machine_id for node in nodes}))
            status, totals = await status_json(pg_dsn, prefix)
            assert totals == Totals(
                runners_alive=3, runners=3, shards_owned=SHARDS, shards=2 * SHARDS, backlog=7
            )
            assert {(r.machine_id, r.address, r.alive) for r in status.runners} == {
                (node.machine_id, node.address, True) for node in nodes
            }
            assert all(r.heartbeat_at is not None for r in status.runners)
            assert owners(status, "default") == assigned(status)
            assert set(owners(status, "default").values()) == {node.machine_id for node in nodes}
            check_backlog(status)

            victim, survivors = nodes[1], [nodes[0], nodes[2]]
            await cluster.kill(victim)
            await poll(conn, prefix, settled_on({node.machine_id for node in survivors}))
            status, totals = await status_json(pg_dsn, prefix)
            assert (totals.runners_alive, totals.runners, totals.shards_owned) == (2, 3, SHARDS)
            assert {r.machine_id: r.alive for r in status.runners} == {
                node.machine_id: node is not victim for node in nodes
            }
            assert set(owners(status, "default").values()) == {n.machine_id for n in survivors}
            check_backlog(status)

            text = await status_command(pg_dsn, prefix, "--shards-per-group", str(SHARDS))
            assert text.splitlines()[0].startswith(
                f"runners 2/3 alive, shards {SHARDS}/{2 * SHARDS} owned, backlog 7 (at "
            )
    finally:
        await cluster.cleanup()


async def test_the_status_command_fails_in_one_line_when_the_database_is_unreachable() -> None:
    argv = [sys.executable, "-m", "trio_cluster", "status", "--dsn", "postgresql://u@127.0.0.1:1/x"]
    with trio.fail_after(WAIT_S):
        result = await trio.run_process(argv, cwd=ROOT, check=False, capture_stderr=True)
    assert result.returncode == 2
    error = result.stderr.decode()
    assert error.startswith("trio_cluster status: cannot read the database: ")
    assert error.count("\n") == 1, "one line, no traceback"


async def test_the_status_command_names_a_prefix_with_no_cluster(pg_dsn: str) -> None:
    argv = [sys.executable, "-m", "trio_cluster", "status", "--dsn", pg_dsn, "--prefix", "none_"]
    with trio.fail_after(WAIT_S):
        result = await trio.run_process(argv, cwd=ROOT, check=False, capture_stderr=True)
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "trio_cluster status: no cluster with table prefix 'none_' in this database\n"
    )


async def test_watching_prints_a_document_per_reading_until_interrupted(pg_dsn: str) -> None:
    prefix = f"status_{uuid.uuid4().hex[:8]}_"
    async with open_postgres_storage(pg_dsn, prefix=prefix, pool_size=1):
        pass  # the schema, and no runner
    argv = [sys.executable, "-m", "trio_cluster", "status", "--dsn", pg_dsn, "--prefix", prefix]
    process = await trio.lowlevel.open_process(
        [*argv, "--json", "--watch", "0.05"], cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        buffer = bytearray()
        with trio.fail_after(WAIT_S):
            lines = [await read_line(process.stdout, buffer) for _ in range(3)]
        for line in lines:
            status = msgspec.json.decode(line, type=ClusterStatus)
            assert (status.runners, status.groups) == ((), ())
        process.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT_S):
            assert await process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()
