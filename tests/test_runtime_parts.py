"""The runtime's parts on their own: a shard, an entity and the router, each with a
context built by hand, no runner around them.

These check the failure boundaries from inside: what fails in an entity, a
shard or a peer's request stays in that scope.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing

from trio_cluster import (
    EntityNotAssignedToRunner,
    Interrupted,
    MailboxFull,
    MalformedMessage,
    RpcClientError,
    RunnerUnavailable,
)
from trio_cluster.core import reply as replies
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import ShardId, shard_index
from trio_cluster.core.lifecycle import EntityState, ShardState
from trio_cluster.runtime.client import Client
from trio_cluster.runtime.delivery import Delivery
from trio_cluster.runtime.expiry import Expiries
from trio_cluster.runtime.hooks import Hooks
from trio_cluster.runtime.interrupts import ShardInterrupts
from trio_cluster.runtime.mailbox import ActiveEntity
from trio_cluster.runtime.metrics import Counters
from trio_cluster.runtime.replies import StoredReplies
from trio_cluster.runtime.residency import Residency
from trio_cluster.runtime.routing import Router
from trio_cluster.runtime.services import Hosted, Services
from trio_cluster.runtime.shard import ShardRuntime
from trio_cluster.runtime.stored_streams import StreamWatchers
from trio_cluster.runtime.withdrawals import Withdrawals
from trio_cluster.storage import Lease, MemoryStorage, StateWrite
from trio_cluster.testing import TEST_CONFIG

from .entities import Add, Probe, counter

CONFIG = attrs.evolve(TEST_CONFIG, max_scheduled_per_shard=3)
SHARDS = CONFIG.shards_per_group


class Sink:
    """A reply target; also stands in for a peer's LinkReply (``ack``, ``delivery``,
    ``sink``: a plain request, no stream)."""

    def __init__(self, *, ack: bool = False) -> None:
        self.replies: list[bytes] = []
        self.got = trio.Event()
        self.ack = ack
        self.delivery: Delivery | None = None

    def resolve(self, reply: bytes) -> None:
        self.replies.append(reply)
        self.got.set()

    def sink(self) -> None:
        return None

    def value(self) -> Any:
        return replies.decode(self.replies[-1], msgspec.msgpack.Decoder(), {})


def envelope(
    request_id: int,
    entity_id: str = "a",
    rpc: str = "add",
    amount: int = 1,
    *,
    persisted: bool = False,
    deliver_at_ms: int | None = None,
    shard: int | None = None,
) -> Envelope:
    return Envelope(
        request_id=request_id,
        entity_type="Counter",
        entity_id=entity_id,
        shard_group="default",
        shard_index=shard_index(entity_id, SHARDS) if shard is None else shard,
        rpc=rpc,
        payload=replies.encode_payload(Add(amount)),
        persisted=persisted,
        deliver_at_ms=deliver_at_ms,
    )


@attrs.define
class World:
    storage: MemoryStorage
    services: Services
    lease: Lease
    probe: Probe
    stopped: list[ShardRuntime]
    released: list[Lease]
    counters: Counters


@asynccontextmanager
async def world(entity_id: str = "a") -> AsyncIterator[World]:
    """A hand-built Services on a MemoryStorage, and the lease of ``entity_id``'s shard."""
    storage = MemoryStorage()
    impl, probe = counter()
    counters = Counters()
    hooks = Hooks(trusted=(counters,))
    stored = StoredReplies()
    watchers = StreamWatchers()
    router = Router("test-runner", CONFIG, hooks, {})
    released: list[Lease] = []
    async with storage.session(RunnerSpec("test-runner"), lambda _: None) as session:

        async def release(lease: Lease) -> None:
            released.append(lease)
            await session.release(lease)

        client = Client(
            config=CONFIG,
            router=router,
            messages=storage,
            deferreds=storage,
            stored_replies=stored,
            streams=storage,
            watchers=watchers,
            session=session,
            hooks=hooks,
            withdrawals=Withdrawals(
                messages=storage, shards={}, machine_id=lambda: session.machine_id, hooks=hooks
            ),
            expiries=Expiries(),
        )
        services = Services(
            address="test-runner",
            config=CONFIG,
            messages=storage,
            states=storage,
            timers=storage,
            deferreds=storage,
            stored_replies=stored,
            streams=storage,
            watchers=watchers,
            hooks=hooks,
            residency=Residency(100),
            hosted={"Counter": Hosted(impl, CONFIG.entity_defaults)},
            client=client,
            release=release,
            confirmed=session.confirmed,
            base_context=contextvars.copy_context(),
        )
        lease = await session.acquire(ShardId("default", shard_index(entity_id, SHARDS)))
        assert lease is not None
        yield World(storage, services, lease, probe, [], released, counters)


