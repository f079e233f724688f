"""A runner process for the cross-runner benchmark (``benchmarks.cluster``).

Two modes, both started by the benchmark from the repository root:

``python -m benchmarks.bench_node DSN --prefix P [--shards N]``
    hosts the benchmark entity on PostgreSQL, listens for peers on
    127.0.0.1, prints ``ready <address> <machine id>`` once it serves, and
    hands its shards off on SIGTERM (or when its stdin closes: the benchmark
    has gone).

``python -m benchmarks.bench_node --echo``
    the raw baseline: a bare Trio TCP server answering each ``Request``
    frame of the cluster's wire format with a ``Reply`` frame, decoding
    and encoding with msgspec as a runner does, and nothing else. Prints
    ``ready <host:port>``.

Both answer ``status`` on stdin with one line,
``status <process CPU seconds> <messages processed> <shards owned> <requests refused>``,
which is how the benchmark weighs the CPU each message costs here (and
counts the refusals, ``MailboxFull`` and others, a fire-and-forget
sender never hears).
A runner also answers ``cancelled`` with
``cancelled <count> <key>:<ns> ...``: when each ``hang`` handler since the
last ``cancelled`` was cancelled, on the system-wide ``CLOCK_MONOTONIC``
(which the caller's process reads too), for ``benchmarks.interrupts``.
A runner also answers ``settled`` with
``settled <1 if it serves exactly its assignment, else 0> <runners in its assignment>
<shards it assigns itself>``,
which is how the scale harness (``benchmarks.scale``) tells a stable assignment.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator

import msgspec
import trio

from trio_cluster import (
    Entity,
    EntityContext,
    Runner,
    ShardingConfig,
    TransportConfig,
    open_runner,
    wait_for_termination,
)
from trio_cluster.core.frames import FrameDecoder, Reply, Request, encode_into
from trio_cluster.postgres.storage import open_postgres_storage

# -- the protocol under test --------------------------------------------------------


class Payload(msgspec.Struct, frozen=True):
    n: int
    key: str


class Ticks(msgspec.Struct, frozen=True):
    n: int
    size: int = 0


class Tick(msgspec.Struct, frozen=True):
    i: int
    pad: bytes = b""


class StoredTicks(msgspec.Struct, frozen=True):
    key: str
    n: int


Bench = Entity("ClusterBench")
echo = Bench.rpc("echo", Payload, int)
persist = Bench.rpc("persist", Payload, int, persisted=True, primary_key=lambda p: p.key)
ticks = Bench.stream("ticks", Ticks, Tick)
"""``n`` chunks of ``size`` bytes of padding each (``benchmarks.streaming``)."""
stored_ticks = Bench.stream(
    "stored_ticks", StoredTicks, Tick, persisted=True, primary_key=lambda t: t.key
)
"""``n`` chunks of an int each, as a persisted stream (window 16)."""
stored_ticks_wide = Bench.stream(
    "stored_ticks_wide",
    StoredTicks,
    Tick,
    persisted=True,
    primary_key=lambda t: t.key,
    window=256,
)
hang = Bench.rpc("hang", Payload, int)
"""Volatile: waits until interrupted, then notes when (``CANCELLED``)."""
hang_persisted = Bench.rpc(
    "hang_persisted", Payload, int, persisted=True, primary_key=lambda p: p.key
)

CANCELLED: deque[tuple[str, int]] = deque(maxlen=100_000)
"""``(key, CLOCK_MONOTONIC ns)`` of each cancelled ``hang`` handler, until ``cancelled`` asks."""


async def hang_until_cancelled(key: str) -> int:
    try:
        await trio.sleep_forever()
    finally:
        CANCELLED.append((key, time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
    raise AssertionError("unreachable")


class BenchHandler:
    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx
        self.count = 0

    @echo.handler
    async def on_echo(self, payload: Payload) -> int:
        self.count += payload.n
        return self.count

    @persist.handler
    async def on_persist(self, payload: Payload) -> int:
        self.count += payload.n
        return self.count

    @hang.handler
    async def on_hang(self, payload: Payload) -> int:
        return await hang_until_cancelled(payload.key)

    @hang_persisted.handler
    async def on_hang_persisted(self, payload: Payload) -> int:
        return await hang_until_cancelled(payload.key)

    @ticks.handler
    async def on_ticks(self, t: Ticks) -> AsyncIterator[Tick]:
        pad = b"x" * t.size
        for i in range(t.n):
            yield Tick(i, pad)

    @stored_ticks.handler
    async def on_stored_ticks(self, t: StoredTicks) -> AsyncIterator[Tick]:
        async for tick in self._resumed_ticks(t):
            yield tick

    @stored_ticks_wide.handler
    async def on_stored_ticks_wide(self, t: StoredTicks) -> AsyncIterator[Tick]:
        async for tick in self._resumed_ticks(t):
            yield tick

    async def _resumed_ticks(self, t: StoredTicks) -> AsyncIterator[Tick]:
        for i in range(self.ctx.request.resume_from, t.n):
            yield Tick(i)


# -- the stdin commands -------------------------------------------------------------


class Counts:
    """What ``status`` reports besides the CPU time."""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner
        self.frames = 0

    def line(self) -> str:
        runner = self.runner
        processed = self.frames if runner is None else runner.snapshot().processed
        shards = 0 if runner is None else len(runner.shards)
        refused = 0
        if runner is not None:
            snapshot = runner.snapshot()
            refused = snapshot.mailbox_full + snapshot.refused
        return f"status {time.process_time():.6f} {processed} {shards} {refused}"

    def settled_line(self) -> str:
        runner = self.runner
        if runner is None:
            return "settled 0 0 0"
        owners = len(set(runner.assignment.values()))
        mine = sum(1 for owner in runner.assignment.values() if owner == runner.address)
        return f"settled {int(runner.owns_its_assignment())} {owners} {mine}"


async def follow_commands(counts: Counts, done: trio.CancelScope) -> None:
    """Answer ``status`` lines on stdin; stdin closing means the benchmark is gone."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = bytearray()
    async with stdin:
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                done.cancel()
                return
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                command = bytes(buffer[:end]).decode().strip()
                del buffer[: end + 1]
                if command == "status":
                    print(counts.line(), flush=True)
                elif command == "cancelled":
                    noted = [f"{key}:{ns}" for key, ns in CANCELLED]
                    CANCELLED.clear()
                    print(" ".join(["cancelled", str(len(noted)), *noted]), flush=True)
                elif command == "settled":
                    print(counts.settled_line(), flush=True)
                elif command:
                    print(f"error unknown command {command!r}", flush=True)


