"""Deleting processed requests and their replies once their retention window has passed.

Without it the messages table, and with it the dedup index, grows with every
persisted request ever made. A processed request is kept for ``window``
seconds after its reply: that is how long a retry with the same primary key
still finds the original and its reply, so **the dedup window equals the
retention**. Unprocessed requests are never deleted, whatever their age.

Each runner sweeps only the shards it holds a lease on, so the work is divided
like the shards and no two runners delete in the same shard at once; whoever
deletes a row past its window deletes the same row, so the sweep needs no
fence. Rows go in batches of ``batch`` (one short statement each), so a sweep
never holds locks on many rows or writes a burst of WAL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from ..errors import PersistenceError
from .base import Lease

__all__ = ["Purge", "Retention", "sweep_forever"]

log = logging.getLogger("trio_cluster.storage.retention")


@attrs.frozen
class Retention:
    """How long processed requests are kept, and how their deletion is paced."""

    window: float = attrs.field(default=86_400.0, validator=attrs.validators.ge(0))
    """Seconds a processed request and its reply are kept after the reply: the dedup window."""
    interval: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    """Seconds between two sweeps of a runner's shards."""
    batch: int = attrs.field(default=500, validator=attrs.validators.gt(0))
    """Rows deleted per statement; a shard's sweep repeats it until a batch comes back short."""


Purge = Callable[[Lease, float, int], Awaitable[int]]
"""Delete up to *limit* processed requests of the lease's shard whose reply is older than
*window* seconds; the number deleted."""


async def sweep_forever(
    retention: Retention, held: Callable[[], Iterable[Lease]], purge: Purge
) -> None:
    """Every ``interval``, purge each held shard in batches; storage errors wait a round.

    A failure boundary: nothing the storage does ends this task, since a missed
    sweep only delays deletion.
    """
    while True:
        await trio.sleep(retention.interval)
        for lease in list(held()):
            try:
                while await purge(lease, retention.window, retention.batch) >= retention.batch:
                    pass
            except PersistenceError as error:
                log.warning("retention sweep of shard %s failed: %s", lease.shard, error)
