"""The entity runtime on one runner, over the in-memory storage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing

from trio_cluster import (
    AlreadyProcessingMessage,
    Entity,
    EntityNotAssignedToRunner,
    EntityOptions,
    MailboxFull,
    MalformedMessage,
    PersistenceError,
    RpcClientError,
    RunnerUnavailable,
    SendTimeout,
    SerializationError,
    ShardId,
    Suspended,
)
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import shard_index
from trio_cluster.runtime.calls import call_chain
from trio_cluster.runtime.expiry import GRAIN
from trio_cluster.storage.memory import MemoryStorage
from trio_cluster.testing import TEST_CONFIG, open_test_runner, with_entity_options

from .entities import (
    Add,
    Block,
    Boom,
    Call,
    Caller,
    CallerHandler,
    Circle,
    Counter,
    Get,
    Negative,
    Park,
    Shapes,
    ShapesHandler,
    Square,
    Unencodable,
    add,
    add_once,
    add_persisted,
    area,
    bad_reply,
    block,
    boom,
    call,
    counter,
    get,
    park,
    slow_add,
    slow_add_once,
)


def ids_on_distinct_shards(count: int) -> list[str]:
    """Entity ids whose shards differ, so a test can act on one shard alone."""
    found: dict[int, str] = {}
    candidate = 0
    while len(found) < count:
        entity_id = f"e{candidate}"
        found.setdefault(shard_index(entity_id, TEST_CONFIG.shards_per_group), entity_id)
        candidate += 1
    return list(found.values())


def shard_of(entity_id: str) -> ShardId:
    return ShardId("default", shard_index(entity_id, TEST_CONFIG.shards_per_group))


# -- request / reply ---------------------------------------------------------------


async def test_ask_keeps_state_per_entity() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        assert await runner.ask(add, "a", Add(2)) == 2
        assert await runner.ask(add, "a", Add(3)) == 5
        assert await runner.ask(add, "b", Add(1)) == 1
        assert await runner.ask(get, "a", Get()) == 5
    assert probe.activations == 2


async def test_declared_error_is_raised_at_the_caller_with_its_args() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(Negative) as caught:
            await runner.ask(add, "a", Add(-4))
        assert caught.value.args == ("amount below zero", -4)
        assert await runner.ask(get, "a", Get()) == 0


async def test_polymorphic_payloads_dispatch_on_their_shape() -> None:
    async with open_test_runner(Shapes.implement(ShapesHandler)) as (runner, _):
        assert await runner.ask(area, "s", Circle(radius=2.0)) == 12.0
        assert await runner.ask(area, "s", Square(side=3.0)) == 9.0
        assert {shard.group for shard in runner.shards} == {"geometry"}


async def test_tell_queues_in_order_before_later_asks() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        for amount in range(1, 6):
            await runner.tell(add, "a", Add(amount))
        assert await runner.ask(get, "a", Get()) == 15
        assert [amount for _, amount in probe.order] == [1, 2, 3, 4, 5]


# -- bad input ---------------------------------------------------------------------


async def test_payload_of_the_wrong_shape_is_malformed_and_harms_nothing() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(MalformedMessage, match="does not decode"):
            await runner.ask(add, "a", Get())  # type: ignore[misc]
        assert await runner.ask(add, "a", Add(1)) == 1


async def test_rpc_the_handler_does_not_know_is_malformed() -> None:
    newer_protocol = Entity("Counter")
    renamed = newer_protocol.rpc("add_v2", Add, int)
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(MalformedMessage, match="no RPC 'add_v2'"):
            await runner.ask(renamed, "a", Add(1))


async def test_unencodable_payload_fails_before_sending() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(SerializationError, match="cannot encode"):
            await runner.ask(add, "a", object())  # type: ignore[misc]
        assert probe.activations == 0


async def test_unencodable_reply_fails_that_request_only() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(SerializationError) as caught:
            await runner.ask(bad_reply, "a", Unencodable())
        assert caught.value.entity_id == "a"
        assert await runner.ask(add, "a", Add(1)) == 1


# -- defects -----------------------------------------------------------------------


async def test_defect_restarts_the_entity_and_retries_the_request() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        # Two failures, then success on a third, fresh handler instance.
        assert await runner.ask(boom, "a", Boom(failures=2)) == 1
        assert probe.runs["boom"] == 3
        assert probe.activations == 3
        assert runner.snapshot().defects == 2


async def test_defect_beyond_the_retry_policy_reaches_the_caller_with_its_cause() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(RpcClientError) as caught:
            await runner.ask(boom, "a", Boom(failures=100))
        assert caught.value.cause_type == "RuntimeError"
        assert "boom 3" in caught.value.message
        assert probe.runs["boom"] == 3  # max_attempts of the test policy
        assert await runner.ask(add, "a", Add(7)) == 7


async def test_suspended_passes_through_without_a_restart() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(Suspended) as caught:
            await runner.ask(park, "a", Park())
        assert caught.value.resume_token == "approval-1"
        assert probe.activations == 1


# -- timeouts and mailboxes --------------------------------------------------------


async def test_ask_times_out_with_send_timeout(autojump_clock: trio.testing.MockClock) -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(SendTimeout) as caught:
            await runner.ask(block, "a", Block(), timeout=2.0)
        assert caught.value.entity_id == "a"
        # Kept in the expiries' buckets: never early, at most a bucket late.
        assert 2.0 <= trio.current_time() <= 2.0 + GRAIN
        probe.release.set()


async def test_full_mailbox_refuses_volatile_messages() -> None:
    impl, probe = counter(EntityOptions(mailbox_capacity=2))
    async with open_test_runner(impl) as (runner, _):
        await runner.tell(block, "a", Block())
        await probe.started.wait()
        await runner.tell(add, "a", Add(1))
        await runner.tell(add, "a", Add(2))
        with pytest.raises(MailboxFull):
            await runner.tell(add, "a", Add(3))
        probe.release.set()
        await probe.wait_until(lambda: len(probe.order) == 2)
        assert await runner.ask(get, "a", Get()) == 3
        assert runner.snapshot().mailbox_full == 1


async def test_full_mailbox_keeps_persisted_messages_in_storage_and_in_order() -> None:
    impl, probe = counter(EntityOptions(mailbox_capacity=2))
    async with open_test_runner(impl) as (runner, _):
        await runner.tell(block, "a", Block())
        await probe.started.wait()
        for amount in range(20):
            await runner.tell(add_persisted, "a", Add(amount))
        probe.release.set()
        await probe.wait_until(lambda: len(probe.order) == 20)
        assert [amount for _, amount in probe.order] == list(range(20))
        assert await runner.ask(get, "a", Get()) == sum(range(20))


async def test_concurrency_option_runs_that_many_at_once() -> None:
    impl, probe = counter(EntityOptions(concurrency=3))
    async with open_test_runner(impl) as (runner, _):
        for _ in range(3):
            await runner.tell(block, "a", Block())
        await probe.wait_until(lambda: probe.running == 3)
        probe.release.set()
        await probe.wait_until(lambda: probe.running == 0)
    assert probe.max_running == 3


# -- passivation -------------------------------------------------------------------


async def test_idle_entity_is_passivated_and_reactivated_fresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, probe = counter(EntityOptions(max_idle_time=10.0))
    async with open_test_runner(impl) as (runner, _):
        assert await runner.ask(add, "a", Add(5)) == 5
        await trio.sleep(9.0)
        assert runner.snapshot().resident_entities == 1
        await trio.sleep(2.0)
        assert runner.snapshot().resident_entities == 0
        assert await runner.ask(get, "a", Get()) == 0
        assert probe.activations == 2


async def test_keep_alive_entities_are_never_passivated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, _ = counter(EntityOptions(max_idle_time=1.0, keep_alive=True))
    async with open_test_runner(impl) as (runner, _):
        assert await runner.ask(add, "a", Add(5)) == 5
        await trio.sleep(100.0)
        assert await runner.ask(get, "a", Get()) == 5


async def test_resident_cap_passivates_least_recently_used_idle_entities() -> None:
    impl, probe = counter()
    config = attrs.evolve(TEST_CONFIG, max_resident_entities=3)
    async with open_test_runner(impl, config=config) as (runner, _):
        await runner.tell(block, "busy", Block())
        await probe.started.wait()
        for name in ("a", "b", "c", "d", "e"):
            assert await runner.ask(add, name, Add(1)) == 1
            assert len(runner.resident) <= 3
        # The busy entity was least recently used, but had work in hand.
        assert "Counter/busy" in runner.resident
        probe.release.set()
        assert await runner.ask(add, "busy", Add(1)) == 1
        assert runner.snapshot().passivations >= 2


# -- calls between entities --------------------------------------------------------


async def test_entities_call_entities() -> None:
    async with open_test_runner(Caller.implement(CallerHandler)) as (runner, _):
        assert await runner.ask(call, "a", Call("b")) == "a>b"


@pytest.mark.parametrize("target", ["a", "b"])
async def test_call_cycle_into_a_turn_based_entity_fails_fast(target: str) -> None:
    async with open_test_runner(Caller.implement(CallerHandler)) as (runner, _):
        # a -> a, or a -> b -> a: the last call could never be answered.
        with trio.fail_after(5), pytest.raises(AlreadyProcessingMessage) as caught:
            await runner.ask(call, "a", Call(target, depth=2 if target == "b" else 1))
        assert "could never answer" in caught.value.message
        # Refused at once, not retried as a defect.
        assert runner.snapshot().defects == 0


async def test_self_call_is_allowed_with_concurrency() -> None:
    impl = Caller.implement(CallerHandler, EntityOptions(concurrency=2))
    async with open_test_runner(impl) as (runner, _):
        assert await runner.ask(call, "a", Call("a")) == "a>a"


async def test_asking_an_entity_from_its_own_turn_is_refused() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, _):
        token = call_chain.set(("Counter/a",))
        try:
            with pytest.raises(AlreadyProcessingMessage, match="could never answer"):
                await runner.ask(get, "a", Get())
        finally:
            call_chain.reset(token)


# -- persistence and idempotency ---------------------------------------------------


async def test_primary_key_runs_the_handler_once_and_replays_the_reply() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        first = await runner.ask(add_once, "a", Add(5, key="t1"))
        again = await runner.ask(add_once, "a", Add(5, key="t1"))
        other = await runner.ask(add_once, "a", Add(5, key="t2"))
        await runner.tell(add_once, "a", Add(5, key="t1"))
        assert (first, again, other) == (5, 5, 10)
        assert probe.runs["a/add_once/t1"] == 1
        assert await runner.ask(get, "a", Get()) == 10


async def test_duplicate_of_a_request_in_flight_waits_for_its_reply() -> None:
    impl, probe = counter()
    results: list[int] = []
    async with open_test_runner(impl) as (runner, _):

        async def send() -> None:
            results.append(await runner.ask(slow_add_once, "a", Add(5, key="k")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await probe.started.wait()
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            probe.release.set()
    assert results == [5, 5]
    assert probe.runs["slow_add_once entered"] == 1


async def test_tell_of_a_persisted_message_returns_once_stored() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, storage):
        await runner.tell(slow_add, "a", Add(3))
        shard = shard_of("a")
        assert [e.rpc for e in await storage.unprocessed(shard)] == ["slow_add"]
        probe.release.set()
        # The mailbox is FIFO and a persisted reply is stored before the next turn.
        assert await runner.ask(get, "a", Get()) == 3
        assert await storage.unprocessed(shard) == []


async def test_storage_outage_is_a_persistence_error_and_the_runner_recovers() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, storage):
        storage.available = False
        with pytest.raises(PersistenceError):
            await runner.ask(add_persisted, "a", Add(1))
        assert await runner.ask(add, "a", Add(1)) == 1  # volatile traffic goes on
        storage.available = True
        assert await runner.ask(add_persisted, "a", Add(1)) == 2


# -- shards, leases and fencing ----------------------------------------------------


async def test_losing_a_lease_stops_exactly_that_shards_entities() -> None:
    impl, probe = counter(EntityOptions(concurrency=2))
    lost, kept = ids_on_distinct_shards(2)
    async with open_test_runner(impl) as (runner, storage):
        assert await runner.ask(add, kept, Add(1)) == 1
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException] = []

            async def blocked() -> None:
                try:
                    await runner.ask(block, lost, Block())
                except RunnerUnavailable as error:
                    outcome.append(error)

            nursery.start_soon(blocked)
            await probe.started.wait()
            storage.revoke(shard_of(lost))
        assert len(outcome) == 1
        assert probe.running == 0
        assert f"Counter/{kept}" in runner.resident
        assert f"Counter/{lost}" not in runner.resident
        assert await runner.ask(get, kept, Get()) == 1


async def test_persisted_request_survives_lease_loss_and_is_answered_once() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, storage):
        async with trio.open_nursery() as nursery:
            replies: list[int] = []

            async def send() -> None:
                replies.append(await runner.ask(slow_add, "a", Add(4)))

            nursery.start_soon(send)
            await probe.wait_until(lambda: probe.runs["slow_add entered"] == 1)
            storage.revoke(shard_of("a"))
            # The runner takes the shard back under a new epoch and redelivers.
            await probe.wait_until(lambda: probe.runs["slow_add entered"] == 2)
            probe.release.set()
        assert replies == [4]
        assert probe.runs["a/slow_add/"] == 1


async def test_stale_lease_cannot_complete_a_message() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, storage):
        shard = shard_of("a")
        stale = runner.shards[shard]
        await runner.tell(slow_add, "a", Add(1))
        (envelope,) = await storage.unprocessed(shard)
        storage.revoke(shard)
        with pytest.raises(EntityNotAssignedToRunner, match="stale"):
            await storage.save_reply(envelope.request_id, b"\x00", stale)
        assert await storage.reply_for(envelope.request_id) is None


# -- lifecycle ---------------------------------------------------------------------


async def test_leaving_the_runner_drains_queued_messages() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, _):
        for amount in range(5):
            await runner.tell(add, "a", Add(amount))
    assert [amount for _, amount in probe.order] == list(range(5))


async def test_unfinished_persisted_work_is_handed_to_the_next_runner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, storage):
        await runner.tell(slow_add, "a", Add(9))
        await probe.started.wait()
    # Termination timeout passed with the handler still blocked: it was
    # cancelled, and the request is still in storage.
    assert probe.runs["a/slow_add/"] == 0
    probe.release.set()
    async with open_test_runner(impl, storage=storage) as (runner, _):
        await probe.wait_until(lambda: probe.runs["a/slow_add/"] == 1)
        assert await runner.ask(get, "a", Get()) == 9


async def test_is_local_is_false_while_a_shard_drains_and_true_on_its_new_owner() -> None:
    impl, probe = counter()
    ids = ids_on_distinct_shards(TEST_CONFIG.shards_per_group)
    async with open_test_runner(impl) as (first, storage), trio.open_nursery() as nursery:
        for entity_id in ids:  # one busy entity per shard, so each handoff must wait
            nursery.start_soon(first.ask, block, entity_id, Block())
        await probe.wait_until(lambda: probe.running == len(ids))
        assert all(first.is_local(Counter, entity_id) for entity_id in ids)
        assert not first.is_local(Caller, ids[0])  # not hosted here: never local
        async with open_test_runner(impl, storage=storage) as (second, _):
            while second.address not in first.assignment.values():
                await first.changed()
            await trio.testing.wait_all_tasks_blocked()
            moving = [i for i in ids if first.assignment[shard_of(i)] == second.address]
            assert moving
            for entity_id in ids:
                held_here = shard_of(entity_id) in first.shards
                assert held_here  # the moving ones are still draining their busy entity
                assert first.is_local(Counter, entity_id) == (entity_id not in moving)
                assert not second.is_local(Counter, entity_id)
            probe.release.set()
            with trio.fail_after(5):
                await second.settled()
            assert [i for i in ids if second.is_local(Counter, i)] == moving


async def test_runner_releases_everything_when_its_body_raises() -> None:
    impl, _ = counter()
    storage_seen: list[Any] = []
    with pytest.raises(ZeroDivisionError):
        async with open_test_runner(impl) as (runner, storage):
            storage_seen.append(storage)
            await runner.ask(add, "a", Add(1))
            raise ZeroDivisionError
    assert storage_seen[0].holder_of(shard_of("a")) is None


async def test_two_runners_on_one_storage_never_share_a_shard() -> None:
    impl, _ = counter()
    async with (
        open_test_runner(impl) as (first, storage),
        open_test_runner(impl, storage=storage) as (second, _),
    ):
        with trio.fail_after(5):
            await first.settled()
            await second.settled()
        # The newcomer took half the shards (8 of them: exact shares), handed off by the
        # first runner.
        assert not set(first.shards) & set(second.shards)
        assert len(first.shards) == len(second.shards) == TEST_CONFIG.shards_per_group // 2


class UnreadableMembership(MemoryStorage):
    """Memory storage whose membership reads fail while ``failing`` (the pool down after a
    PostgreSQL restart, say), the rest working."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.failed_for: set[trio.lowlevel.Task] = set()
        """The tasks (the keepers: nobody else reads here) whose read failed."""
        self.news = trio.Event()

    async def live_runners(self) -> list[RunnerSpec]:
        if self.failing:
            self.failed_for.add(trio.lowlevel.current_task())
            self.news.set()
            self.news = trio.Event()
            raise PersistenceError("cannot list runners")
        return await super().live_runners()


