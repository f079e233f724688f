"""Broadcast scenarios on three in-process runners over one storage (memory or PostgreSQL).

Each scenario takes a storage factory, so ``tests/test_broadcast.py`` runs them on
``MemoryStorage`` and ``tests/postgres/test_broadcast.py`` on PostgreSQL: the same
assertions on both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgspec
import trio

from trio_cluster import (
    RESIDENT,
    STORED,
    BroadcastOutcome,
    Entity,
    EntityContext,
    MalformedMessage,
    Runner,
    RunnerHandler,
    SendTimeout,
    State,
    Storage,
    TransportConfig,
    open_runner,
)
from trio_cluster.testing import TEST_CONFIG

StorageFactory = Callable[[], AbstractAsyncContextManager[Storage]]


class Note(msgspec.Struct, frozen=True):
    text: str


class Nothing(msgspec.Struct, frozen=True):
    pass


class TallyState(msgspec.Struct):
    notes: list[str] = msgspec.field(default_factory=list)


class Refused(Exception):
    """Declared by ``note``: a note the entity will not take."""


Tally = Entity("Tally")
note = Tally.rpc("note", Note, int, persisted=True, errors=(Refused,))
"""Persisted: appends to the entity's stored notes, answers how many it has."""
where = Tally.rpc("where", Nothing, str)
"""Volatile: answers the runner the entity runs on, changes nothing."""
notes = Tally.rpc("notes", Nothing, list[str])

Node = Entity("Node")
whoami = Node.rpc("whoami", Nothing, str, errors=(Refused,))
"""A runner message: each runner answers its own address."""


class TallyHandler:
    def __init__(self, ctx: EntityContext, state: State[TallyState]) -> None:
        self.ctx = ctx
        self.state = state

    @note.handler
    async def note(self, n: Note) -> int:
        if n.text == "refused":
            raise Refused(self.ctx.address.entity_id)
        self.state.value.notes.append(n.text)
        return len(self.state.value.notes)

    @where.handler
    async def where(self, _: Nothing) -> str:
        return self.ctx.runner_address

    @notes.handler
    async def notes(self, _: Nothing) -> list[str]:
        return self.state.value.notes


TALLIES = Tally.implement(TallyHandler, state=TallyState)


def answering_whoami(address: list[str]) -> RunnerHandler[Nothing, str]:
    async def answer(_: Nothing) -> str:
        return address[0]

    return RunnerHandler(whoami, answer)


