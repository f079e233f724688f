"""Fan-out of storage notices to followers, bounded.

A follower that falls behind must cost neither unbounded memory nor the
notices of others: what does not fit is replaced by one Gap, after which
the follower rescans storage, which stays the source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio

from .base import Gap, Notice, Triage

log = logging.getLogger("trio_cluster.storage.notices")

NOTICE_BUFFER = 1024


class Follower:
    __slots__ = ("_channel", "_missed", "_triage")

    def __init__(self, channel: trio.MemorySendChannel[Notice], triage: Triage | None) -> None:
        self._channel = channel
        self._missed = False
        self._triage = triage

    def send(self, notice: Notice) -> None:
        """Pass a notice on without waiting (unless the triage dealt with it); note a
        gap when the buffer is full."""
        try:
            if self._missed:
                # Before any triage: the Gap must not wait for a notice that needs queueing.
                self._channel.send_nowait(Gap())
                self._missed = False
            if self._triage is not None:
                try:
                    if self._triage(notice):
                        return
                except Exception:
                    # A bug in the follower's triage: the notice takes the slow way.
                    log.exception("triage of %r failed", notice)
            self._channel.send_nowait(notice)
        except trio.WouldBlock:
            self._missed = True
        except trio.BrokenResourceError:
            pass


@contextmanager
def open_follower(
    triage: Triage | None = None,
) -> Iterator[tuple[Follower, trio.MemoryReceiveChannel[Notice]]]:
    send, receive = trio.open_memory_channel[Notice](NOTICE_BUFFER)
    with send, receive:
        yield Follower(send, triage), receive


class Followers:
    """Everyone following one source of notices (a storage, a lease session)."""

    __slots__ = ("_followers",)

    def __init__(self) -> None:
        self._followers: list[Follower] = []

    @asynccontextmanager
    async def follow(
        self, triage: Triage | None = None
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Notice]]:
        """A follower's channel, for as long as the ``async with`` lasts (``triage``:
        see `Triage`)."""
        with open_follower(triage) as (follower, receive):
            self._followers.append(follower)
            try:
                yield receive
            finally:
                self._followers.remove(follower)

    def send(self, notice: Notice) -> None:
        """Pass ``notice`` to every follower, without waiting (see `Follower.send`)."""
        for follower in self._followers:
            follower.send(notice)
