"""Taking a free lock or slot without a pass through the scheduler.

``trio.Lock.acquire`` and ``trio.Semaphore.acquire`` make a schedule point even
when nothing holds them. The driver takes its connection lock and pool slots on
every statement, and every statement then waits on its socket, which is the
schedule point it needs: so a free one is taken at once, and only a held one
is waited for (first come, first served, as ``acquire`` does).
"""

from __future__ import annotations

import trio


async def take(turn: trio.Lock | trio.Semaphore) -> None:
    """Acquire ``turn``: at once when free, else waiting for it."""
    try:
        turn.acquire_nowait()
    except trio.WouldBlock:
        await turn.acquire()
