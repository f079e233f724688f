"""What every runner app of these tests does around its runner: announce it, serve, exit.

The test reads the ``ready`` line to learn the runner's address and machine
id, and ends the process with SIGTERM, which leaves the runner's block and
so hands every shard off.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from trio_cluster import Runner, wait_for_termination


@asynccontextmanager
async def watching_termination() -> AsyncIterator[trio.Event]:
    """An event that SIGTERM or SIGINT sets, watched from before the runner starts: a
    signal that arrives while it starts is a request to stop, not a crash."""
    terminated = trio.Event()

    async def watch() -> None:
        await wait_for_termination()
        terminated.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        yield terminated
        nursery.cancel_scope.cancel()


async def serve_until_terminated(runner: Runner, terminated: trio.Event) -> None:
    """Print the ready line once the runner has settled, then serve until ``terminated``."""
    await runner.settled()
    print(f"ready {runner.address} {runner.machine_id}", flush=True)
    await terminated.wait()


def run_app(module: str, serve: Callable[[str, str], Awaitable[None]], argv: list[str]) -> None:
    """``python -m module DSN PREFIX``: run ``serve(dsn, prefix)``."""
    if len(argv) != 2:
        sys.exit(f"usage: python -m {module} DSN PREFIX")
    dsn, prefix = argv
    trio.run(serve, dsn, prefix)
