"""What the status view shows: a snapshot of runners, shard owners and persisted backlog.

Plain data, so one model serves every storage and every rendering (text,
JSON): each storage reads its own facts and hands them to
:func:`shard_map`, which decides alike for all of them which shards are
listed and how owner, epoch and backlog meet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from ..core.hashing import ShardId
from ..core.reserved import group_indices


class RunnerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A registered runner; ``alive`` is the runtime's own test of its session."""

    machine_id: int
    address: str
    alive: bool
    weight: float
    groups: tuple[str, ...]
    registered_at: datetime | None
    """When it registered (its latest registration); None where storage keeps no clock."""
    heartbeat_at: datetime | None
    """Its lock connection's last heartbeat; None where storage has no heartbeat."""


class ShardStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One shard: who holds its lease now, and the persisted requests waiting in it."""

    index: int
    owner: int | None
    """The machine id holding the shard's lease now; None when nobody does."""
    epoch: int | None
    """The epoch of the shard's latest lease (the fencing token); None if it never had one."""
    backlog: int
    """Persisted requests without a final reply, scheduled ones included."""
    oldest_age: float | None
    """Seconds the oldest of them has been stored, at ``ClusterStatus.read_at``."""


class GroupStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    shards: tuple[ShardStatus, ...]


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """The header line's numbers, derived from a status (never stored beside it)."""

    runners_alive: int
    runners: int
    shards_owned: int
    shards: int
    backlog: int


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster as storage sees it at ``read_at`` (the storage's clock)."""

    read_at: datetime
    shards_per_group: int | None
    """The layout the shard map was completed to; None lists only the shards storage
    knows of (ever leased, or holding requests)."""
    runners: tuple[RunnerStatus, ...]
    groups: tuple[GroupStatus, ...]

    def totals(self) -> Totals:
        shards = [shard for group in self.groups for shard in group.shards]
        return Totals(
            runners_alive=sum(runner.alive for runner in self.runners),
            runners=len(self.runners),
            shards_owned=sum(shard.owner is not None for shard in shards),
            shards=len(shards),
            backlog=sum(shard.backlog for shard in shards),
        )


def shard_map(
    *,
    groups: Iterable[str],
    shards_per_group: int | None,
    owners: Mapping[ShardId, int],
    epochs: Mapping[ShardId, int],
    backlog: Mapping[ShardId, tuple[int, float]],
) -> tuple[GroupStatus, ...]:
    """Every listed shard of every group, in order.

    Listed are the shards any fact names, and, given ``shards_per_group``,
    every index of every group named (by ``groups``, a runner's groups, or
    by any fact): a shard nobody ever leased is then listed, unowned.
    ``backlog`` maps a shard to its request count and oldest age.
    """
    known = {*owners, *epochs, *backlog}
    names = {*groups, *(shard.group for shard in known)}
    if shards_per_group is not None:
        known |= {
            ShardId(name, index)
            for name in names
            for index in group_indices(name, shards_per_group)
        }
    by_group: dict[str, list[ShardStatus]] = {name: [] for name in sorted(names)}
    for shard in sorted(known):
        count, oldest = backlog.get(shard, (0, None))
        by_group[shard.group].append(
            ShardStatus(
                index=shard.index,
                owner=owners.get(shard),
                epoch=epochs.get(shard),
                backlog=count,
                oldest_age=oldest,
            )
        )
    return tuple(GroupStatus(name=name, shards=tuple(shards)) for name, shards in by_group.items())
