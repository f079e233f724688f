"""Placement of entity ids onto shards.

Shard indices are persisted (shard ownership lives in PostgreSQL and every runner
routes by them), so :func:`shard_index` must give the same answer in every process,
on every platform and in every future Python version.  That rules out :func:`hash`,
which is salted per process for ``str``.

We use a 64-bit BLAKE2b digest.  The original implementation used ``djb2 % n``, which
is not a hash in any useful sense for this job: because ``33 % 32 == 1``, the low bits
of djb2 barely depend on anything but the last character, so with a power-of-two shard
count sequential ids such as ``user-1 .. user-100000`` pile up on a few shards (6:1
between the busiest and the idlest of 64 shards); and for other counts consecutive ids
land on consecutive shards, a predictable stripe rather than a spread.  BLAKE2b is in
the standard library, implemented in C, and mixes every input bit into every output bit;
64 bits make the modulo bias negligible (below 2**-50 for any realistic shard count).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

__all__ = ["ShardId", "shard_index"]


class ShardId(NamedTuple):
    """A shard: the unit of ownership a runner acquires and releases.

    A NamedTuple rather than an attrs class because it is built and hashed for every
    message routed, and tuples are the cheapest hashable value Python has.
    """

    group: str
    # Shadows tuple.index(), which nobody calls on a ShardId; the name reads better.
    index: int  # type: ignore[assignment]

    def __str__(self) -> str:
        # The same text is used in logs and as a storage key, so keep it stable.
        return f"{self.group}/{self.index}"


def shard_index(entity_id: str, shards_per_group: int) -> int:
    """Return the shard (``0 <= index < shards_per_group``) that owns ``entity_id``.

    This mapping is part of the persisted format: changing it moves every entity to a
    different shard.  ``tests/test_hashing.py`` pins it with a golden table.
    """
    if shards_per_group < 1:
        raise ValueError(f"shards_per_group must be >= 1 (got {shards_per_group})")
    # surrogatepass makes the function total over str (a lone surrogate would
    # otherwise raise) without changing the bytes of any valid string.
    digest = hashlib.blake2b(entity_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards_per_group