@asynccontextmanager
async def running_shard(w: World) -> AsyncIterator[ShardRuntime]:
    shard = ShardRuntime(w.services, w.lease, w.stopped.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(shard.run)
        yield shard
        nursery.cancel_scope.cancel()


# -- a shard ------------------------------------------------------------------------------


async def test_a_shard_serves_then_drains_and_releases() -> None:
    async with world() as w, running_shard(w) as shard:
        assert shard.accepting
        sink = Sink()
        shard.offer(Delivery(envelope(1), sink))
        await sink.got.wait()
        assert sink.value() == 1
        await shard.stop(grace=5)
        assert shard.state is ShardState.RELEASED
        assert w.released == [w.lease]
        assert w.stopped == [shard]


async def test_a_lost_shard_answers_its_volatile_requests_and_releases_nothing() -> None:
    async with world() as w, running_shard(w) as shard:
        running, queued = Sink(), Sink()
        shard.offer(Delivery(envelope(1, rpc="block"), running))
        shard.offer(Delivery(envelope(2), queued))
        await w.probe.started.wait()
        shard.lose()
        await running.got.wait()
        await queued.got.wait()
        for sink in (running, queued):
            with pytest.raises(RunnerUnavailable):
                sink.value()
        assert shard.state is ShardState.LOST
        with pytest.raises(EntityNotAssignedToRunner, match="lost"):
            shard.offer(Delivery(envelope(3), Sink()))
    assert w.released == []


async def test_a_bug_in_a_shard_fails_that_shard_alone_and_releases_its_lease() -> None:
    async with world() as w:

        async def broken(*args: object, **kwargs: object) -> list[Envelope]:
            raise RuntimeError("a bug in the storage adapter")

        w.storage.unprocessed = broken  # type: ignore[method-assign]
        shard = ShardRuntime(w.services, w.lease, w.stopped.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(shard.run)
            with trio.fail_after(5):
                while shard.state is not ShardState.FAILED:
                    await trio.testing.wait_all_tasks_blocked()
        # The nursery above ended without an error: the shard contained it.
        assert w.released == [w.lease]
        assert w.counters.contained_failures == 1


async def test_far_future_requests_are_bounded_per_shard() -> None:
    async with world() as w, running_shard(w) as shard:
        later = int((datetime.now(UTC) + timedelta(days=365)).timestamp() * 1000)
        for n in range(CONFIG.max_scheduled_per_shard):
            shard.offer(Delivery(envelope(n, deliver_at_ms=later), Sink()))
        with pytest.raises(MailboxFull, match="deliver_at"):
            shard.offer(Delivery(envelope(99, deliver_at_ms=later), Sink()))
        # A persisted one is stored anyway: it does not fit memory, and is not refused.
        stored = envelope(100, rpc="add_persisted", persisted=True, deliver_at_ms=later)
        await w.storage.save_request(stored, 0, announce=False)
        shard.offer(Delivery(stored, Sink()))


async def test_a_request_for_an_entity_of_another_shard_is_refused() -> None:
    async with world() as w, running_shard(w) as shard:
        other = next(
            f"e{n}" for n in range(100) if shard_index(f"e{n}", SHARDS) != w.lease.shard.index
        )
        with pytest.raises(MalformedMessage, match="does not belong to shard"):
            shard.offer(Delivery(envelope(1, other, shard=w.lease.shard.index), Sink()))
        assert w.probe.activations == 0


async def test_a_stored_request_for_another_shard_layout_gets_a_final_error() -> None:
    async with world() as w:
        # Stored by a runner whose shards_per_group differs: same shard index,
        # but under this runner's layout the entity lives elsewhere.
        other = next(
            f"e{n}" for n in range(100) if shard_index(f"e{n}", SHARDS) != w.lease.shard.index
        )
        misplaced = envelope(7, other, "add_persisted", persisted=True, shard=w.lease.shard.index)
        await w.storage.save_request(misplaced, 0, announce=False)
        async with running_shard(w):
            with trio.fail_after(5):
                while await w.storage.reply_for(7) is None:
                    await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(MalformedMessage, match="shard layout"):
            replies.decode(await w.storage.reply_for(7) or b"", msgspec.msgpack.Decoder(), {})
        assert w.probe.activations == 0


# -- an entity ----------------------------------------------------------------------------


class Host:
    """A shard stand-in: what an entity needs of its host, and nothing more."""

    def __init__(self, w: World, *, complete_fails: bool = False) -> None:
        self.services = w.services
        self.lease = w.lease
        self.draining = False
        self.complete_fails = complete_fails
        self.interrupts = ShardInterrupts()
        self.forgotten: list[ActiveEntity] = []
        self.saved: list[StateWrite] = []

    async def read_backlog(
        self, entity: tuple[str, str], limit: int
    ) -> tuple[list[Envelope], bool]:
        return [], False

    async def complete(
        self, delivery: Delivery, reply: bytes, state: StateWrite | None = None
    ) -> bool:
        if self.complete_fails and delivery.envelope.request_id == 1:
            raise RuntimeError("a bug while completing")
        await trio.lowlevel.checkpoint()  # as a write to storage would
        delivery.target.resolve(reply)
        return True

    async def load_state(self, entity_type: str, entity_id: str) -> bytes | None:
        return None

    async def save_state(self, state: StateWrite) -> bool:
        self.saved.append(state)
        return True

    async def suspend(self, delivery: Delivery, name: str) -> bool | None:
        raise NotImplementedError

    async def deferred_result(self, request_id: int, name: str) -> bytes | None:
        raise NotImplementedError

    async def arm_timer(self, name: str, envelope: Envelope) -> None:
        raise NotImplementedError

    async def cancel_timer(self, entity: tuple[str, str], name: str) -> bool:
        raise NotImplementedError

    def forget(self, entity: ActiveEntity) -> None:
        self.forgotten.append(entity)

    def passivate(self, entity: ActiveEntity) -> None:
        entity.close()


def active(w: World, host: Host) -> ActiveEntity:
    return ActiveEntity(host, w.services.hosted["Counter"], "a", "Counter/a")


async def test_a_runtime_bug_in_one_request_fails_it_and_the_entity_goes_on() -> None:
    async with world() as w:
        host = Host(w, complete_fails=True)
        entity = active(w, host)
        first, second = Sink(), Sink()
        entity.offer(Delivery(envelope(1), first))
        entity.offer(Delivery(envelope(2), second))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entity.run)
            await second.got.wait()
            entity.close()
        with pytest.raises(RpcClientError, match="internal error"):
            first.value()
        assert second.value() == 2  # the same handler instance went on
        assert entity.state is EntityState.STOPPED
        assert host.forgotten == [entity]


async def test_an_entity_stopped_mid_request_tells_its_volatile_caller() -> None:
    async with world() as w:
        entity = active(w, Host(w))
        sink = Sink()
        entity.offer(Delivery(envelope(1, rpc="block"), sink))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entity.run)
            await w.probe.started.wait()
            nursery.cancel_scope.cancel()
        with pytest.raises(RunnerUnavailable, match="stopped while processing"):
            sink.value()


