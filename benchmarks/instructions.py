"""Instructions per ask, counted by valgrind: a cost figure that machine noise cannot move.

Run from the repository root (valgrind must be installed)::

    python -m benchmarks.instructions [--small 200] [--large 1200]

Two runners in one process, on one MemoryStorage, talking over their real
socket on 127.0.0.1: an owner hosting the entity and a client-only sender.
Each kind of ask is run twice under ``valgrind --tool=callgrind``, with
``--small`` and ``--large`` sequential asks after the same start-up; the
difference of the two instruction totals divided by the difference of the
ask counts is the cost of one ask, start-up and teardown cancelled out.
Compare two versions of the code by running this in each checkout.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import msgspec
import trio

from trio_cluster import (
    Entity,
    EntityContext,
    EntityOptions,
    MemoryStorage,
    ShardingConfig,
    TransportConfig,
    open_runner,
)

KINDS = {
    "local volatile": ("local", False),
    "cross-runner volatile": ("remote", False),
    "cross-runner persisted": ("remote", True),
}


class Number(msgspec.Struct):
    n: int


Probe = Entity("Probe")
volatile = Probe.rpc("volatile", Number, int)
persisted = Probe.rpc("persisted", Number, int, persisted=True)


class ProbeHandler:
    def __init__(self, ctx: EntityContext) -> None:
        pass

    @volatile.handler
    async def volatile(self, number: Number) -> int:
        return number.n

    @persisted.handler
    async def persisted(self, number: Number) -> int:
        return number.n


async def asks(where: str, stored: bool, count: int) -> None:
    storage = MemoryStorage()
    config = ShardingConfig(shards_per_group=4, entity_defaults=EntityOptions(keep_alive=True))
    transport = TransportConfig()
    async with (
        open_runner(
            Probe.implement(ProbeHandler), storage=storage, config=config, transport=transport
        ) as owner,
        open_runner(storage=storage, config=config, transport=transport) as client,
    ):
        await owner.settled()
        sender = owner if where == "local" else client
        rpc = persisted if stored else volatile
        for n in range(count):
            await sender.ask(rpc, "probe-1", Number(n))


def instructions(kind: str, count: int) -> int:
    """Total instructions of one child process asking ``count`` times."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            kind,
            str(count),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        where, stored = KINDS[argv[1]]
        trio.run(asks, where, stored, int(argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1200)
    args = parser.parse_args(argv)
    print("| ask | instructions per ask |\n|---|---:|")
    for kind in KINDS:
        cost = (instructions(kind, args.large) - instructions(kind, args.small)) // (
            args.large - args.small
        )
        print(f"| {kind} | {cost:,} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