class Runners:
    """Three runners hosting Tally over one storage, each in a task of its own so a test
    can make one leave (a graceful handoff) while the others go on."""

    def __init__(self) -> None:
        self.runners: list[Runner] = []
        self._leave: list[trio.Event] = []
        self._left: list[trio.Event] = []

    async def host(
        self,
        storage: Storage,
        handlers: list[RunnerHandler[Nothing, str]],
        address: list[str],
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        leave, left = trio.Event(), trio.Event()
        try:
            async with open_runner(
                TALLIES,
                storage=storage,
                config=TEST_CONFIG,
                transport=TransportConfig(),
                runner_handlers=handlers,
            ) as runner:
                address.append(runner.address)
                self.runners.append(runner)
                self._leave.append(leave)
                self._left.append(left)
                task_status.started()
                await leave.wait()
        finally:
            left.set()

    async def leave(self, runner: Runner) -> None:
        number = self.runners.index(runner)
        self._leave[number].set()
        await self._left[number].wait()


@asynccontextmanager
async def three_runners(storage: Storage, *, with_handler: int = 3) -> AsyncIterator[Runners]:
    """The first ``with_handler`` of the runners answer ``whoami``; yields once all settled."""
    cluster = Runners()
    async with trio.open_nursery() as nursery:
        for number in range(3):
            address: list[str] = []
            handlers = [answering_whoami(address)] if number < with_handler else []
            await nursery.start(cluster.host, storage, handlers, address)
        with trio.fail_after(10):
            for runner in cluster.runners:
                await runner.settled()
        yield cluster
        for runner in list(cluster.runners):
            await cluster.leave(runner)


def owners(runner: Runner) -> dict[str, str]:
    """Each entity's runner, as ``runner`` sees the assignment now."""
    shards = TEST_CONFIG.shards_per_group
    return {e: runner.assignment[Tally.shard_of(e, shards)] for e in IDS}


IDS = sorted(f"t{number}" for number in range(12))


async def runner_broadcast_reaches_every_live_runner(storage: StorageFactory) -> None:
    async with storage() as store, three_runners(store, with_handler=2) as cluster:
        runners = cluster.runners
        result = await runners[0].broadcast_runners(whoami, Nothing())
    addresses = [runner.address for runner in runners]
    assert set(result.outcomes) == set(addresses)
    for address in addresses[:2]:
        assert result.outcomes[address].unwrap() == address
    assert isinstance(result.outcomes[addresses[2]].error, MalformedMessage)  # no handler there
    assert (result.delivered, result.failed) == (2, 1)


async def resident_broadcast_reaches_every_resident_entity_once(storage: StorageFactory) -> None:
    async with storage() as store, three_runners(store) as cluster:
        runners = cluster.runners
        owners = {entity_id: await runners[0].ask(where, entity_id, Nothing()) for entity_id in IDS}
        result = await runners[1].broadcast(where, Nothing(), to=RESIDENT, concurrency=4)
        # Nothing stored: a stored broadcast finds no one.
        empty = await runners[1].broadcast(where, Nothing(), to=STORED)
    assert {entity_id: outcome.unwrap() for entity_id, outcome in result.outcomes.items()} == owners
    assert result.complete
    assert (empty.outcomes, empty.delivered) == ({}, 0)


async def persisted_stored_broadcast_runs_once_per_entity_across_retries(
    storage: StorageFactory,
) -> None:
    async with storage() as store, three_runners(store) as cluster:
        runners = cluster.runners
        for entity_id in IDS:
            await runners[0].ask(note, entity_id, Note(f"first-{entity_id}"))
        await runners[0].ask(where, "resident-only", Nothing())  # resident, nothing stored
        first = await runners[2].broadcast(note, Note("hello"), to=STORED, concurrency=3)
        again = await runners[1].broadcast(
            note, Note("hello"), to=STORED, broadcast_id=first.broadcast_id
        )
        seen: list[BroadcastOutcome[int]] = []
        refused = await runners[0].broadcast(
            note, Note("refused"), to=STORED, on_outcome=lambda _, o: seen.append(o)
        )
        stored = {entity_id: await runners[0].ask(notes, entity_id, Nothing()) for entity_id in IDS}
    assert sorted(first.outcomes) == IDS  # every entity with state; not "resident-only"
    assert all(outcome.unwrap() == 2 for outcome in first.outcomes.values())
    # The retry found every request stored: the stored replies, no second run.
    assert {k: o.unwrap() for k, o in again.outcomes.items()} == dict.fromkeys(IDS, 2)
    assert stored == {entity_id: [f"first-{entity_id}", "hello"] for entity_id in IDS}
    # The declared error is each entity's outcome; on_outcome took them, the result counts.
    assert (refused.outcomes, refused.delivered, refused.failed) == ({}, 0, len(IDS))
    assert all(isinstance(outcome.error, Refused) for outcome in seen)


async def volatile_stored_broadcast_under_a_deadline(storage: StorageFactory) -> None:
    async with storage() as store, three_runners(store) as cluster:
        runners = cluster.runners
        for entity_id in IDS:
            await runners[0].ask(note, entity_id, Note("x"))
        result = await runners[0].broadcast(where, Nothing(), to=STORED, concurrency=1)
        late = await runners[0].broadcast(where, Nothing(), to=STORED, timeout=1e-9)
    assert sorted(result.outcomes) == IDS and result.complete
    assert not late.complete
    assert all(isinstance(o.error, SendTimeout) for o in late.outcomes.values())


async def a_runner_leaving_mid_broadcast(storage: StorageFactory, *, persisted: bool) -> None:
    """A runner leaves once the broadcast is under way (after its first outcome, one
    delivery at a time): every entity still has exactly one outcome and, persisted,
    gets the note exactly once, from whichever runner owns it next."""
    async with storage() as store, three_runners(store) as cluster:
        runners = cluster.runners
        for entity_id in IDS:
            await runners[0].ask(note, entity_id, Note("x"))
        leaving = runners[2]
        before = owners(runners[0])
        under_way = trio.Event()
        outcomes: Counter[str] = Counter()

        def count(entity_id: str, _: BroadcastOutcome[object]) -> None:
            outcomes[entity_id] += 1
            under_way.set()

        async with trio.open_nursery() as nursery:

            async def make_one_leave() -> None:
                await under_way.wait()
                await cluster.leave(leaving)

            nursery.start_soon(make_one_leave)
            if persisted:
                noted = await runners[0].broadcast(
                    note, Note("y"), to=STORED, concurrency=1, on_outcome=count
                )
                summary = (noted.delivered, noted.failed, noted.complete)
            else:
                found = await runners[0].broadcast(
                    where, Nothing(), to=RESIDENT, concurrency=1, on_outcome=count
                )
                summary = (found.delivered, found.failed, found.complete)
        await runners[0].settled()
        after = owners(runners[0])
        stored = {e: await runners[0].ask(notes, e, Nothing()) for e in IDS}
    # Resident throughout on one runner: neither on the one that left nor moved.
    staying = {e for e in IDS if before[e] == after[e] != leaving.address}
    assert max(outcomes.values()) == 1  # none twice
    if persisted:
        assert set(outcomes) == set(IDS)
        assert summary == (len(IDS), 0, True)
        assert stored == {entity_id: ["x", "y"] for entity_id in IDS}
    else:
        # Resident where each runner was asked: an entity of the leaving runner, or
        # of a shard that moved, may have been listed (then delivered to its next
        # owner, or failed) or not (listed before it arrived, or after it went).
        assert staying <= set(outcomes) <= set(IDS)
        assert summary[0] + summary[1] == len(outcomes)