async def test_a_membership_read_that_fails_is_made_again_before_the_safety_poll() -> None:
    # A regression: the pass that a join woke failed to read the membership, and the
    # keeper waited for the next notice or the safety poll before looking again, so the
    # newcomer's shards stayed with the old runner (seen after a PostgreSQL restart).
    impl, _ = counter()
    config = attrs.evolve(TEST_CONFIG, membership_poll_interval=3600.0)
    storage = UnreadableMembership()
    async with open_test_runner(impl, config=config, storage=storage) as (first, _):
        storage.failing = True
        async with open_test_runner(impl, config=config, storage=storage) as (second, _):
            while len(storage.failed_for) < 2:  # the first's pass on the join notice too
                await storage.news.wait()
            storage.failing = False
            with trio.fail_after(5):  # not the safety poll's hour
                for runner in (first, second):
                    while second.address not in runner.assignment.values():
                        await runner.changed()
                await first.settled()
                await second.settled()
            assert not set(first.shards) & set(second.shards)
            assert len(first.shards) == len(second.shards) == TEST_CONFIG.shards_per_group // 2


async def test_snapshot_counts_what_happened() -> None:
    impl, _ = counter()
    config = with_entity_options(TEST_CONFIG, mailbox_capacity=5)
    async with open_test_runner(impl, config=config) as (runner, _):
        await runner.ask(add, "a", Add(1))
        await runner.ask(add, "b", Add(1))
        snapshot = runner.snapshot()
    assert (snapshot.processed, snapshot.activations, snapshot.resident_entities) == (2, 2, 2)
    assert snapshot.owned_shards == TEST_CONFIG.shards_per_group
    assert msgspec.to_builtins(attrs.asdict(snapshot))["waiting_callers"] == 0


