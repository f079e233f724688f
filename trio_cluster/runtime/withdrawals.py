"""Persisted requests whose callers withdrew them, on their way to storage.

A caller stops waiting at its timeout or in a cancelled scope, and must not
wait for storage there (a cancelled ``ask`` would be held up by the very
storage it may be timing out on). So it only queues the request's id here,
and one runner task marks each in storage: the mark is what a redelivery
reads, and what the storage's notice carries to the owner on another
runner. An owner here is told at once.

The queue is bounded: past it, an interrupt is dropped (counted, logged)
and that request runs to its end as if its caller had not withdrawn it.
A failed write is not retried either, for the same reason: an interrupt
saves work, it is never needed for correctness.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from ..core.envelope import Envelope
from ..core.hashing import ShardId
from ..errors import ClusterError
from ..storage.base import MessageStorage
from .hooks import Hooks
from .interrupts import ShardInterrupts

log = logging.getLogger("trio_cluster.client")

MAX_QUEUED = 1000
"""Withdrawals waiting for storage, per runner."""


class _Served(Protocol):
    @property
    def interrupts(self) -> ShardInterrupts: ...


class Withdrawals:
    def __init__(
        self,
        *,
        messages: MessageStorage,
        shards: Mapping[ShardId, _Served],
        machine_id: Callable[[], int],
        hooks: Hooks,
        capacity: int = MAX_QUEUED,
    ) -> None:
        self._messages = messages
        self._shards = shards
        self._machine_id = machine_id
        self._hooks = hooks
        self._send, self._receive = trio.open_memory_channel[tuple[ShardId, int]](capacity)
        self.dropped = 0

    def withdraw(self, envelope: Envelope) -> None:
        """Mark a persisted request interrupted, soon; never waits, never raises."""
        try:
            self._send.send_nowait(
                (ShardId(envelope.shard_group, envelope.shard_index), envelope.request_id)
            )
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
            log.warning(
                "%s withdrawals are waiting for storage: request %s runs to its end",
                MAX_QUEUED,
                envelope.request_id,
            )

    async def run(self) -> None:
        async for shard_id, request_id in self._receive:
            started = time.perf_counter()
            outcome = "cancelled"
            try:
                marked = await self._messages.interrupt(request_id, self._machine_id())
                outcome = "success"
            except ClusterError as error:
                outcome = error.reason
                log.warning("could not withdraw request %s: %s", request_id, error)
                continue
            finally:
                self._hooks.storage_written("interrupt", time.perf_counter() - started, outcome)
            served = self._shards.get(shard_id)
            if marked and served is not None:
                served.interrupts.interrupt(request_id)
