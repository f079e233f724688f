"""Durable entity state: one conformance suite, run against both storages.

Every test takes ``world``: a storage (MemoryStorage, or PostgreSQL under a
prefix of its own) and a way to take a shard's lease away as a crash would
(revoking it in memory; terminating the runner's lock connection in
PostgreSQL). The same assertions hold for both.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import attrs
import msgspec
import pytest
import trio
import trio.testing

from trio_cluster import (
    Entity,
    EntityContext,
    EntityNotAssignedToRunner,
    EntityOptions,
    MemoryStorage,
    Runner,
    SerializationError,
    State,
    open_runner,
)
from trio_cluster.pgdriver import open_connection
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.storage import StateWrite, Storage
from trio_cluster.testing import TEST_CONFIG

CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=4)


class Item(msgspec.Struct, frozen=True):
    name: str
    key: str = ""


class Nothing(msgspec.Struct, frozen=True):
    pass


class CartState(msgspec.Struct):
    items: list[str] = []
    total: int = 0


class CartStateV2(msgspec.Struct):
    """The same state with a field added, as a later deploy would have it."""

    items: list[str] = []
    total: int = 0
    coupon: str = "none"


class Oops(Exception):
    """Declared: raised after changing the state."""


Cart = Entity("Cart")
add_item = Cart.rpc("add_item", Item, int, persisted=True, primary_key=lambda i: i.key)
add_volatile = Cart.rpc("add_volatile", Item, int)
add_then_fail = Cart.rpc("add_then_fail", Item, int, persisted=True, errors=(Oops,))
add_then_crash = Cart.rpc("add_then_crash", Item, int, persisted=True)
add_huge = Cart.rpc("add_huge", Item, int, persisted=True)
hold = Cart.rpc("hold", Item, int, persisted=True)
forget = Cart.rpc("forget", Nothing, int, persisted=True)
peek = Cart.rpc("peek", Nothing, list[str])
info = Cart.rpc("info", Nothing, list[Any])


class Probe:
    def __init__(self) -> None:
        self.held = trio.Event()
        self.release = trio.Event()
        self.activations = 0
        self.passivations = 0
        self.crashes = 0


class CartHandler:
    probe: ClassVar[Probe]

    def __init__(self, ctx: EntityContext, state: State[CartState]) -> None:
        self.ctx = ctx
        self.state = state

    async def on_activate(self) -> None:
        self.probe.activations += 1

    async def on_passivate(self) -> None:
        self.probe.passivations += 1

    def _add(self, name: str) -> int:
        self.state.value.items.append(name)
        self.state.value.total += 1
        return self.state.value.total

    @add_item.handler
    async def add_item(self, item: Item) -> int:
        return self._add(item.name)

    @add_volatile.handler
    async def add_volatile(self, item: Item) -> int:
        return self._add(item.name)

    @add_then_fail.handler
    async def add_then_fail(self, item: Item) -> int:
        self._add(item.name)
        raise Oops(item.name)

    @add_then_crash.handler
    async def add_then_crash(self, item: Item) -> int:
        self._add(item.name)
        self.probe.crashes += 1
        raise RuntimeError("a defect after changing the state")

    @add_huge.handler
    async def add_huge(self, item: Item) -> int:
        return self._add(item.name * 100_000)

    @hold.handler
    async def hold(self, item: Item) -> int:
        total = self._add(item.name)
        self.probe.held.set()
        await self.probe.release.wait()
        return total

    @forget.handler
    async def forget(self, _: Nothing) -> int:
        self.state.delete()
        return 0

    @peek.handler
    async def peek(self, _: Nothing) -> list[str]:
        return list(self.state.value.items)

    @info.handler
    async def info(self, _: Nothing) -> list[Any]:
        request = self.ctx.request
        return [request.redelivered, request.attempt, self.ctx.draining]


def cart(
    options: EntityOptions | None = None, state: type[CartState] = CartState
) -> tuple[Any, Probe]:
    probe = Probe()
    handler = type("ProbedCart", (CartHandler,), {"probe": probe})
    defaults = EntityOptions(
        defect_retry=TEST_CONFIG.entity_defaults.defect_retry, state_save="passivation"
    )
    return Cart.implement(handler, options or defaults, state=state), probe


@attrs.define
class World:
    storage: Storage
    lose_leases: Callable[[Runner], Awaitable[None]]
    """Take away every lease of a runner, as a crash of its lock connection would."""


@asynccontextmanager
async def open_world(kind: str, dsn: str | None) -> AsyncIterator[World]:
    if kind == "memory":
        storage = MemoryStorage()

        async def revoke(runner: Runner) -> None:
            for shard in list(runner.shards):
                storage.revoke(shard)

        yield World(storage, revoke)
        return
    assert dsn is not None
    async with open_postgres_storage(dsn, prefix=f"st{uuid.uuid4().hex[:8]}_") as pg:

        async def terminate(runner: Runner) -> None:
            async with open_connection(dsn) as conn:
                pid = await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    [f"trio_cluster lock {runner.address}"[:63]],
                )
                assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", [pid])

        yield World(pg, terminate)


async def lose_and_regain(world: World, runner: Runner) -> None:
    """Take a runner's leases away and wait until it holds each shard again on a newer
    epoch: ``settled()`` alone may return before the runner has noticed the loss."""
    lost = dict(runner.shards)
    await world.lose_leases(runner)
    with trio.fail_after(10):
        while any(
            shard not in runner.shards or runner.shards[shard].epoch <= lease.epoch
            for shard, lease in lost.items()
        ):
            await runner.changed()
        await runner.settled()


@pytest.fixture(params=["memory", "postgres"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    async with open_world(request.param, dsn) as made:
        yield made


_keys = itertools.count()


def key() -> str:
    return f"k{next(_keys)}"


async def stored(world: World, entity_id: str, state: type[Any] = CartState) -> Any:
    return await stored_in(world.storage, entity_id, state)


async def stored_in(storage: Storage, entity_id: str, state: type[Any] = CartState) -> Any:
    data = await storage.states.load_state("Cart", entity_id)
    return None if data is None else msgspec.msgpack.decode(data, type=state)


# -- persisted requests: the state commits with the reply -----------------------------------


async def test_a_persisted_change_is_stored_with_its_reply_and_survives_passivation(
    world: World,
) -> None:
    impl, probe = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(add_item, "c1", Item("apple", key())) == 1
        assert await runner.ask(add_item, "c1", Item("pear", key())) == 2
        assert await stored(world, "c1") == CartState(["apple", "pear"], 2)
    # A new runner, a new activation: the state is what was committed.
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(peek, "c1", Nothing()) == ["apple", "pear"]
        assert await runner.ask(add_item, "c1", Item("plum", key())) == 3
    assert probe.activations == 2


async def test_a_duplicate_never_applies_twice(world: World) -> None:
    impl, _ = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        once = key()
        assert await runner.ask(add_item, "c1", Item("apple", once)) == 1
        assert await runner.ask(add_item, "c1", Item("apple", once)) == 1
        assert await runner.ask(peek, "c1", Nothing()) == ["apple"]


async def test_a_request_cut_short_before_its_reply_runs_again_on_the_committed_state(
    world: World,
) -> None:
    """The lease is lost while the handler holds a changed state: nothing of it is kept;
    the redelivered request applies its change once, to the last committed state."""
    impl, probe = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(add_item, "c1", Item("apple", key())) == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.tell, hold, "c1", Item("pear"))
            await probe.held.wait()
            await world.lose_leases(runner)
            with trio.fail_after(10):
                await runner.settled()
                probe.release.set()
                # Redelivered on the new lease: applied once, on ["apple"].
                while await stored(world, "c1") != CartState(["apple", "pear"], 2):
                    await trio.testing.wait_all_tasks_blocked()
        assert await runner.ask(peek, "c1", Nothing()) == ["apple", "pear"]


async def test_a_declared_error_commits_the_state_it_leaves(world: World) -> None:
    impl, _ = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        with pytest.raises(Oops):
            await runner.ask(add_then_fail, "c1", Item("apple"))
        assert await stored(world, "c1") == CartState(["apple"], 1)


async def test_a_defect_rolls_the_state_back(world: World) -> None:
    impl, probe = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(add_item, "c1", Item("apple", key())) == 1
        with pytest.raises(Exception, match="defect after changing"):
            await runner.ask(add_then_crash, "c1", Item("pear"))
        assert probe.crashes == 3  # every attempt started from the committed state
        assert await runner.ask(peek, "c1", Nothing()) == ["apple"]
        assert await stored(world, "c1") == CartState(["apple"], 1)


async def test_a_state_over_its_size_limit_fails_its_request_and_is_not_kept(
    world: World,
) -> None:
    impl, _ = cart(
        EntityOptions(max_state_size=10_000, defect_retry=TEST_CONFIG.entity_defaults.defect_retry)
    )
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(add_item, "c1", Item("apple", key())) == 1
        with pytest.raises(SerializationError, match="max_state_size"):
            await runner.ask(add_huge, "c1", Item("x"))
        assert await runner.ask(peek, "c1", Nothing()) == ["apple"]
        assert await stored(world, "c1") == CartState(["apple"], 1)


async def test_deleting_the_state_forgets_the_entity(world: World) -> None:
    impl, _ = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        for entity_id in ("c1", "c2", "c3"):
            await runner.ask(add_item, entity_id, Item("apple", key()))
        assert await runner.stored_state_ids(Cart) == ["c1", "c2", "c3"]
        assert await runner.stored_state_ids(Cart, after="c1", limit=1) == ["c2"]
        assert await runner.ask(forget, "c2", Nothing()) == 0
        assert await runner.stored_state_ids(Cart) == ["c1", "c3"]
        assert await runner.ask(peek, "c2", Nothing()) == []


# -- volatile requests: when their changes are stored -------------------------------------


async def test_volatile_changes_in_request_mode_are_stored_before_the_reply(
    world: World,
) -> None:
    impl, _ = cart(EntityOptions(state_save="request"))
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(add_volatile, "c1", Item("apple")) == 1
        assert await stored(world, "c1") == CartState(["apple"], 1)


async def test_volatile_changes_in_passivation_mode_are_stored_on_leaving(world: World) -> None:
    impl, probe = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(add_volatile, "c1", Item("apple")) == 1
        assert await stored(world, "c1") is None
    # Leaving the runner drains and passivates: the hook runs, the state is stored.
    assert probe.passivations == 1
    assert await stored(world, "c1") == CartState(["apple"], 1)


async def test_volatile_changes_in_interval_mode_are_stored_within_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, _ = cart(EntityOptions(state_save="interval", state_save_interval=5.0))
    storage = MemoryStorage()
    async with open_runner(impl, storage=storage, config=CONFIG) as runner:
        await runner.ask(add_volatile, "c1", Item("apple"))
        assert await storage.load_state("Cart", "c1") is None
        # Within one interval (mock time), the shard's flusher asks the idle entity to save.
        await trio.sleep(5.5)
        assert await stored_in(storage, "c1") == CartState(["apple"], 1)


async def test_volatile_changes_are_lost_with_the_lease_in_passivation_mode(world: World) -> None:
    impl, _ = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        await runner.ask(add_item, "c1", Item("apple", key()))
        await runner.ask(add_volatile, "c1", Item("pear"))
        await lose_and_regain(world, runner)
        # The volatile change was never stored; the persisted one was.
        assert await runner.ask(peek, "c1", Nothing()) == ["apple"]


# -- evolving a state type ------------------------------------------------------------------


async def test_an_old_snapshot_decodes_into_a_state_type_with_a_new_field(world: World) -> None:
    old, _ = cart()
    async with open_runner(old, storage=world.storage, config=CONFIG) as runner:
        await runner.ask(add_item, "c1", Item("apple", key()))
    new, _ = cart(state=CartStateV2)  # type: ignore[arg-type]
    async with open_runner(new, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(peek, "c1", Nothing()) == ["apple"]
        await runner.ask(add_item, "c1", Item("pear", key()))
    assert await stored(world, "c1", CartStateV2) == CartStateV2(["apple", "pear"], 2, "none")


async def test_an_undecodable_snapshot_refuses_requests_without_losing_persisted_ones(
    world: World,
) -> None:
    impl, _ = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        await runner.ask(add_item, "c1", Item("apple", key()))
        lease = runner.shards[Cart.shard_of("c1", CONFIG.shards_per_group)]
        # As if another deploy had written it with an incompatible type.
        await world.storage.states.save_state(lease, StateWrite("Cart", "c1", b"\x93\x01\x02\x03"))
        # The entity is still resident with its old state: passivate it, as idle time would.
        for shard_runtime in list(runner._shards.values()):
            for active in list(shard_runtime.entities.values()):
                active.passivate()
        with pytest.raises(SerializationError, match="does not decode into CartState"):
            await runner.ask(peek, "c1", Nothing())
        # A persisted request is not answered with the error: it waits in storage.
        with pytest.raises(Exception, match="no reply"):
            await runner.ask(add_item, "c1", Item("pear", key()), timeout=0.5)
        shard = Cart.shard_of("c1", CONFIG.shards_per_group)
        assert len(await world.storage.messages.unprocessed(shard)) == 1


# -- fencing ----------------------------------------------------------------------------------


async def test_a_stale_lease_cannot_write_state(world: World) -> None:
    impl, _ = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        await runner.ask(add_item, "c1", Item("apple", key()))
        shard = Cart.shard_of("c1", CONFIG.shards_per_group)
        stale = runner.shards[shard]
        await lose_and_regain(world, runner)
        assert runner.shards[shard].epoch > stale.epoch
        with pytest.raises(EntityNotAssignedToRunner):
            await world.storage.states.save_state(stale, StateWrite("Cart", "c1", b"\x80"))
        assert await stored(world, "c1") == CartState(["apple"], 1)


# -- the request context and the hooks -------------------------------------------------------


async def test_a_handler_learns_about_its_request_and_its_shard(world: World) -> None:
    impl, probe = cart()
    async with open_runner(impl, storage=world.storage, config=CONFIG) as runner:
        assert await runner.ask(info, "c1", Nothing()) == [False, 1, False]
        assert probe.activations == 1


def test_durable_state_needs_concurrency_one() -> None:
    impl, _ = cart(EntityOptions(concurrency=2))

    async def main() -> None:
        async with open_runner(impl, config=CONFIG):
            pass  # pragma: no cover

    with pytest.raises(ValueError, match="concurrency must be 1"):
        trio.run(main)