# -- scheduled delivery and cross-runner persistence ---------------------------------


async def test_deliver_at_holds_a_request_back_until_its_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, storage):
        due = datetime.now(UTC) + timedelta(seconds=30)
        await runner.tell(add_persisted, "a", Add(5), deliver_at=due)
        await runner.tell(add, "a", Add(1))
        assert await runner.ask(get, "a", Get()) == 1
        start = trio.current_time()
        await probe.wait_until(lambda: len(probe.order) == 2)
        assert trio.current_time() - start == pytest.approx(30, abs=1)
        assert await storage.unprocessed(shard_of("a")) == []


async def test_naive_deliver_at_is_refused() -> None:
    impl, _ = counter()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(TypeError, match="timezone-aware"):
            await runner.tell(add, "a", Add(1), deliver_at=datetime.now())


async def test_persisted_messages_reach_the_owner_through_storage_alone() -> None:
    impl, probe = counter()
    async with (
        open_test_runner(impl) as (owner, storage),
        # Hosts nothing, so it owns no shard: a client-only runner.
        open_test_runner(storage=storage) as (sender, _),
    ):
        assert not sender.shards
        await sender.tell(add_persisted, "a", Add(2))
        assert await sender.ask(add_once, "a", Add(3, key="k")) == 5
        # A duplicate asked on the owner is answered from the stored reply.
        assert await owner.ask(add_once, "a", Add(3, key="k")) == 5
        assert probe.runs["a/add_once/k"] == 1


