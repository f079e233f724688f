"""Entity protocols and handlers shared by the runtime tests.

Handlers record what they did in a :class:`Probe` (a class attribute, set
per test by subclassing) so tests can assert on handler runs rather than
only on replies.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable
from typing import ClassVar

import msgspec
import trio

from trio_cluster import Entity, EntityContext, EntityOptions, Implementation, Rpc, Suspended


class Probe:
    def __init__(self) -> None:
        self.runs: Tally[str] = Tally()
        self.order: list[tuple[str, int]] = []
        self.started = trio.Event()
        self.release = trio.Event()
        self.activations = 0
        self.running = 0
        self.max_running = 0
        self._changed = trio.Event()

    def note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait (on events, not time) until a handler run makes ``condition`` true."""
        while not condition():
            await self._changed.wait()


class Add(msgspec.Struct, frozen=True):
    amount: int
    key: str = ""


class Get(msgspec.Struct, frozen=True):
    pass


class Block(msgspec.Struct, frozen=True):
    pass


class Boom(msgspec.Struct, frozen=True):
    failures: int


class Park(msgspec.Struct, frozen=True):
    pass


class Unencodable(msgspec.Struct, frozen=True):
    pass


class Negative(Exception):
    """A declared error; its args cross the wire."""


Counter = Entity("Counter")
add = Counter.rpc("add", Add, int, errors=(Negative,))
add_once = Counter.rpc("add_once", Add, int, primary_key=lambda p: p.key, persisted=True)
add_persisted = Counter.rpc("add_persisted", Add, int, persisted=True)
slow_add = Counter.rpc("slow_add", Add, int, persisted=True)
slow_add_once = Counter.rpc("slow_add_once", Add, int, persisted=True, primary_key=lambda p: p.key)
get = Counter.rpc("get", Get, int)
block = Counter.rpc("block", Block, type(None))
boom = Counter.rpc("boom", Boom, int)
park = Counter.rpc("park", Park, type(None))
bad_reply = Counter.rpc("bad_reply", Unencodable, int)


class CounterHandler:
    probe: ClassVar[Probe]

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx
        self.total = 0
        self.failed = 0
        self.probe.activations += 1

    async def _count(self, rpc: str, p: Add) -> int:
        self.probe.runs[f"{self.ctx.address.entity_id}/{rpc}/{p.key}"] += 1
        self.probe.order.append((self.ctx.address.entity_id, p.amount))
        self.total += p.amount
        self.probe.note()
        return self.total

    @add.handler
    async def add(self, p: Add) -> int:
        if p.amount < 0:
            raise Negative("amount below zero", p.amount)
        return await self._count("add", p)

    @add_once.handler
    async def add_once(self, p: Add) -> int:
        await trio.lowlevel.checkpoint()
        return await self._count("add_once", p)

    @add_persisted.handler
    async def add_persisted(self, p: Add) -> int:
        return await self._count("add_persisted", p)

    @slow_add.handler
    async def slow_add(self, p: Add) -> int:
        return await self._slow("slow_add", p)

    @slow_add_once.handler
    async def slow_add_once(self, p: Add) -> int:
        return await self._slow("slow_add_once", p)

    async def _slow(self, rpc: str, p: Add) -> int:
        """Counts its entry, then waits for the test to release it."""
        self.probe.runs[f"{rpc} entered"] += 1
        self.probe.started.set()
        self.probe.note()
        await self.probe.release.wait()
        return await self._count(rpc, p)

    @get.handler
    async def get(self, p: Get) -> int:
        return self.total

    @block.handler
    async def block(self, p: Block) -> None:
        self.probe.running += 1
        self.probe.max_running = max(self.probe.max_running, self.probe.running)
        self.probe.started.set()
        self.probe.note()
        try:
            await self.probe.release.wait()
        finally:
            self.probe.running -= 1
            self.probe.note()

    @boom.handler
    async def boom(self, p: Boom) -> int:
        # State survives only within one handler instance: a defect resets it.
        self.total += 1
        self.probe.runs["boom"] += 1
        if self.probe.runs["boom"] <= p.failures:
            raise RuntimeError(f"boom {self.probe.runs['boom']}")
        return self.total

    @park.handler
    async def park(self, p: Park) -> None:
        raise Suspended("waiting for approval", resume_token="approval-1")

    @bad_reply.handler
    async def bad_reply(self, p: Unencodable) -> int:
        return object()  # type: ignore[return-value]


def counter(options: EntityOptions | None = None) -> tuple[Implementation, Probe]:
    """A Counter implementation with a fresh probe of its own."""
    probe = Probe()
    handler = type("ProbedCounter", (CounterHandler,), {"probe": probe})
    return Counter.implement(handler, options), probe


# -- entities that call entities --------------------------------------------


class Call(msgspec.Struct, frozen=True):
    target: str
    depth: int = 1


Caller = Entity("Caller")
call: Rpc[Call, str] = Caller.rpc("call", Call, str)


class CallerHandler:
    """Asks ``target`` (a Caller id) to call back ``depth`` times; "." ends the chain."""

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @call.handler
    async def call(self, p: Call) -> str:
        if p.depth == 0 or p.target == ".":
            return self.ctx.address.entity_id
        me = self.ctx.address.entity_id
        reply = await self.ctx.client.ask(call, p.target, Call(me, p.depth - 1))
        return f"{me}>{reply}"


# -- polymorphic messages ------------------------------------------------------


class Circle(msgspec.Struct, tag=True, frozen=True):
    radius: float


class Square(msgspec.Struct, tag=True, frozen=True):
    side: float


Shape = Circle | Square

Shapes = Entity("Shapes", shard_group="geometry")
area: Rpc[Shape, float] = Shapes.rpc("area", Shape, float)


class ShapesHandler:
    def __init__(self, ctx: EntityContext) -> None:
        pass

    @area.handler
    async def area(self, p: Shape) -> float:
        match p:
            case Circle(radius=r):
                return 3.0 * r * r
            case Square(side=s):
                return s * s
