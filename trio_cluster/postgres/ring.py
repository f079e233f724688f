"""Who watches whom: each runner watches the live runner after it in machine-id order.

Pure. On one membership every live runner is watched by exactly one other
(its predecessor), and a runner's target changes only when its successor
joins or leaves, so a join or a death re-arms one watcher, not all of them.
"""

from __future__ import annotations

from collections.abc import Iterable


def successor(live: Iterable[int], me: int) -> int | None:
    """The machine id after ``me`` among ``live``, wrapping round; None when no other."""
    if me < 0:
        return None
    others = sorted(set(live) - {me})
    if not others:
        return None
    return next((other for other in others if other > me), others[0])
