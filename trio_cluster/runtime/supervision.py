"""The failure boundary of a runner-wide service with no smaller unit of work.

The idle sweeper runs for the runner's lifetime (the shard keeper and the
notice follower contain failures per pass and per batch instead). A bug
must not end the runner, and must not silently stop the service either: it
is logged as an error, counted, and the service starts again after a
backoff, so a bug that repeats costs a log line per backoff, not a busy
loop. ``RESTART`` is that backoff, for the keeper too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..core.retry import RetryPolicy
from .hooks import Hooks

log = logging.getLogger("trio_cluster.runtime")

RESTART = RetryPolicy(base_delay=0.05, max_delay=2.0, max_attempts=2**62, max_elapsed=2.0**62)
"""Backoff between restarts of a failed service: capped, never giving up."""


async def keep_running(name: str, service: Callable[[], Awaitable[None]], hooks: Hooks) -> None:
    """Run ``service`` until it returns; restart it, after a backoff, whenever it fails."""
    delays = RESTART.delays()
    while True:
        try:
            await service()
        except* Exception as failure:
            log.exception("%s failed; restarting it", name, exc_info=failure)
            hooks.contained_failure(name, failure)
        else:
            return
        await trio.sleep(next(delays))
