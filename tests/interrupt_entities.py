"""An entity whose handlers wait until cancelled, recording what happened to each request.

Shared by the interrupt tests in one process and the runner process of
``tests.postgres.interrupt_app``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import msgspec
import trio

from trio_cluster import Entity, EntityContext, EntityOptions, Implementation, State


class Job(msgspec.Struct, frozen=True):
    n: int
    key: str = ""


class Tally(msgspec.Struct):
    count: int = 0


Sleeper = Entity("Sleeper")
hang = Sleeper.rpc("hang", Job, int)
"""Volatile: records ``started``, then waits for ever; ``cancelled`` when interrupted."""
hang_persisted = Sleeper.rpc(
    "hang_persisted", Job, int, persisted=True, primary_key=lambda j: j.key
)
steady = Sleeper.rpc("steady", Job, int, interruptible=False)
"""Uninterruptible: waits for ``Recorder.release``, then answers."""
quick = Sleeper.rpc("quick", Job, int)
"""Answers the durable count at once."""
note = Sleeper.rpc("note", Job, type(None))
"""Records ``noted`` and returns: what tells send."""


class Recorder:
    """``(what, n)`` events of handler runs, waited on by event, not by time."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.release = trio.Event()
        self._changed = trio.Event()

    def record(self, what: str, n: int) -> None:
        self.events.append((what, n))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, what: str, n: int) -> None:
        await self.wait_until(lambda: (what, n) in self.events)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    def of(self, n: int) -> list[str]:
        return [what for what, m in self.events if m == n]


class SleeperHandler:
    """Subclassed per test (or process) with its own ``recorder``."""

    recorder: ClassVar[Recorder]

    def __init__(self, ctx: EntityContext, state: State[Tally]) -> None:
        self.state = state

    async def _hang(self, job: Job) -> int:
        self.state.value.count += 1  # rolled back when interrupted
        self.recorder.record("started", job.n)
        try:
            await trio.sleep_forever()
        finally:
            self.recorder.record("cancelled", job.n)
        raise AssertionError("unreachable")

    @hang.handler
    async def hang(self, job: Job) -> int:
        return await self._hang(job)

    @hang_persisted.handler
    async def hang_persisted(self, job: Job) -> int:
        return await self._hang(job)

    @steady.handler
    async def steady(self, job: Job) -> int:
        self.state.value.count += 1
        self.recorder.record("started", job.n)
        await self.recorder.release.wait()
        self.recorder.record("finished", job.n)
        return self.state.value.count

    @quick.handler
    async def quick(self, job: Job) -> int:
        self.recorder.record("ran", job.n)
        return self.state.value.count

    @note.handler
    async def note(self, job: Job) -> None:
        self.recorder.record("noted", job.n)


def sleepers(options: EntityOptions | None = None) -> tuple[Implementation, Recorder]:
    recorder = Recorder()
    handler = type("RecordingSleeper", (SleeperHandler,), {"recorder": recorder})
    return Sleeper.implement(handler, options, state=Tally), recorder


class StatelessHandler:
    """For concurrency above 1, where state is not allowed."""

    recorder: ClassVar[Recorder]

    def __init__(self, ctx: EntityContext) -> None:
        pass

    async def _hang(self, job: Job) -> int:
        self.recorder.record("started", job.n)
        try:
            await trio.sleep_forever()
        finally:
            self.recorder.record("cancelled", job.n)
        raise AssertionError("unreachable")

    @hang.handler
    async def hang(self, job: Job) -> int:
        return await self._hang(job)

    @hang_persisted.handler
    async def hang_persisted(self, job: Job) -> int:
        return await self._hang(job)

    @steady.handler
    async def steady(self, job: Job) -> int:
        self.recorder.record("started", job.n)
        await self.recorder.release.wait()
        self.recorder.record("finished", job.n)
        return job.n

    @quick.handler
    async def quick(self, job: Job) -> int:
        self.recorder.record("ran", job.n)
        return job.n

    @note.handler
    async def note(self, job: Job) -> None:
        self.recorder.record("noted", job.n)


def stateless_sleepers(options: EntityOptions) -> tuple[Implementation, Recorder]:
    recorder = Recorder()
    handler = type("RecordingStateless", (StatelessHandler,), {"recorder": recorder})
    return Sleeper.implement(handler, options), recorder
