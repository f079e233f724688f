"""Broadcast on three runner processes over PostgreSQL, with one SIGKILLed mid-broadcast.

The runners are ``tests.postgres.broadcast_app`` processes hosting ``Tally`` (durable
state: the notes each entity was sent); the broadcasts are sent from a client runner
in the test, which hosts nothing, so every delivery crosses to a process. A runner is
SIGKILLed once the broadcast has its first outcomes (deliveries go one or two at a
time, so most are still to come):

- persisted, to every entity with stored state: every entity ends with the note
  exactly once (its owner died, the next owner read its request back), the
  broadcast reports every entity delivered, and running it again with the same
  broadcast id delivers nothing twice;
- volatile, to every resident entity: one outcome per listed entity, every entity
  of a surviving runner delivered, within the deadline;
- a runner message reaches the two live runners, and only those.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from trio_cluster import RESIDENT, STORED, BroadcastOutcome, Runner, open_runner
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import TEST_CONFIG

from ..broadcast_scenarios import Note, Nothing, Tally, note, notes, where, whoami
from .broadcast_app import transport
from .test_cluster_processes import Cluster, Node

ENTITIES = sorted(f"e{number}" for number in range(60))
KILL_AFTER = 5
"""Outcomes before the SIGKILL."""
DEADLINE_S = 30.0


@attrs.define
class World:
    cluster: Cluster
    client: Runner
    nodes: list[Node]


@asynccontextmanager
async def open_world(dsn: str) -> AsyncIterator[World]:
    prefix = f"bcastp_{uuid.uuid4().hex[:8]}_"
    cluster = Cluster(dsn, prefix, app="tests.postgres.broadcast_app")
    try:
        async with open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage:
            nodes = await cluster.start_many(3)
            async with open_runner(
                storage=storage, config=TEST_CONFIG, transport=transport(prefix)
            ) as client:
                with trio.fail_after(DEADLINE_S):
                    while len(set(client.assignment.values())) != 3:
                        await client.changed()
                yield World(cluster, client, nodes)
    finally:
        await cluster.cleanup()


class KillMidway:
    """Counts outcomes; SIGKILLs ``victim`` once ``KILL_AFTER`` have come."""

    def __init__(self, world: World, victim: Node) -> None:
        self.world = world
        self.victim = victim
        self.counts: Counter[str] = Counter()
        self.delivered: set[str] = set()
        self.due = trio.Event()

    def __call__(self, target: str, outcome: BroadcastOutcome[object]) -> None:
        self.counts[target] += 1
        if outcome.ok:
            self.delivered.add(target)
        if sum(self.counts.values()) == KILL_AFTER:
            self.due.set()

    async def kill_when_due(self) -> None:
        await self.due.wait()
        await self.world.cluster.kill(self.victim)


async def owners(client: Runner) -> dict[str, str]:
    return {e: await client.ask(where, e, Nothing()) for e in ENTITIES}


async def test_persisted_broadcast_survives_a_runner_killed_midway(pg_dsn: str) -> None:
    async with open_world(pg_dsn) as world:
        client = world.client
        for entity_id in ENTITIES:
            await client.ask(note, entity_id, Note("x"))
        victim = world.nodes[0]
        assert victim.address in (await owners(client)).values()
        midway = KillMidway(world, victim)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(midway.kill_when_due)
            result = await client.broadcast(
                note,
                Note("b"),
                to=STORED,
                concurrency=2,
                timeout=DEADLINE_S,
                on_outcome=midway,
            )
        assert midway.victim.process.returncode is not None  # it died mid-broadcast
        assert midway.counts == Counter(ENTITIES)
        assert (result.delivered, result.failed, result.complete) == (len(ENTITIES), 0, True)
        again = await client.broadcast(
            note, Note("b"), to=STORED, broadcast_id=result.broadcast_id, timeout=DEADLINE_S
        )
        assert {outcome.unwrap() for outcome in again.outcomes.values()} == {2}
        stored = {e: await client.ask(notes, e, Nothing()) for e in ENTITIES}
        assert stored == {e: ["x", "b"] for e in ENTITIES}  # once each, across the retry
        alive = {node.address for node in world.nodes[1:]}
        runners = await client.broadcast_runners(whoami, Nothing(), timeout=DEADLINE_S)
        assert {a: o.unwrap() for a, o in runners.outcomes.items() if a != client.address} == {
            a: a for a in alive
        }


async def test_volatile_broadcast_with_a_runner_killed_midway(pg_dsn: str) -> None:
    async with open_world(pg_dsn) as world:
        client = world.client
        placed = await owners(client)  # activates every entity: all resident
        victim = world.nodes[1]
        midway = KillMidway(world, victim)
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(midway.kill_when_due)
            result = await client.broadcast(
                where, Nothing(), to=RESIDENT, concurrency=1, timeout=DEADLINE_S, on_outcome=midway
            )
        assert trio.current_time() - began < DEADLINE_S
        assert victim.process.returncode is not None
        assert max(midway.counts.values()) == 1  # one outcome per entity
        with trio.fail_after(DEADLINE_S):
            while victim.address in client.assignment.values():
                await client.changed()
        # Resident throughout on one runner: neither on the dead one nor moved.
        now = {
            e: client.assignment[Tally.shard_of(e, TEST_CONFIG.shards_per_group)] for e in ENTITIES
        }
        surviving = {e for e, owner in placed.items() if owner == now[e]}
        assert surviving <= set(midway.counts) <= set(ENTITIES)
        assert result.delivered + result.failed == len(midway.counts)
        assert surviving <= midway.delivered
