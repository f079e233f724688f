"""Expiries: the deadlines of reply waits, kept by one task instead of a cancel scope each."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core import reply as replies
from trio_cluster.errors import RunnerUnavailable
from trio_cluster.runtime.expiry import GRAIN, Expiries
from trio_cluster.runtime.replies import ReplySlot


@asynccontextmanager
async def running(expiries: Expiries) -> AsyncIterator[trio.Nursery]:
    """``expiries`` with its task running (it starts before the body), cancelled after."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(expiries.run)
        await trio.testing.wait_all_tasks_blocked()
        yield nursery
        nursery.cancel_scope.cancel()


async def test_a_wait_ends_at_its_deadline_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    expiries = Expiries()
    async with running(expiries):
        slot = ReplySlot()
        start = trio.current_time()
        assert await expiries.wait(slot, start + 1.0) is None
        waited = trio.current_time() - start
        assert 1.0 <= waited <= 1.0 + GRAIN + 1e-9
        assert slot.expired and not slot.answered
        assert len(expiries) == 0


async def test_a_reply_before_the_deadline_is_returned_and_unfiled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    expiries = Expiries()
    async with running(expiries) as nursery:
        slot = ReplySlot()
        nursery.start_soon(expiries.wait, ReplySlot(), trio.current_time() + 5.0)

        async def answer() -> None:
            await trio.sleep(0.5)
            assert len(expiries) == 2
            slot.resolve(b"reply")

        nursery.start_soon(answer)
        assert await expiries.wait(slot, trio.current_time() + 1.0) == b"reply"
        assert slot.answered and not slot.expired
        assert len(expiries) == 1  # the other wait, still filed
        slot.expire()  # an expiry after the reply changes nothing
        assert slot.answered and slot.reply == b"reply"


async def test_without_its_task_a_wait_takes_a_cancel_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    expiries = Expiries()
    start = trio.current_time()
    assert await expiries.wait(ReplySlot(), start + 2.0) is None
    assert trio.current_time() - start == pytest.approx(2.0)
    assert len(expiries) == 0


async def test_no_deadline_waits_for_the_reply(autojump_clock: trio.testing.MockClock) -> None:
    expiries = Expiries()
    slot = ReplySlot()
    async with running(expiries) as nursery:

        async def answer() -> None:
            await trio.sleep(3600)
            slot.resolve(b"late")

        nursery.start_soon(answer)
        assert await expiries.wait(slot, math.inf) == b"late"


async def test_a_stopped_task_fails_the_waits_it_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    expiries = Expiries()
    slot = ReplySlot()
    async with trio.open_nursery() as nursery:
        keeper = trio.CancelScope()

        async def run() -> None:
            with keeper:
                await expiries.run()

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()

        async def stop() -> None:
            await trio.sleep(1)
            keeper.cancel()

        nursery.start_soon(stop)
        reply = await expiries.wait(slot, trio.current_time() + 60)
    assert reply is not None
    with pytest.raises(RunnerUnavailable, match="closed"):
        replies.decode(reply, msgspec.msgpack.Decoder(int), {})
    assert len(expiries) == 0


async def test_a_sooner_deadline_wakes_the_task(autojump_clock: trio.testing.MockClock) -> None:
    expiries = Expiries()
    async with running(expiries) as nursery:
        nursery.start_soon(expiries.wait, ReplySlot(), trio.current_time() + 100)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert await expiries.wait(ReplySlot(), start + 1) is None
        assert trio.current_time() - start <= 1 + GRAIN + 1e-9


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1.0),  # deadline
            st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),  # answered at
        ),
        max_size=40,
    ),
    st.lists(st.floats(min_value=0.0, max_value=1.2), max_size=20),
)
def test_expire_is_never_early_nor_late_by_more_than_a_bucket(
    waits: list[tuple[float, float | None]], looks: list[float]
) -> None:
    """Driven by hand: whatever the order of replies and looks, a wait expires in
    [deadline, deadline + grain] unless answered first, and nothing stays filed."""
    grain = 0.01
    expiries = Expiries(grain)
    slots = [(ReplySlot(), deadline, answered) for deadline, answered in waits]
    filed = [expiries._file(slot, deadline) for slot, deadline, _ in slots]
    events = sorted(
        [(at, "look", -1) for at in looks]
        + [(at, "answer", i) for i, (_, _, at) in enumerate(slots) if at is not None]
        + [(1.2, "look", -1)]
    )
    for now, kind, i in events:
        if kind == "answer":
            slot, _, _ = slots[i]
            slot.resolve(b"r")
            if not slot.expired:
                expiries._unfile(slot, filed[i])
            continue
        expiries.expire(now)
        for (slot, deadline, answered), tick in zip(slots, filed, strict=True):
            due = tick * grain
            assert deadline <= due < deadline + grain + 1e-12
            if slot.expired:
                assert answered is None or answered >= deadline
                assert now >= deadline
            elif answered is None or answered > now:
                assert now < due  # not yet expired: not yet due
    assert all(slot.answered or slot.expired for slot, _, _ in slots)
    assert len(expiries) == 0
    assert expiries._ticks == []


def test_far_deadlines_answered_leave_the_heap_bounded() -> None:
    """Each wait in a bucket of its own, far ahead (a long timeout), answered at once:
    the emptied buckets' ticks are not kept until they are due."""
    expiries = Expiries(0.01)
    for i in range(10_000):
        slot = ReplySlot()
        tick = expiries._file(slot, 1e6 + i * 0.01)
        slot.resolve(b"r")
        expiries._unfile(slot, tick)
    assert len(expiries) == 0
    assert len(expiries._ticks) <= 65
