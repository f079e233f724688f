"""Callers waiting for replies, by request id.

Duplicates of a persisted request wait on the original's id, so one slot
may have many waiters; the reply is delivered to all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..core import reply as replies
from ..errors import ClusterError


class _Slot:
    __slots__ = ("event", "reply", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply = b""
        self.waiters = 0


class ReplyWaiters:
    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        # Requests that came from another runner: their reply goes back there.
        self._forwards: dict[int, Callable[[bytes], None]] = {}

    def forward(self, request_id: int, send: Callable[[bytes], None]) -> None:
        self._forwards[request_id] = send

    def unforward(self, request_id: int) -> None:
        self._forwards.pop(request_id, None)

    def expect(self, request_id: int) -> _Slot:
        """Register interest before the request can complete, so no reply is missed."""
        slot = self._slots.get(request_id)
        if slot is None:
            slot = self._slots[request_id] = _Slot()
        slot.waiters += 1
        return slot

    def forget(self, request_id: int, slot: _Slot) -> None:
        """Drop one waiter (its call returned or was cancelled)."""
        slot.waiters -= 1
        if slot.waiters == 0 and self._slots.get(request_id) is slot:
            del self._slots[request_id]

    def resolve(self, request_id: int, reply: bytes) -> None:
        """Hand ``reply`` to everyone waiting for ``request_id``; a no-op when nobody is."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            slot.reply = reply
            slot.event.set()
        send = self._forwards.pop(request_id, None)
        if send is not None:
            send(reply)

    def waiting(self) -> list[int]:
        return list(self._slots)

    def fail(self, request_id: int, error: ClusterError) -> None:
        """Answer ``request_id`` with a cluster error, as its owner would have."""
        error.request_id = request_id
        self.resolve(request_id, replies.cluster_error(error))

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._slots

    def __len__(self) -> int:
        return len(self._slots)


async def wait(slot: _Slot) -> bytes:
    await slot.event.wait()
    return slot.reply
