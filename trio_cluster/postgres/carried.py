"""Requests carried by their notices, and the fence that says when one may be used.

A stored request's notice carries the request and its inserting transaction's
id, so the shard's owner can deliver it without reading the row back. The
read used to be the fence: it filters ``NOT processed``, so a request that a
scan had already delivered and completed is not run again. The carried copy
is used instead only when no read of its shard can have returned it: when
its transaction is visible in none of the snapshots of the shard's reads that
returned (kept as their union, see ``snapshots``). A read not yet returned is
the runtime's own race (it filters what completes while a read is out), as
it was when the notice's read raced a scan.

Every ownership of a shard begins with a scan, and what is announced during
it is read again by id once it is done (see ``runtime.shard``), so a request
completed by an earlier owner is visible in that scan's snapshot: its carried
copy is refused. A shard with no recorded read at all reads too. The snapshots
say nothing of a later owner: a runner frozen past its lease (SIGSTOP, a
stalled VM) that runs again may still think the shard its own while another
runner completes its requests, so copies are used only while the lease is
provably held (the caller says: ``owned``); otherwise the read's ``NOT
processed`` filter keeps what the new owner completed from running here.

Carried requests wait in a bounded cache, oldest evicted first: an evicted or
refused copy only costs the read the owner made before notices carried any.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

from ..core.envelope import Envelope
from ..core.hashing import ShardId
from .snapshots import Snapshot, union, visible

CAPACITY = 4096
"""Carried requests kept until their shard's owner asks for them."""


@attrs.frozen
class Carried:
    """A request as its notice carried it, with its inserting transaction's id."""

    xid: int
    envelope: Envelope


class CarriedRequests:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._waiting: OrderedDict[int, Carried] = OrderedDict()
        self._seen: dict[ShardId, Snapshot] = {}
        self.used = 0
        """Requests handed out without a read (a figure for tests and benchmarks)."""

    def keep(self, carried: Carried) -> None:
        """Keep a request a notice carried, evicting the oldest beyond capacity."""
        self._waiting[carried.envelope.request_id] = carried
        self._waiting.move_to_end(carried.envelope.request_id)
        while len(self._waiting) > self._capacity:
            self._waiting.popitem(last=False)

    def saw(self, shard: ShardId, snapshot: Snapshot | None) -> None:
        """Record that a read of ``shard``'s requests, taken at ``snapshot``, returned.

        None (a snapshot that could not be read) forgets what earlier reads saw:
        the shard's carried requests are read until a read is recorded again,
        whose snapshot sees all the earlier ones did.
        """
        seen = self._seen.get(shard)
        if snapshot is None:
            self._seen.pop(shard, None)
        else:
            self._seen[shard] = snapshot if seen is None else union(seen, snapshot)

    def take(
        self, shard: ShardId, request_ids: Sequence[int], *, owned: bool
    ) -> tuple[list[Envelope], list[int]]:
        """The carried requests of ``request_ids`` that no read of ``shard`` saw, and
        the ids still to read; all of them to read unless the shard is ``owned``
        for sure. Every copy asked for is dropped: it is used once."""
        seen = self._seen.get(shard) if owned else None
        found: list[Envelope] = []
        rest: list[int] = []
        for request_id in request_ids:
            carried = self._waiting.pop(request_id, None)
            if (
                carried is not None
                and seen is not None
                and (carried.envelope.shard_group, carried.envelope.shard_index)
                == (shard.group, shard.index)
                and not visible(seen, carried.xid)
            ):
                found.append(carried.envelope)
            else:
                rest.append(request_id)
        self.used += len(found)
        return found, rest
