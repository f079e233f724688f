"""Shard groups the cluster reserves for its own services, apart from the entities' groups.

A singleton is a lease like a shard's: taking it through the same lease
session and the same assignment gives it exclusivity, epoch fencing and
failover with no machinery of its own. Each singleton is the one shard
(index 0) of a group of its own, named after it, because the assignment
spreads a group only over the runners hosting it: a singleton then runs
only on a runner that declares it. Entity shard groups may not start with
``__``, so the two kinds never meet.

A schedule is driven by a singleton named after it with
:data:`SCHEDULE_PREFIX`; a user's singleton may not start with ``__``, so
the two never meet either.
"""

from __future__ import annotations

from .hashing import ShardId

__all__ = [
    "RESERVED_PREFIX",
    "RUNNER_GROUP",
    "SCHEDULE_PREFIX",
    "SINGLETON_PREFIX",
    "group_indices",
    "schedule_name",
    "singleton_name",
    "singleton_shard",
]

RESERVED_PREFIX = "__"
"""No entity shard group starts with this."""
SINGLETON_PREFIX = "__singleton__."
SCHEDULE_PREFIX = "__schedule__."
"""The name of a schedule's singleton is this and the schedule's name."""
RUNNER_GROUP = "__runner__"
"""The group of a runner message's envelope: it is for the runner named by its entity
id, handled by that runner itself, never by a shard (no lease, no assignment)."""


def singleton_shard(name: str) -> ShardId:
    """The lease key of the singleton ``name``."""
    return ShardId(SINGLETON_PREFIX + name, 0)


def singleton_name(group: str) -> str | None:
    """The singleton whose group this is, or None for an entity group."""
    return group[len(SINGLETON_PREFIX) :] if group.startswith(SINGLETON_PREFIX) else None


def group_indices(group: str, shards_per_group: int) -> range:
    """The shard indices of ``group``: one for a singleton, the layout's for entities."""
    return range(1) if group.startswith(SINGLETON_PREFIX) else range(shards_per_group)


def schedule_name(singleton: str) -> str | None:
    """The schedule this singleton drives, or None for a user's singleton."""
    return singleton[len(SCHEDULE_PREFIX) :] if singleton.startswith(SCHEDULE_PREFIX) else None
