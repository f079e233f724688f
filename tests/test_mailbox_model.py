"""A hypothesis stateful model of mailboxes, redelivery and dedup, against a real runner.

Hypothesis drives a runner (on MemoryStorage, in a Trio loop of its own
thread) with any sequence of: volatile and persisted tells (persisted ones
keyed, with duplicates), a gate that holds handlers mid-run so mailboxes
fill, lost leases (as a dropped lock connection would lose them), and more
entities than may be resident, so the cap passivates. After every step the
runner is let run until nothing can run; then the model's invariants are
checked against what the handlers recorded:

- a volatile request refused (MailboxFull) never runs; an accepted one runs
  at most once;
- a persisted key never starts again once its reply is stored (dedup), and
  starts again only when a lease was lost while it was unanswered;
- each entity's persisted keys first start in the order they were sent;
- at the end, with the gate open, every acknowledged persisted key has run
  to completion and has its reply stored.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
import msgspec
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_cluster import Entity, EntityContext, EntityOptions, MailboxFull, Runner, open_runner
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import ShardId
from trio_cluster.storage import Gap, MemoryStorage
from trio_cluster.testing import TEST_CONFIG

T = TypeVar("T")

ENTITIES = [f"e{n}" for n in range(4)]
KEYS = [f"k{n}" for n in range(6)]
CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=2, max_resident_entities=2)


class Step(msgspec.Struct, frozen=True):
    label: str


Model = Entity("Model")
volatile = Model.rpc("volatile", Step, str)
persisted = Model.rpc("persisted", Step, str, persisted=True, primary_key=lambda s: s.label)


class Record:
    """What handlers did, in order; written only from the runner's thread."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.starts: list[tuple[str, str]] = []
        self.completions: list[tuple[str, str]] = []


class ModelHandler:
    record: ClassVar[Record]

    def __init__(self, ctx: EntityContext) -> None:
        self.entity_id = ctx.address.entity_id

    async def _run(self, step: Step) -> str:
        self.record.starts.append((self.entity_id, step.label))
        await self.record.gate.wait()
        self.record.completions.append((self.entity_id, step.label))
        return step.label

    @volatile.handler
    async def volatile(self, step: Step) -> str:
        return await self._run(step)

    @persisted.handler
    async def persisted(self, step: Step) -> str:
        return await self._run(step)


class SlowReads(MemoryStorage):
    """Reads that return their snapshot ``read_delay`` scheduler passes late.

    Storage reads are snapshots; a slow one can hold requests that completed
    while it was in flight. Widening that window is how the model reaches the
    races that a real database's latency opens.
    """

    read_delay = 0

    async def _late(self, found: list[Envelope]) -> list[Envelope]:
        for _ in range(self.read_delay):
            await trio.lowlevel.checkpoint()
        return found

    async def unprocessed(self, shard: ShardId, **kwargs: Any) -> list[Envelope]:
        return await self._late(await super().unprocessed(shard, **kwargs))

    async def fetch(self, shard: ShardId, request_ids: Sequence[int]) -> list[Envelope]:
        return await self._late(await super().fetch(shard, request_ids))

    def gap(self) -> None:
        """Tell every follower it may have missed notices (its buffer overflowed, say)."""
        self._announce(Gap())


