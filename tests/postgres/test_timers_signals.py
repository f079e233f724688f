"""Durable timers and signals (deferreds): one conformance suite, run against both storages.

Storage first (what arming, cancelling, suspending and completing store,
and what they refuse), then the runtime over it: a timer and a suspended
request outliving the runner that armed or suspended them, and reaching
whichever runner serves their shard next.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import msgspec
import pytest
import trio

from trio_cluster import (
    DeferredAlreadyCompleted,
    DeferredFailed,
    Entity,
    EntityContext,
    EntityNotAssignedToRunner,
    Implementation,
    Instrument,
    MalformedMessage,
    RpcClientError,
    open_runner,
)
from trio_cluster.core import reply as replies
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import ShardId, shard_index
from trio_cluster.prometheus import PrometheusMetrics
from trio_cluster.runtime.calls import Handling
from trio_cluster.runtime.deferreds import parse_token, resume_token
from trio_cluster.storage import NO_ORIGIN, Lease, Storage, Stored
from trio_cluster.storage.base import Notice
from trio_cluster.testing import TEST_CONFIG

from ..probe_client import sample

CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=4)
WAIT_S = 20.0


# -- storage ----------------------------------------------------------------------------------

_ids = itertools.count(1000)


def shard_of(entity_id: str) -> ShardId:
    return ShardId("default", shard_index(entity_id, CONFIG.shards_per_group))


def request(entity_id: str = "e", deliver_at_ms: int | None = None) -> Envelope:
    return Envelope(
        request_id=next(_ids),
        entity_type="Clock",
        entity_id=entity_id,
        shard_group="default",
        shard_index=shard_of(entity_id).index,
        rpc="tick",
        payload=msgspec.msgpack.encode(Tick()),
        persisted=True,
        deliver_at_ms=deliver_at_ms,
    )


@asynccontextmanager
async def lease_and_notices(
    storage: Storage, entity_id: str = "e"
) -> AsyncIterator[tuple[Lease, trio.MemoryReceiveChannel[Notice]]]:
    """A runner's session holding ``entity_id``'s shard, and the notices it hears."""
    async with (
        storage.runners.session(RunnerSpec("holder"), lambda _: None) as session,
        session.notices() as notices,
    ):
        lease = await session.acquire(shard_of(entity_id))
        assert lease is not None
        yield lease, notices


@asynccontextmanager
async def lease_of(storage: Storage, entity_id: str = "e") -> AsyncIterator[Lease]:
    async with lease_and_notices(storage, entity_id) as (lease, _):
        yield lease


async def unprocessed_ids(storage: Storage, entity_id: str = "e") -> list[int]:
    found = await storage.messages.unprocessed(shard_of(entity_id))
    return [envelope.request_id for envelope in found]


async def test_arming_a_name_replaces_its_timer_not_yet_due_and_cancel_deletes_it(
    storage: Storage,
) -> None:
    async with lease_of(storage) as lease:
        first, second = request(deliver_at_ms=5000), request(deliver_at_ms=6000)
        assert await storage.timers.arm_timer(lease, "t", first, now_ms=1000) == []
        assert await storage.timers.arm_timer(lease, "t", second, now_ms=1000) == [first.request_id]
        other = request(deliver_at_ms=7000)
        assert await storage.timers.arm_timer(lease, "u", other, now_ms=1000) == []
        assert await unprocessed_ids(storage) == [second.request_id, other.request_id]
        # Once due, a timer is an ordinary request: re-arming leaves it to run.
        third = request(deliver_at_ms=9000)
        assert await storage.timers.arm_timer(lease, "t", third, now_ms=6000) == []
        entity = ("Clock", "e")
        assert await storage.timers.cancel_timer(lease, entity, "u", now_ms=6000) == [
            other.request_id
        ]
        assert await storage.timers.cancel_timer(lease, entity, "u", now_ms=6000) == []
        assert await unprocessed_ids(storage) == [second.request_id, third.request_id]
        # A timer of the same name on another entity is another timer.
        assert await storage.timers.cancel_timer(lease, ("Clock", "f"), "t", now_ms=0) == []


async def test_timers_are_fenced_by_the_lease(storage: Storage) -> None:
    async with lease_of(storage) as lease:
        stale = attrs.evolve(lease, epoch=lease.epoch + 1)
        with pytest.raises(EntityNotAssignedToRunner):
            await storage.timers.arm_timer(stale, "t", request(deliver_at_ms=5000), now_ms=0)
        with pytest.raises(EntityNotAssignedToRunner):
            await storage.timers.cancel_timer(stale, ("Clock", "e"), "t", now_ms=0)
        assert await unprocessed_ids(storage) == []


async def test_a_suspended_request_waits_unseen_until_its_deferred_is_completed(
    storage: Storage,
) -> None:
    async with lease_and_notices(storage) as (lease, notices):
        waiting = request()
        await storage.messages.save_request(waiting, 1, announce=False)
        assert await storage.deferreds.suspend(waiting.request_id, "ok", lease)
        # Suspended: no scan offers it, no reply is stored.
        assert await unprocessed_ids(storage) == []
        assert await storage.messages.reply_for(waiting.request_id) is None
        assert await storage.deferreds.deferred_result(waiting.request_id, "ok") is None

        result = replies.success("yes")
        await storage.deferreds.complete_deferred(waiting.request_id, "ok", result)
        assert await storage.deferreds.deferred_result(waiting.request_id, "ok") == result
        assert await unprocessed_ids(storage) == [waiting.request_id]
        with trio.fail_after(WAIT_S):
            async for notice in notices:
                if isinstance(notice, Stored) and notice.request_id == waiting.request_id:
                    assert notice == Stored(shard_of("e"), waiting.request_id, NO_ORIGIN)
                    break

        with pytest.raises(DeferredAlreadyCompleted):
            await storage.deferreds.complete_deferred(waiting.request_id, "ok", b"again")
        assert await storage.deferreds.deferred_result(waiting.request_id, "ok") == result
        # A completed deferred is not waited on again: the request runs instead.
        assert not await storage.deferreds.suspend(waiting.request_id, "ok", lease)
        assert await unprocessed_ids(storage) == [waiting.request_id]


async def test_completing_before_the_suspension_is_stored_lets_the_request_run_on(
    storage: Storage,
) -> None:
    async with lease_of(storage) as lease:
        running = request()
        await storage.messages.save_request(running, 1, announce=False)
        await storage.deferreds.complete_deferred(running.request_id, "ok", replies.success(1))
        assert await unprocessed_ids(storage) == [running.request_id]
        assert not await storage.deferreds.suspend(running.request_id, "ok", lease)
        # Suspending again on a deferred still waited on is no refusal.
        assert await storage.deferreds.suspend(running.request_id, "later", lease)
        assert await storage.deferreds.suspend(running.request_id, "later", lease)
        stale = attrs.evolve(lease, epoch=lease.epoch + 1)
        with pytest.raises(EntityNotAssignedToRunner):
            await storage.deferreds.suspend(running.request_id, "other", stale)


async def test_a_deferred_of_no_stored_request_is_malformed(storage: Storage) -> None:
    with pytest.raises(MalformedMessage):
        await storage.deferreds.complete_deferred(424242, "ok", replies.success(1))


def test_a_resume_token_names_its_request_and_deferred_and_nothing_else_parses() -> None:
    token = resume_token(ShardId("default", 3), 12345, "approval")
    assert parse_token(token) == (12345, "approval")
    for bad in ["", "d1.", "d1.!!!", "x" + token, "d1.kQ"]:
        with pytest.raises(MalformedMessage):
            parse_token(bad)


# -- the runtime ------------------------------------------------------------------------------


class Tick(msgspec.Struct, frozen=True):
    label: str = ""


class Arm(msgspec.Struct, frozen=True):
    name: str
    label: str
    seconds: float


class Name(msgspec.Struct, frozen=True):
    name: str


class Order(msgspec.Struct, frozen=True):
    order_id: str


Clock = Entity("Clock")
tick = Clock.rpc("tick", Tick, type(None), persisted=True)
arm = Clock.rpc("arm", Arm, type(None), persisted=True)
cancel = Clock.rpc("cancel", Name, bool, persisted=True)
approve = Clock.rpc("approve", Order, str, persisted=True, primary_key=lambda o: o.order_id)
misuse = Clock.rpc("misuse", Name, str)


@attrs.define
class Seen:
    ticks: list[tuple[str, str | None]] = attrs.Factory(list)
    ticked: trio.Event = attrs.Factory(trio.Event)
    tokens: list[str] = attrs.Factory(list)
    suspended: trio.Event = attrs.Factory(trio.Event)


class ClockHandler:
    seen = Seen()

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @tick.handler
    async def tick(self, t: Tick) -> None:
        self.seen.ticks.append((t.label, self.ctx.request.headers.get("trio-cluster-timer")))
        self.seen.ticked.set()

    @arm.handler
    async def arm(self, a: Arm) -> None:
        await self.ctx.timers.arm(a.name, tick, Tick(a.label), after=a.seconds)

    @cancel.handler
    async def cancel(self, n: Name) -> bool:
        return await self.ctx.timers.cancel(n.name)

    @approve.handler
    async def approve(self, o: Order) -> str:
        token = self.ctx.resume_token("approval")
        self.seen.tokens.append(token)
        self.seen.suspended.set()
        try:
            verdict = await self.ctx.deferred("approval", str)
        except DeferredFailed as refused:
            return f"{o.order_id}: refused ({refused.message})"
        return f"{o.order_id}: {verdict}"

    @misuse.handler
    async def misuse(self, n: Name) -> str:
        return await self.ctx.deferred(n.name, str)


class Suspensions(Instrument):
    """Sets ``stored`` once a handling ends suspended (its suspension is stored)."""

    def __init__(self) -> None:
        self.stored = trio.Event()

    def handling_finished(self, handling: Handling, outcome: str) -> None:
        if outcome == "suspended":
            self.stored.set()


def clock() -> tuple[Implementation, Seen]:
    seen = Seen()
    handler = type("SeenClock", (ClockHandler,), {"seen": seen})
    return Clock.implement(handler), seen


async def test_a_timer_armed_on_one_runner_fires_on_the_next_and_cancel_and_rearm_hold(
    storage: Storage,
) -> None:
    impl, seen = clock()
    armed_here, fired_here = PrometheusMetrics(), PrometheusMetrics()
    async with open_runner(
        impl, storage=storage, config=CONFIG, instruments=[armed_here]
    ) as runner:
        await runner.ask(arm, "c1", Arm("later", "first", 3600))
        await runner.ask(arm, "c1", Arm("gone", "cancelled", 3600))
        assert await runner.ask(cancel, "c1", Name("gone"))
        assert not await runner.ask(cancel, "c1", Name("gone"))
        # Re-armed by name, last: the runner leaves before it is due.
        await runner.ask(arm, "c1", Arm("later", "replaced", 1.0))
        snapshot = runner.snapshot()
        assert (snapshot.timers_armed, snapshot.timers_cancelled) == (3, 1)
    assert seen.ticks == []  # the runner left before anything was due
    impl, seen = clock()
    async with open_runner(
        impl, storage=storage, config=CONFIG, instruments=[fired_here]
    ) as runner:
        with trio.fail_after(WAIT_S):
            await seen.ticked.wait()
        assert seen.ticks == [("replaced", "later")]
        assert runner.snapshot().timers_fired == 1
    assert timer_counts(armed_here) == {"armed": 3, "fired": 0, "cancelled": 1}
    assert timer_counts(fired_here) == {"armed": 0, "fired": 1, "cancelled": 0}


def timer_counts(metrics: PrometheusMetrics) -> dict[str, float]:
    exposition = metrics.exposition()
    return {
        how: sample(exposition, "trio_cluster_timers_total", entity_type="Clock", how=how)
        for how in ("armed", "fired", "cancelled")
    }


def deferred_counts(metrics: PrometheusMetrics) -> tuple[float, float, float]:
    """Suspensions, completions and failures of deferreds counted by ``metrics``."""
    exposition = metrics.exposition()
    completions = "trio_cluster_deferred_completions_total"
    return (
        sample(exposition, "trio_cluster_deferred_suspensions_total", entity_type="Clock"),
        sample(exposition, completions, how="completed"),
        sample(exposition, completions, how="failed"),
    )


async def test_a_suspended_request_resumes_on_the_next_runner_and_its_caller_gets_the_result(
    storage: Storage,
) -> None:
    completer, suspender = PrometheusMetrics(), PrometheusMetrics()
    async with open_runner(storage=storage, config=CONFIG, instruments=[completer]) as caller:
        outcome: list[str] = []
        answered = trio.Event()

        async def ask() -> None:
            outcome.append(await caller.ask(approve, "c2", Order("o-1"), timeout=WAIT_S))
            answered.set()

        async with trio.open_nursery() as nursery:
            impl, seen = clock()
            suspensions = Suspensions()
            async with open_runner(
                impl, storage=storage, config=CONFIG, instruments=[suspensions, suspender]
            ) as first:
                nursery.start_soon(ask)
                with trio.fail_after(WAIT_S):
                    await suspensions.stored.wait()
                assert first.snapshot().deferreds_suspended == 1
            # No runner hosts the entity now: the deferred is completed all the same.
            token = seen.tokens[0]
            await caller.complete_deferred(token, "approved")
            with pytest.raises(DeferredAlreadyCompleted):
                await caller.fail_deferred(token, "too late")
            completions = caller.snapshot()
            assert (completions.deferreds_completed, completions.deferreds_failed) == (1, 0)
            impl, seen = clock()
            async with open_runner(impl, storage=storage, config=CONFIG):
                with trio.fail_after(WAIT_S):
                    await answered.wait()
        assert outcome == ["o-1: approved"]
        assert seen.tokens == [token]  # the handler ran again from the start, same token
        # Answered from storage from now on, like any persisted request.
        assert await caller.ask(approve, "c2", Order("o-1")) == "o-1: approved"
    assert deferred_counts(suspender) == (1, 0, 0)
    assert deferred_counts(completer) == (0, 1, 0)


async def test_a_failed_deferred_raises_in_the_handler_and_volatile_requests_cannot_suspend(
    storage: Storage,
) -> None:
    impl, seen = clock()
    metrics = PrometheusMetrics()
    async with open_runner(impl, storage=storage, config=CONFIG, instruments=[metrics]) as runner:
        async with trio.open_nursery() as nursery:
            outcome: list[str] = []

            async def ask() -> None:
                outcome.append(await runner.ask(approve, "c3", Order("o-2"), timeout=WAIT_S))

            nursery.start_soon(ask)
            with trio.fail_after(WAIT_S):
                await seen.suspended.wait()
            await runner.fail_deferred(seen.tokens[0], "over budget")
        assert outcome == ["o-2: refused (over budget)"]
        # Failed, maybe before the handler suspended: its suspensions are 0 or 1.
        snapshot = runner.snapshot()
        assert (snapshot.deferreds_completed, snapshot.deferreds_failed) == (0, 1)
        assert deferred_counts(metrics)[1:] == (0, 1)
        with pytest.raises(RpcClientError, match="volatile"):
            await runner.ask(misuse, "c3", Name("x"))
        with pytest.raises(MalformedMessage):
            await runner.complete_deferred("not a token", 1)