async def test_an_interrupt_after_the_handlers_last_checkpoint_reaches_nothing() -> None:
    """Handlers share their entity task's cancel scope: an interrupt that came too late to
    cancel its own handler must not cancel the next request's instead."""
    async with world() as w:
        entity = active(w, Host(w))
        racing, after = Sink(), Sink()
        first = Delivery(envelope(1, rpc="block"), racing)
        entity.offer(first)
        entity.offer(Delivery(envelope(2, rpc="block"), after))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entity.run)
            await w.probe.started.wait()
            w.probe.release.set()  # the handler is rescheduled with its result...
            first.interrupt()  # ...so this cancellation finds no checkpoint left in it
            await after.got.wait()
            entity.close()
        assert racing.value() is None  # the reply made first wins
        assert after.value() is None  # the next handler waited (a checkpoint), uncancelled


async def test_an_interrupt_of_a_finished_request_reaches_nothing() -> None:
    async with world() as w:
        entity = active(w, Host(w))
        done, running = Sink(), Sink()
        finished = Delivery(envelope(1), done)
        entity.offer(finished)
        entity.offer(Delivery(envelope(2, rpc="block"), running))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entity.run)
            await w.probe.started.wait()
            finished.interrupt()  # its caller gives up after the reply: too late
            w.probe.release.set()
            await running.got.wait()
            entity.close()
        assert done.value() == 1
        assert running.value() is None