class Loop:
    """A runner in a Trio loop of its own thread; steps run in it one at a time."""

    def __init__(self, record: Record) -> None:
        self.storage = SlowReads()
        self.record = record
        self.runner: Runner | None = None
        self.client: Runner | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait()

    async def _main(self) -> None:
        handler = type("RecordedModel", (ModelHandler,), {"record": self.record})
        implementation = Model.implement(handler, EntityOptions(mailbox_capacity=2))
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with (
            open_runner(implementation, storage=self.storage, config=CONFIG) as runner,
            # Hosts nothing: what it stores reaches the owner by notice, not directly.
            open_runner(storage=self.storage, config=CONFIG) as client,
        ):
            self.runner, self.client = runner, client
            self._ready.set()
            await self._stop.wait()
            self.record.gate.set()

    def run(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` in the loop, then let the runner run until nothing can."""

        async def settled() -> T:
            result = await step()
            await trio.testing.wait_all_tasks_blocked()
            return result

        return trio.from_thread.run(settled, trio_token=self._token)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


@settings(stateful_step_count=20, max_examples=40, deadline=None)
class MailboxModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.record = Record()
        self.loop = Loop(self.record)
        self.serial = 0
        self.accepted: set[tuple[str, str]] = set()
        self.refused: set[tuple[str, str]] = set()
        self.sent: defaultdict[str, list[str]] = defaultdict(list)
        """Per entity, its persisted keys in the order first sent."""
        self.answered: set[tuple[str, str]] = set()
        """Persisted (entity, key) whose reply was stored, as far as the model knows."""
        self.may_rerun: set[tuple[str, str]] = set()

    @property
    def runner(self) -> Runner:
        assert self.loop.runner is not None
        return self.loop.runner

    def sender(self, via_client: bool) -> Runner:
        assert self.loop.client is not None
        return self.loop.client if via_client else self.runner

    def _label(self) -> str:
        self.serial += 1
        return f"v{self.serial}"

    @rule(entity=st.sampled_from(ENTITIES))
    def tell_volatile(self, entity: str) -> None:
        label = self._label()

        async def tell() -> bool:
            try:
                await self.runner.tell(volatile, entity, Step(label))
            except MailboxFull:
                return False
            return True

        (self.accepted if self.loop.run(tell) else self.refused).add((entity, label))

    @rule(entity=st.sampled_from(ENTITIES), key=st.sampled_from(KEYS), via_client=st.booleans())
    def tell_persisted(self, entity: str, key: str, via_client: bool) -> None:
        self.loop.run(lambda: self.sender(via_client).tell(persisted, entity, Step(key)))
        if key not in self.sent[entity]:
            self.sent[entity].append(key)

    @rule(
        actions=st.lists(
            st.tuples(
                st.sampled_from(
                    ["volatile", "persisted", "persisted via client", "lose", "open", "gap"]
                ),
                st.sampled_from(ENTITIES),
                st.sampled_from(KEYS),
                st.integers(0, 8),
            ),
            min_size=2,
            max_size=8,
        )
    )
    def burst(self, actions: list[tuple[str, str, str, int]]) -> None:
        """Several of the above at once, each after a few yields: the races between them."""
        outcomes: list[tuple[str, str, bool]] = []
        # One entity's persisted sends go out in order, from one sender: order is
        # guaranteed per sender, and concurrent senders have none between them.
        in_order: defaultdict[str, list[str]] = defaultdict(list)
        for kind, entity, key, _ in actions:
            if kind.startswith("persisted"):
                in_order[entity].append(key)
                if key not in self.sent[entity]:
                    self.sent[entity].append(key)
        for kind, entity, _, _ in actions:
            if kind == "lose":
                self._unanswered_may_rerun(Model.shard_of(entity, CONFIG.shards_per_group))

        async def one(kind: str, entity: str, key: str, yields: int) -> None:
            for _ in range(yields):
                await trio.lowlevel.checkpoint()
            if kind == "volatile":
                label = self._label()
                try:
                    await self.runner.tell(volatile, entity, Step(label))
                except MailboxFull:
                    outcomes.append((entity, label, False))
                else:
                    outcomes.append((entity, label, True))
            elif kind in ("persisted", "persisted via client"):
                for each in in_order.pop(entity, []):
                    await self.sender(kind != "persisted").tell(persisted, entity, Step(each))
            elif kind == "lose":
                self.loop.storage.revoke(Model.shard_of(entity, CONFIG.shards_per_group))
            elif kind == "gap":
                self.loop.storage.gap()
            else:
                self.record.gate.set()

        async def all_at_once() -> None:
            async with trio.open_nursery() as nursery:
                for action in actions:
                    nursery.start_soon(one, *action)

        self.loop.run(all_at_once)
        for entity, label, accepted in outcomes:
            (self.accepted if accepted else self.refused).add((entity, label))
        self._note_answers()

    @rule(delay=st.integers(0, 6))
    def slow_down_reads(self, delay: int) -> None:
        self.loop.storage.read_delay = delay

    @rule()
    def open_gate(self) -> None:
        async def open_() -> None:
            self.record.gate.set()

        self.loop.run(open_)
        self._note_answers()

    @precondition(lambda self: self.record.gate.is_set())
    @rule()
    def close_gate(self) -> None:
        async def close() -> None:
            self.record.gate = trio.Event()

        self.loop.run(close)

    @rule(shard=st.integers(0, CONFIG.shards_per_group - 1))
    def lose_lease(self, shard: int) -> None:
        shard_id = ShardId("default", shard)

        async def revoke() -> None:
            self.loop.storage.revoke(shard_id)

        self._unanswered_may_rerun(shard_id)
        self.loop.run(revoke)
        self._note_answers()

    def _unanswered_may_rerun(self, shard_id: ShardId) -> None:
        """Whatever is unanswered in a shard whose lease is lost may start again."""
        for entity, keys in self.sent.items():
            if Model.shard_of(entity, CONFIG.shards_per_group) == shard_id:
                self.may_rerun |= {(entity, k) for k in keys if (entity, k) not in self.answered}

    def _note_answers(self) -> None:
        """Learn which sent keys have their reply stored: completed, and unprocessed no more."""

        async def unanswered() -> set[tuple[str, str]]:
            pending: set[tuple[str, str]] = set()
            for shard in range(CONFIG.shards_per_group):
                stored = await self.loop.storage.unprocessed(ShardId("default", shard))
                pending |= {
                    (e.entity_id, msgspec.msgpack.decode(e.payload, type=Step).label)
                    for e in stored
                }
            return pending

        pending = self.loop.run(unanswered)
        completed = set(self.record.completions)
        for entity, keys in self.sent.items():
            self.answered |= {
                (entity, key)
                for key in keys
                if (entity, key) in completed and (entity, key) not in pending
            }

    @invariant()
    def refused_volatile_requests_never_run(self) -> None:
        started = set(self.record.starts)
        assert not (self.refused & started)
        volatile_starts = [s for s in self.record.starts if s[1].startswith("v")]
        assert len(volatile_starts) == len(set(volatile_starts))

    @invariant()
    def persisted_keys_start_again_only_after_a_lost_lease(self) -> None:
        counts: defaultdict[tuple[str, str], int] = defaultdict(int)
        for start in self.record.starts:
            if not start[1].startswith("v"):
                counts[start] += 1
        again = {start for start, count in counts.items() if count > 1}
        assert again <= self.may_rerun, again - self.may_rerun

    @invariant()
    def each_entitys_keys_first_start_in_the_order_sent(self) -> None:
        first_starts: defaultdict[str, list[str]] = defaultdict(list)
        for entity, label in self.record.starts:
            if not label.startswith("v") and label not in first_starts[entity]:
                first_starts[entity].append(label)
        for entity, order in first_starts.items():
            assert order == self.sent[entity][: len(order)], (entity, order, self.sent[entity])

    def teardown(self) -> None:
        try:
            self.open_gate()
            for entity, keys in self.sent.items():
                for key in keys:
                    assert (entity, key) in self.answered, (entity, key)
            self.persisted_keys_start_again_only_after_a_lost_lease()
        finally:
            self.loop.close()


TestMailboxModel = MailboxModel.TestCase
