"""Interrupts: an ask that stops waiting cancels its request's handler, here and across runners.

Each test withdraws a request at a known point (its handler has started,
or it waits in the mailbox) by cancelling the ``ask``, or by its timeout
on the mock clock, and then waits on the handler's own record of being
cancelled: no sleeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_cluster import (
    EntityOptions,
    Interrupted,
    MailboxFull,
    MemoryStorage,
    Runner,
    SendTimeout,
)
from trio_cluster.core.envelope import Envelope
from trio_cluster.testing import TEST_CONFIG, open_test_cluster, open_test_runner

from .interrupt_entities import (
    Job,
    Sleeper,
    hang,
    hang_persisted,
    note,
    quick,
    sleepers,
    stateless_sleepers,
    steady,
)


async def withdrawn_once(started: Callable[[], Awaitable[None]], call: Awaitable[Any]) -> None:
    """Run ``call`` until ``started`` returns, then cancel it (the caller stops waiting)."""
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            with trio.CancelScope() as scope:
                cancel.append(scope)
                await call

        cancel: list[trio.CancelScope] = []
        nursery.start_soon(send)
        await started()
        cancel[0].cancel()


# -- one runner ---------------------------------------------------------------------------


async def test_a_cancelled_ask_cancels_its_handler_and_the_entity_goes_on() -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, _):
        await withdrawn_once(lambda: recorder.wait_for("started", 1), runner.ask(hang, "s", Job(1)))
        await recorder.wait_for("cancelled", 1)
        # The interrupted request's state change was rolled back; the entity serves on.
        assert await runner.ask(quick, "s", Job(2)) == 0
        assert recorder.of(1) == ["started", "cancelled"]


async def test_a_timed_out_ask_cancels_its_handler(autojump_clock: trio.testing.MockClock) -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(SendTimeout):
            await runner.ask(hang, "s", Job(1), timeout=1.0)
        await recorder.wait_for("cancelled", 1)


async def test_interrupt_false_leaves_the_handler_running() -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, _):
        await withdrawn_once(
            lambda: recorder.wait_for("started", 1),
            runner.ask(hang, "s", Job(1), interrupt=False),
        )
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.of(1) == ["started"]


async def test_an_uninterruptible_rpc_runs_to_its_end() -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, _):
        started = lambda: recorder.wait_for("started", 1)  # noqa: E731
        await withdrawn_once(started, runner.ask(steady, "s", Job(1)))
        recorder.release.set()
        await recorder.wait_for("finished", 1)
        assert await runner.ask(quick, "s", Job(2)) == 1  # its state change stands


async def test_a_withdrawn_request_still_in_the_mailbox_never_runs() -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, _), trio.open_nursery() as nursery:
        nursery.start_soon(runner.ask, steady, "s", Job(1))
        await recorder.wait_for("started", 1)
        await withdrawn_once(trio.testing.wait_all_tasks_blocked, runner.ask(quick, "s", Job(2)))
        recorder.release.set()
        assert await runner.ask(quick, "s", Job(3)) == 1
        assert recorder.events == [("started", 1), ("finished", 1), ("ran", 3)]


async def test_at_concurrency_two_only_the_withdrawn_handler_is_cancelled() -> None:
    impl, recorder = stateless_sleepers(EntityOptions(concurrency=2))
    async with open_test_runner(impl) as (runner, _), trio.open_nursery() as nursery:
        answers: list[int] = []

        async def ask_steady() -> None:
            answers.append(await runner.ask(steady, "s", Job(1)))

        nursery.start_soon(ask_steady)
        await recorder.wait_for("started", 1)
        await withdrawn_once(lambda: recorder.wait_for("started", 2), runner.ask(hang, "s", Job(2)))
        await recorder.wait_for("cancelled", 2)
        recorder.release.set()
        await recorder.wait_for("finished", 1)
    assert answers == [1]


# -- persisted requests -------------------------------------------------------------------


async def test_a_withdrawn_persisted_request_stores_interrupted_as_its_reply() -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, _):
        await withdrawn_once(
            lambda: recorder.wait_for("started", 1),
            runner.ask(hang_persisted, "s", Job(1, key="k"), interrupt=True),
        )
        await recorder.wait_for("cancelled", 1)
        # A later ask by primary key sees the stored outcome; nothing ran again.
        with pytest.raises(Interrupted, match="withdrawn by its caller"):
            await runner.ask(hang_persisted, "s", Job(1, key="k"))
        assert recorder.of(1) == ["started", "cancelled"]
        assert await runner.ask(quick, "s", Job(2)) == 0  # its state change rolled back


async def test_a_persisted_request_is_left_running_by_default() -> None:
    impl, recorder = sleepers()
    async with open_test_runner(impl) as (runner, storage):
        await withdrawn_once(
            lambda: recorder.wait_for("started", 1),
            runner.ask(hang_persisted, "s", Job(1, key="k")),
        )
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.of(1) == ["started"]
        (pending,) = await storage.unprocessed(Sleeper.shard_of("s", TEST_CONFIG.shards_per_group))
        assert not pending.interrupted


async def test_a_marked_request_is_answered_interrupted_on_redelivery_without_running() -> None:
    impl, recorder = sleepers()
    storage = MemoryStorage()
    stored = Envelope(
        request_id=12345,
        entity_type="Sleeper",
        entity_id="s",
        shard_group="default",
        shard_index=Sleeper.shard_of("s", TEST_CONFIG.shards_per_group).index,
        rpc="hang_persisted",
        payload=b"\x92\x01\xa1k",
        persisted=True,
        primary_key="k",
    )
    await storage.save_request(stored, 0, announce=False)
    assert await storage.interrupt(12345, 0)
    async with open_test_runner(impl, storage=storage) as (runner, _):
        with pytest.raises(Interrupted, match="before its handler started"):
            await runner.ask(hang_persisted, "s", Job(1, key="k"))
    assert recorder.events == []


# -- across runners -----------------------------------------------------------------------


def sender_and_owner(runners: list[Runner], entity_id: str) -> tuple[Runner, Runner]:
    shard = Sleeper.shard_of(entity_id, TEST_CONFIG.shards_per_group)
    owner = next(r for r in runners if shard in r.shards)
    sender = next(r for r in runners if r is not owner)
    return sender, owner


async def test_a_withdrawn_ask_cancels_the_handler_on_another_runner() -> None:
    impl, recorder = sleepers()
    async with open_test_cluster(impl, runners=2) as cluster:
        sender, _ = sender_and_owner(cluster.runners, "s")
        await withdrawn_once(lambda: recorder.wait_for("started", 1), sender.ask(hang, "s", Job(1)))
        await recorder.wait_for("cancelled", 1)
        assert await sender.ask(quick, "s", Job(2)) == 0


async def test_a_withdrawn_persisted_ask_cancels_the_handler_on_another_runner() -> None:
    impl, recorder = sleepers()
    async with open_test_cluster(impl, runners=2) as cluster:
        sender, _ = sender_and_owner(cluster.runners, "s")
        await withdrawn_once(
            lambda: recorder.wait_for("started", 1),
            sender.ask(hang_persisted, "s", Job(1, key="k"), interrupt=True),
        )
        await recorder.wait_for("cancelled", 1)
        with pytest.raises(Interrupted):
            await sender.ask(hang_persisted, "s", Job(1, key="k"))


# -- acknowledged tell --------------------------------------------------------------------


async def test_a_tell_to_another_runner_hears_its_refusal_unless_fire_and_forget() -> None:
    impl, recorder = sleepers(EntityOptions(mailbox_capacity=1))
    async with open_test_cluster(impl, runners=2) as cluster, trio.open_nursery() as nursery:
        sender, _ = sender_and_owner(cluster.runners, "s")
        nursery.start_soon(sender.ask, steady, "s", Job(1))
        await recorder.wait_for("started", 1)
        await sender.tell(note, "s", Job(2))  # acknowledged: queued
        with pytest.raises(MailboxFull):
            await sender.tell(note, "s", Job(3))
        await sender.tell(note, "s", Job(4), ack=False)  # refused, unheard
        with pytest.raises(MailboxFull):  # frames are taken in order: 4 was refused first
            await sender.tell(note, "s", Job(5))
        recorder.release.set()
        await sender.tell(note, "s", Job(6))
        await recorder.wait_for("noted", 6)
        assert [n for what, n in recorder.events if what == "noted"] == [2, 6]
