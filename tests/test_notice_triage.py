"""Notices dealt with where they arrive, and those left for the follower's task.

Every runner hears every notice, so most concern another runner: the triage
drops those, and resolves a caller whose reply the notice carries, in the task
that read the notice; only what needs a wait (a read, a shard's delivery) is
queued for the follower's task, whose acting on notices is tested with the
runtime (tests/test_runtime.py, tests/postgres).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import pytest
import trio

from trio_cluster.core.hashing import ShardId
from trio_cluster.runtime.hooks import Hooks
from trio_cluster.runtime.notices import NoticeFollower
from trio_cluster.runtime.replies import StoredReplies
from trio_cluster.runtime.shard import ShardRuntime
from trio_cluster.runtime.stored_streams import StreamWatchers
from trio_cluster.storage import (
    Gap,
    InterruptStored,
    MembershipChanged,
    MemoryStorage,
    Notice,
    Replied,
    Stored,
)
from trio_cluster.storage.notices import NOTICE_BUFFER, Followers

ME, PEER = 1, 2
SERVED, ELSEWHERE = ShardId("default", 3), ShardId("default", 4)


class World:
    def __init__(self) -> None:
        self.replies = StoredReplies()
        self.membership_changes = 0
        shards = cast(Mapping[ShardId, ShardRuntime], {SERVED: object()})
        self.follower = NoticeFollower(
            messages=MemoryStorage().messages,
            notices=Followers().follow,
            shards=shards,
            stored_replies=self.replies,
            watchers=StreamWatchers(),
            machine_id=lambda: ME,
            membership_changed=self.changed,
            hooks=Hooks(),
        )

    def changed(self) -> None:
        self.membership_changes += 1


@pytest.mark.parametrize(
    ("notice", "dealt_with"),
    [
        (Stored(SERVED, 10, PEER), False),  # to deliver: a read, an offer
        (Stored(SERVED, 10, ME), True),  # offered here directly when stored
        (Stored(ELSEWHERE, 10, PEER), True),  # another runner's shard
        (InterruptStored(SERVED, 10, PEER), False),
        (InterruptStored(ELSEWHERE, 10, PEER), True),
        (Replied(10, PEER, b"r"), True),  # nobody here waits for it
        (Replied(10, ME, b"r"), True),  # resolved here when written
        (Gap(), False),
    ],
)
def test_what_the_triage_drops_and_what_it_leaves(notice: Notice, dealt_with: bool) -> None:
    assert World().follower.triage(notice) is dealt_with


async def test_a_carried_reply_resolves_its_waiter_at_once() -> None:
    world = World()
    slot = world.replies.expect(10)
    assert world.follower.triage(Replied(10, PEER, b"reply"))
    with trio.fail_after(1):
        assert await slot.wait() == b"reply"


def test_a_reply_too_large_to_carry_is_left_to_be_read() -> None:
    world = World()
    world.replies.expect(10)
    assert not world.follower.triage(Replied(10, PEER, None))


def test_a_membership_change_wakes_the_keeper_at_once() -> None:
    world = World()
    assert world.follower.triage(MembershipChanged())
    assert world.membership_changes == 1


async def test_a_notice_whose_triage_fails_is_queued() -> None:
    def broken(notice: Notice) -> bool:
        raise RuntimeError("bug")

    followers = Followers()
    async with followers.follow(broken) as channel:
        followers.send(Gap())
        assert isinstance(channel.receive_nowait(), Gap)


async def test_only_what_the_triage_leaves_is_queued() -> None:
    world = World()
    followers = Followers()
    async with followers.follow(world.follower.triage) as channel:
        for notice in (Stored(ELSEWHERE, 1, PEER), Stored(SERVED, 2, PEER), Replied(3, PEER, b"")):
            followers.send(notice)
        assert channel.receive_nowait() == Stored(SERVED, 2, PEER)
        with pytest.raises(trio.WouldBlock):
            channel.receive_nowait()


async def test_a_gap_is_not_held_back_by_notices_the_triage_deals_with() -> None:
    """After an overflow the follower must hear of the gap at the next notice of any
    kind, even one the triage drops: else it would wait for a notice it needs."""
    world = World()
    followers = Followers()
    async with followers.follow(world.follower.triage) as channel:
        for n in range(NOTICE_BUFFER + 1):  # the last one overflows
            followers.send(Stored(SERVED, n, PEER))
        while True:
            try:
                channel.receive_nowait()
            except trio.WouldBlock:
                break
        followers.send(Stored(ELSEWHERE, 1, PEER))  # dropped by the triage
        assert isinstance(channel.receive_nowait(), Gap)
