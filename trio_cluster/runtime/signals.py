"""Graceful termination on the signals an orchestrator sends.

Kubernetes sends SIGTERM, waits ``terminationGracePeriodSeconds``, then
SIGKILL. Returning from this wait lets the caller leave its
``open_runner`` block, which hands every shard off within
``entity_termination_timeout``: keep that below the grace period.
"""

from __future__ import annotations

import signal

import trio

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def wait_for_termination() -> int:
    """Wait for SIGTERM or SIGINT and return which arrived."""
    with trio.open_signal_receiver(*TERMINATION_SIGNALS) as signals:
        async for signum in signals:
            return signum
    raise AssertionError("signal receivers never end")  # pragma: no cover
