"""Acting on what other runners store: requests for shards owned here, awaited replies.

The follower reads what notices announce: requests for a shard served here
(one read per shard and batch of notices; a failed one becomes the shard's own
rescan), the stored reply a caller here waits for when its notice could not
carry it (a notice that carries it resolves the caller with no read), the
interrupt of a persisted request of a shard served here (its handler is
cancelled), the chunks and acks of persisted streams whose end is here (see
:mod:`.stored_streams`); a changed membership, or a gap in the notices, wakes the
shard keeper. Notices of one batch are acted on in order of kind: stored requests
are queued before interrupts are applied, so an interrupt that follows its
request's notice finds it.

Most notices need no wait: every runner hears every stored request's notice
(and a reply's, when storage announces it to all), so most concern another
runner, and a reply the notice carries resolves its caller at once.
Those are dealt with as they arrive (``triage``, in the task that read them),
without waking the follower's task: a persisted ask's two notices cost each
runner that is neither its caller nor its owner no task step at all, and its
caller one step fewer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager

import trio

from ..core.hashing import ShardId
from ..errors import PersistenceError
from ..storage.base import (
    ChunksAcked,
    ChunkStored,
    Gap,
    InterruptStored,
    MembershipChanged,
    MessageStorage,
    Notice,
    Replied,
    Stored,
    Triage,
)
from .hooks import Hooks
from .replies import StoredReplies
from .shard import ShardRuntime
from .stored_streams import StreamWatchers

log = logging.getLogger("trio_cluster.runner")

NOTICE_BATCH = 500
"""Most notices handled in one pass."""


class NoticeFollower:
    def __init__(
        self,
        *,
        messages: MessageStorage,
        notices: Callable[[Triage], AbstractAsyncContextManager[trio.MemoryReceiveChannel[Notice]]],
        shards: Mapping[ShardId, ShardRuntime],
        stored_replies: StoredReplies,
        watchers: StreamWatchers,
        machine_id: Callable[[], int],
        membership_changed: Callable[[], None],
        hooks: Hooks,
    ) -> None:
        self._messages = messages
        self._notices = notices
        self._shards = shards
        self._stored_replies = stored_replies
        self._watchers = watchers
        self._machine_id = machine_id
        self._membership_changed = membership_changed
        self._hooks = hooks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow notices for the runner's lifetime.

        Started before any shard is acquired, so every request stored after
        a shard's redelivery scan is announced to its new owner.
        """
        async with self._notices(self.triage) as notices:
            task_status.started()
            async for first in notices:
                # Everything already waiting is handled in one pass.
                batch = [first]
                with contextlib.suppress(trio.WouldBlock):
                    while len(batch) < NOTICE_BATCH:
                        batch.append(notices.receive_nowait())
                try:
                    await self._act_on(batch)
                except Exception as bug:
                    # A bug: this batch is given up (storage stays the truth, and
                    # rescans and callers' timeouts bound what it delays), not the
                    # follower.
                    log.exception("acting on %s notices failed", len(batch))
                    self._hooks.contained_failure("notice follower", bug)

    def triage(self, notice: Notice) -> bool:
        """Deal with ``notice`` at once when that needs no wait (see `Triage`)."""
        match notice:
            case Replied(request_id, origin, reply):
                if origin == self._machine_id() or request_id not in self._stored_replies:
                    return True
                if reply is None:
                    return False  # to be read
                self._stored_replies.resolve(request_id, reply)
                return True
            case Stored(shard_id, _, origin) | InterruptStored(shard_id, _, origin):
                # A shard not served here now is not served when the notice would be
                # acted on either: it enters the map before its first scan, and a
                # request that scan misses is announced after it.
                return origin == self._machine_id() or shard_id not in self._shards
            case MembershipChanged():
                self._membership_changed()
                return True
        return False

    async def _act_on(self, batch: list[Notice]) -> None:
        me = self._machine_id()
        stored: dict[ShardId, list[int]] = {}
        replied: list[int] = []
        interrupted: list[tuple[ShardId, int]] = []
        carried: dict[int, bytes] = {}
        for notice in batch:
            match notice:
                case Gap():
                    # A membership notice may have been among the missed ones.
                    self._membership_changed()
                    for served in list(self._shards.values()):
                        served.rescan()
                    replied = self._stored_replies.waiting()
                    self._watchers.gap()
                    stored.clear()
                    break
                case ChunkStored(request_id, seq, _, chunk):
                    # From any runner: a stream's two ends may share one.
                    self._watchers.chunk_stored(request_id, seq, chunk)
                case ChunksAcked(request_id):
                    self._watchers.acked(request_id)
                case MembershipChanged():
                    self._membership_changed()
                case Replied(request_id, origin, reply) if origin != me:
                    if request_id in self._stored_replies:
                        if reply is None:
                            replied.append(request_id)
                        else:
                            carried[request_id] = reply
                case Stored(shard_id, request_id, origin) if origin != me:
                    stored.setdefault(shard_id, []).append(request_id)
                case InterruptStored(shard_id, request_id, origin) if origin != me:
                    interrupted.append((shard_id, request_id))
        for shard_id, request_ids in stored.items():
            shard = self._shards.get(shard_id)
            if shard is not None:
                await shard.deliver_stored(request_ids)
        for shard_id, request_id in interrupted:
            shard = self._shards.get(shard_id)
            if shard is not None:
                shard.interrupts.interrupt(request_id)
        for request_id, reply in carried.items():
            self._stored_replies.resolve(request_id, reply)
        for request_id in replied:
            await self._fetch_reply(request_id)

    async def _fetch_reply(self, request_id: int) -> None:
        try:
            reply = await self._messages.reply_for(request_id)
        except PersistenceError as error:
            # The caller's own timeout bounds its wait; a later notice or
            # duplicate ask can still find the stored reply.
            log.warning("could not read the reply to %s: %s", request_id, error)
            return
        if reply is not None:
            self._stored_replies.resolve(request_id, reply)