# -- regressions ---------------------------------------------------------------------


async def test_queued_volatile_callers_are_answered_at_once_when_a_lease_is_lost() -> None:
    impl, probe = counter()
    async with open_test_runner(impl) as (runner, storage):
        failures: list[Exception] = []

        async def send(rpc: Any, payload: Any) -> None:
            try:
                await runner.ask(rpc, "a", payload)
            except RunnerUnavailable as error:
                failures.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, block, Block())
            await probe.started.wait()
            nursery.start_soon(send, add, Add(1))
            nursery.start_soon(send, add, Add(2))
            await trio.testing.wait_all_tasks_blocked()
            storage.revoke(shard_of("a"))
            # All three answered now, not after the 10 s send timeout.
            with trio.fail_after(1):
                await probe.wait_until(lambda: probe.running == 0)
                while len(failures) < 3:
                    await trio.testing.wait_all_tasks_blocked()
        assert len(failures) == 3


async def test_resident_count_comes_back_under_the_cap_once_entities_go_idle() -> None:
    impl, probe = counter(EntityOptions(concurrency=1))
    config = attrs.evolve(TEST_CONFIG, max_resident_entities=3)
    async with open_test_runner(impl, config=config) as (runner, _):
        for name in ("b1", "b2", "b3", "b4"):
            await runner.tell(block, name, Block())
        await probe.wait_until(lambda: probe.running == 4)
        assert len(runner.resident) == 4  # over the cap: all four have work in hand
        probe.release.set()
        await probe.wait_until(lambda: probe.running == 0)
        assert await runner.ask(add, "new", Add(1)) == 1
        assert len(runner.resident) <= 3