async def test_after_an_interrupt_the_next_request_runs_uncancelled() -> None:
    async with world() as w:
        entity = active(w, Host(w))
        interrupted, next_one = Sink(), Sink()
        first = Delivery(envelope(1, rpc="block"), interrupted)
        entity.offer(first)
        entity.offer(Delivery(envelope(2, rpc="block"), next_one))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entity.run)
            await w.probe.started.wait()
            first.interrupt()
            await interrupted.got.wait()
            w.probe.release.set()
            await next_one.got.wait()
            entity.close()
        with pytest.raises(Interrupted, match="while its handler ran"):
            interrupted.value()
        assert next_one.value() is None


async def test_a_persisted_request_offered_twice_runs_once() -> None:
    async with world() as w:
        entity = active(w, Host(w))
        sink = Sink()
        twice = envelope(1, rpc="add_persisted", persisted=True)
        entity.offer(Delivery(twice, sink))
        entity.offer(Delivery(twice, sink))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(entity.run)
            await sink.got.wait()
            entity.close()
        assert w.probe.runs["a/add_persisted/"] == 1


async def test_a_closed_entity_refuses_volatile_and_leaves_persisted_in_storage() -> None:
    async with world() as w:
        entity = active(w, Host(w))
        entity.close()
        with pytest.raises(EntityNotAssignedToRunner, match="stopping"):
            entity.offer(Delivery(envelope(1), Sink()))
        entity.offer(Delivery(envelope(2, persisted=True), Sink()))
        assert entity.idle


# -- the router ---------------------------------------------------------------------------


class FakeShard:
    def __init__(self) -> None:
        self.offered: list[Delivery] = []

    def offer(self, delivery: Delivery) -> None:
        self.offered.append(delivery)


def router_with(shard_id: ShardId) -> tuple[Router, FakeShard]:
    shard = FakeShard()
    return Router("me:1", CONFIG, Hooks(), {shard_id: shard}), shard


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ({"persisted": True}, MalformedMessage, "travel through storage"),
        ({"entity_id": "a\x00"}, MalformedMessage, "NUL"),
    ],
)
def test_the_router_refuses_what_a_peer_may_not_send(
    bad: dict[str, Any], error: type[Exception], match: str
) -> None:
    good = envelope(5)
    router, shard = router_with(ShardId("default", good.shard_index))
    sink = Sink()
    router.on_remote_request(sink, msgspec.structs.replace(good, **bad))  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        sink.value()
    assert shard.offered == []
    assert router.on_remote_request is not None


def test_the_router_refuses_a_shard_it_does_not_serve() -> None:
    router, _ = router_with(ShardId("default", (shard_index("a", SHARDS) + 1) % SHARDS))
    sink = Sink()
    router.on_remote_request(sink, envelope(5))  # type: ignore[arg-type]
    with pytest.raises(EntityNotAssignedToRunner):
        sink.value()


def test_the_router_offers_a_good_request_with_its_own_reply_target() -> None:
    good = envelope(5)
    router, shard = router_with(ShardId("default", good.shard_index))
    sink = Sink()
    router.on_remote_request(sink, good)  # type: ignore[arg-type]
    (delivery,) = shard.offered
    assert delivery.envelope is good and delivery.target is sink


async def test_a_router_routes_to_the_owner_it_knows() -> None:
    router = Router("me:1", CONFIG, Hooks(), {})
    with pytest.raises(EntityNotAssignedToRunner):
        router.route(Delivery(envelope(1), Sink()))
    router.assignment[ShardId("default", shard_index("a", SHARDS))] = "other:2"
    with pytest.raises(EntityNotAssignedToRunner):  # no transport: cannot reach it
        router.route(Delivery(envelope(1), Sink()))


async def test_a_handler_starts_only_once_its_shards_lease_is_confirmed() -> None:
    """The gate of a runner resuming from a freeze: while storage cannot vouch for
    the lease, a queued request waits, its handler not started."""
    async with world() as w:
        vouched = trio.Event()
        asked: list[ShardId] = []

        async def confirmed(shard: ShardId) -> None:
            asked.append(shard)
            await vouched.wait()

        w.services = attrs.evolve(w.services, confirmed=confirmed)
        async with running_shard(w) as shard:
            sink = Sink()
            shard.offer(Delivery(envelope(1), sink))
            await trio.testing.wait_all_tasks_blocked()
            assert asked == [w.lease.shard]
            assert w.probe.activations == 0 and not sink.replies
            vouched.set()
            await sink.got.wait()
            assert sink.value() == 1