async def until_stopped(counts: Counts) -> None:
    """Serve until SIGTERM/SIGINT or the end of stdin."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_commands, counts, nursery.cancel_scope)
        await wait_for_termination()
        nursery.cancel_scope.cancel()


# -- the runner ---------------------------------------------------------------------


async def run_node(dsn: str, *, prefix: str, shards: int) -> None:
    config = ShardingConfig(shards_per_group=shards)
    async with (
        open_postgres_storage(dsn, prefix=prefix) as storage,
        open_runner(
            Bench.implement(BenchHandler),
            storage=storage,
            config=config,
            transport=TransportConfig(cluster=prefix),
        ) as runner,
    ):
        print(f"ready {runner.address} {runner.machine_id}", flush=True)
        await until_stopped(Counts(runner))


# -- the raw baseline ---------------------------------------------------------------

_encode_reply = msgspec.msgpack.Encoder().encode
_decode_payload = msgspec.msgpack.Decoder(Payload).decode


async def serve_frames(stream: trio.SocketStream, counts: Counts) -> None:
    """Answer every Request frame with a Reply: one decode and one encode each way."""
    decoder = FrameDecoder()
    total = 0
    async with stream:
        while True:
            try:
                data = await stream.receive_some(256 * 1024)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            out = bytearray()
            for message in decoder.feed(data):
                if isinstance(message, Request):
                    total += _decode_payload(message.envelope.payload).n
                    encode_into(Reply(message.envelope.request_id, _encode_reply(total)), out)
                    counts.frames += 1
            if out:
                try:
                    await stream.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def run_echo() -> None:
    counts = Counts()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SocketStream) -> None:
            await serve_frames(stream, counts)

        await nursery.start(trio.serve_listeners, handle, listeners)
        print(f"ready {host}:{port}", flush=True)
        await until_stopped(counts)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dsn", nargs="?")
    parser.add_argument("--prefix", default="cbench_")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--echo", action="store_true", help="run the raw frame baseline")
    parser.add_argument("--gc-threshold", help="three integers, as gc.set_threshold takes them")
    args = parser.parse_args()
    if args.gc_threshold:
        gc.set_threshold(*(int(part) for part in args.gc_threshold.split(",")))
    if args.echo:
        trio.run(run_echo)
        return
    if args.dsn is None:
        parser.error("a DSN is required unless --echo")
    trio.run(lambda: run_node(args.dsn, prefix=args.prefix, shards=args.shards))
    print(f"exit {time.process_time():.6f}", flush=True)


if __name__ == "__main__":
    main()
