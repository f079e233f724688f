"""PostgreSQL snapshots (``pg_snapshot``): which transactions a read could see.

Pure logic for the fence of carried requests (see ``carried``): a read's
snapshot says which committed inserts it saw, so a request whose inserting
transaction no read saw cannot have been delivered by one.

A snapshot's text is ``xmin:xmax:xip,...`` (``pg_current_snapshot()::text``):
a transaction id below ``xmin`` is visible, one at or above ``xmax`` is not,
and one between is visible unless listed in ``xip`` (still in progress when
the snapshot was taken). Ids are ``xid8``: 64 bits, they never wrap.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Snapshot:
    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()


def parse(text: str) -> Snapshot:
    """The snapshot of ``pg_snapshot``'s text form; ValueError when it is not one."""
    xmin_text, xmax_text, xip_text = text.split(":")
    xmin, xmax = int(xmin_text), int(xmax_text)
    xip = frozenset(int(xid) for xid in xip_text.split(",") if xid)
    if not 0 <= xmin <= xmax or any(not xmin <= xid < xmax for xid in xip):
        raise ValueError(f"not a snapshot: {text!r}")
    return Snapshot(xmin, xmax, xip)


def visible(snapshot: Snapshot, xid: int) -> bool:
    """Whether what transaction ``xid`` committed is visible in ``snapshot``."""
    return xid < snapshot.xmin or (xid < snapshot.xmax and xid not in snapshot.xip)


def union(a: Snapshot, b: Snapshot) -> Snapshot:
    """The snapshot that sees exactly what ``a`` or ``b`` sees.

    Snapshots of one server taken one after the other only ever see more, so
    this is the later of the two; computing it rather than picking one needs
    no assumption about which read returned first.
    """
    xmin, xmax = max(a.xmin, b.xmin), max(a.xmax, b.xmax)
    # An id in [xmin, xmax) hidden from both is in progress for the one with the
    # larger xmax, so it is in that one's xip: the candidates are the two lists.
    hidden = {xid for xid in a.xip | b.xip if not visible(a, xid) and not visible(b, xid)}
    return Snapshot(xmin, xmax, frozenset(hidden))
