"""An entity whose stream handlers record what they yield and how they end.

Shared by the streaming tests in one process and the runner processes of
``tests.postgres.cluster_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import msgspec
import trio

from trio_cluster import Entity, EntityContext, Implementation

from .interrupt_entities import Recorder


class Count(msgspec.Struct, frozen=True):
    n: int
    """Chunks to yield (-1: for ever)."""
    fail_at: int = -1
    """Raise Exhausted (declared) once this many are yielded."""
    defect_at: int = -1
    """Raise a defect once this many are yielded."""
    size: int = 0
    """Bytes of padding per chunk, for the benchmark."""


class Tick(msgspec.Struct, frozen=True):
    i: int
    pad: bytes = b""


class Relay(msgspec.Struct, frozen=True):
    source: str
    n: int


class Job(msgspec.Struct, frozen=True):
    key: str
    n: int


class Exhausted(Exception):
    pass


Ticker = Entity("Ticker")
count = Ticker.stream("count", Count, Tick, errors=(Exhausted,))
"""Records ``produced`` before each yield and ``closed`` in its ``finally``."""
stall = Ticker.stream("stall", Count, Tick)
"""Yields ``n`` chunks, then records ``waiting`` and waits for ever: cancelled there."""
relay = Ticker.rpc("relay", Relay, list[int])
"""Streams ``n`` ticks of ``count`` from the Ticker ``source``, from inside an entity."""
journal = Ticker.stream(
    "journal", Job, Tick, persisted=True, primary_key=lambda job: job.key, window=4
)
"""A persisted stream of ``n`` ticks: records ``started`` with its ``resume_from``, and
``produced`` before each yield."""
tape = Ticker.stream("tape", Job, Tick, persisted=True, primary_key=lambda job: job.key, window=8)
"""``journal`` with a window of 8 chunks, for the test that SIGKILLs its owner."""
arm_stream = Ticker.rpc("arm_stream", Count, str)
"""Tries to arm a timer sending ``count``; answers the TypeError's message."""


class TickerHandler:
    """Subclassed per test (or process) with its own ``recorder``."""

    recorder: ClassVar[Recorder]

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @count.handler
    async def count(self, job: Count) -> AsyncIterator[Tick]:
        pad = b"x" * job.size
        i = 0
        try:
            while i != job.n:
                if i == job.fail_at:
                    raise Exhausted(f"gave up at {i}")
                if i == job.defect_at:
                    raise RuntimeError(f"broke at {i}")
                self.recorder.record("produced", i)
                yield Tick(i, pad)
                i += 1
        finally:
            self.recorder.record("closed", i)

    @relay.handler
    async def relay(self, job: Relay) -> list[int]:
        async with self.ctx.client.stream(count, job.source, Count(job.n)) as chunks:
            return [tick.i async for tick in chunks]

    @arm_stream.handler
    async def arm_stream(self, job: Count) -> str:
        try:
            await self.ctx.timers.arm("t", count.rpc, job, after=1.0)
        except TypeError as error:
            return str(error)
        return "armed"

    @journal.handler
    async def journal(self, job: Job) -> AsyncIterator[Tick]:
        async for tick in self._resumed(job):
            yield tick

    @tape.handler
    async def tape(self, job: Job) -> AsyncIterator[Tick]:
        async for tick in self._resumed(job):
            yield tick

    async def _resumed(self, job: Job) -> AsyncIterator[Tick]:
        """Ticks from the first one the caller did not acknowledge: each is its index."""
        start = self.ctx.request.resume_from
        self.recorder.record("started", start)
        for i in range(start, job.n):
            self.recorder.record("produced", i)
            yield Tick(i)

    @stall.handler
    async def stall(self, job: Count) -> AsyncIterator[Tick]:
        try:
            for i in range(job.n):
                yield Tick(i)
            self.recorder.record("waiting", job.n)
            await trio.sleep_forever()
        finally:
            self.recorder.record("closed", job.n)


def tickers() -> tuple[Implementation, Recorder]:
    """The Ticker implementation with a fresh recorder of its own."""
    recorder = Recorder()
    handler = type("Tickers", (TickerHandler,), {"recorder": recorder})
    return Ticker.implement(handler), recorder