class Picky(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code)  # args no longer rebuild the error
        self.detail = detail


async def test_a_declared_error_that_cannot_be_rebuilt_is_a_serialization_error() -> None:
    strict = Entity("Strict")
    refuse = strict.rpc("refuse", Get, int, errors=(Picky,))

    class StrictHandler:
        def __init__(self, ctx: Any) -> None:
            pass

        @refuse.handler
        async def handle(self, p: Get) -> int:
            raise Picky(7, "why")

    async with open_test_runner(strict.implement(StrictHandler)) as (runner, _):
        with pytest.raises(SerializationError, match="cannot rebuild Picky"):
            await runner.ask(refuse, "s", Get())


class SlowReads(MemoryStorage):
    """Reads take time, as over a network: what arrives meanwhile must wait its turn."""

    async def unprocessed(self, *args: Any, **kwargs: Any) -> list[Envelope]:
        await trio.sleep(0.005)
        return await super().unprocessed(*args, **kwargs)


async def test_requests_stored_during_redelivery_do_not_overtake_older_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, probe = counter()
    storage = SlowReads()
    async with open_test_runner(storage=storage) as (client, _):
        for amount in range(3):
            await client.tell(add_persisted, "a", Add(amount))
        async with open_test_runner(impl, storage=storage):
            await client.tell(add_persisted, "a", Add(99))
            await probe.wait_until(lambda: len(probe.order) == 4)
    assert [amount for _, amount in probe.order] == [0, 1, 2, 99]


async def test_the_last_runner_shuts_down_without_deadlock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Entities still calling each other while every shard drains: the calls
    # fail within their bounds and the runner is gone within its grace.
    async with open_test_runner(Caller.implement(CallerHandler)) as (runner, _):
        for n in range(20):
            await runner.tell(call, f"a{n}", Call(f"b{n}", depth=3))
        start = trio.current_time()
    assert trio.current_time() - start <= TEST_CONFIG.entity_termination_timeout + 0.5
