"""Fan-out of storage notices to followers, bounded.

A follower that falls behind must cost neither unbounded memory nor the
notices of others: what does not fit is replaced by one Gap, after which
the follower rescans storage, which stays the source of truth.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

from .base import Gap, Notice

NOTICE_BUFFER = 1024


class Follower:
    __slots__ = ("_channel", "_missed")

    def __init__(self, channel: trio.MemorySendChannel[Notice]) -> None:
        self._channel = channel
        self._missed = False

    def send(self, notice: Notice) -> None:
        """Pass a notice on without waiting; note a gap when the buffer is full."""
        try:
            if self._missed:
                self._channel.send_nowait(Gap())
                self._missed = False
            self._channel.send_nowait(notice)
        except trio.WouldBlock:
            self._missed = True
        except trio.BrokenResourceError:
            pass


@contextmanager
def open_follower() -> Iterator[tuple[Follower, trio.MemoryReceiveChannel[Notice]]]:
    send, receive = trio.open_memory_channel[Notice](NOTICE_BUFFER)
    with send, receive:
        yield Follower(send), receive


class Followers:
    """Everyone following one source of notices (a storage, a lease session)."""

    __slots__ = ("_followers",)

    def __init__(self) -> None:
        self._followers: list[Follower] = []

    @asynccontextmanager
    async def follow(self) -> AsyncIterator[trio.MemoryReceiveChannel[Notice]]:
        """A follower's channel, for as long as the ``async with`` lasts."""
        with open_follower() as (follower, receive):
            self._followers.append(follower)
            try:
                yield receive
            finally:
                self._followers.remove(follower)

    def send(self, notice: Notice) -> None:
        """Pass ``notice`` to every follower, without waiting (see `Follower.send`)."""
        for follower in self._followers:
            follower.send(notice)
