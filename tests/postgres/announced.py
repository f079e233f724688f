"""Rows that runner processes announce by NOTIFY, as a test sees them arrive.

Each runner app of these tests writes a row and announces it on a channel
in one statement; following that channel lets the test wait on what the
processes did without polling the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from trio_cluster.pgdriver import Connection

T = TypeVar("T")

WAIT_S = 15.0


class Announced(Generic[T]):
    """The payloads announced on one channel, parsed, in the order they arrived."""

    def __init__(self, parse: Callable[[str], T]) -> None:
        self.rows: list[T] = []
        self._parse = parse
        self._changed = trio.Event()

    async def follow(
        self, listener: Connection, channel: str, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await listener.listen(channel)
        task_status.started()
        while True:
            notification = await listener.wait_notification()
            self.rows.append(self._parse(notification.payload))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], bound_s: float = WAIT_S) -> None:
        with trio.fail_after(bound_s):
            while not condition():
                await self._changed.wait()
