"""Where replies go: one caller's slot, and the waiters of stored (persisted) requests.

A volatile request carries its reply target with it (see :mod:`.delivery`),
so its reply can reach no one but its own caller. A persisted request is
answered through storage as well: its reply may be announced by a notice
from another runner, and duplicates of it wait on the original's id. Those
waiters are found here by request id, which is safe because persisted
request ids come from storage, never from a peer.
"""

from __future__ import annotations

import trio

from ..core.reply import ReplyTarget


class ReplySlot:
    """One wait for one reply; the first resolution wins, later ones are ignored."""

    __slots__ = ("_event", "expired", "reply")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.reply = b""
        self.expired = False
        """Its caller's deadline passed first (see :mod:`.expiry`)."""

    def resolve(self, reply: bytes) -> None:
        if not self._event.is_set():
            self.reply = reply
            self._event.set()

    def expire(self) -> None:
        """End the wait with no reply: the caller's deadline passed."""
        if not self._event.is_set():
            self.expired = True
            self._event.set()

    @property
    def answered(self) -> bool:
        """Whether a reply came (not an expiry)."""
        return self._event.is_set() and not self.expired

    async def wait(self) -> bytes:
        await self._event.wait()
        return self.reply


class _Waiting:
    __slots__ = ("count", "slot")

    def __init__(self) -> None:
        self.slot = ReplySlot()
        self.count = 0


class StoredReplies:
    """Callers waiting for the stored reply of a persisted request, by its id."""

    def __init__(self) -> None:
        self._waiting: dict[int, _Waiting] = {}

    def expect(self, request_id: int) -> ReplySlot:
        """Register interest before the request can complete, so no reply is missed."""
        waiting = self._waiting.get(request_id)
        if waiting is None:
            waiting = self._waiting[request_id] = _Waiting()
        waiting.count += 1
        return waiting.slot

    def forget(self, request_id: int, slot: ReplySlot) -> None:
        """Drop one waiter (its call returned or was cancelled)."""
        waiting = self._waiting.get(request_id)
        if waiting is not None and waiting.slot is slot:
            waiting.count -= 1
            if waiting.count == 0:
                del self._waiting[request_id]

    def resolve(self, request_id: int, reply: bytes) -> None:
        """Hand ``reply`` to everyone waiting for ``request_id``; a no-op when nobody is."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            waiting.slot.resolve(reply)

    def target(self, request_id: int) -> ReplyTarget:
        """The reply target of a stored request: its waiters here, whoever they are."""
        return _ToWaiters(self, request_id)

    def waiting(self) -> list[int]:
        return list(self._waiting)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)


class _ToWaiters:
    __slots__ = ("_replies", "_request_id")

    def __init__(self, replies: StoredReplies, request_id: int) -> None:
        self._replies = replies
        self._request_id = request_id

    def resolve(self, reply: bytes) -> None:
        self._replies.resolve(self._request_id, reply)
