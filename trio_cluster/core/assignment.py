"""Which runner owns which shard, computed alike by every runner.

There is no coordinator: each runner reads the same set of healthy runners from
PostgreSQL and calls :func:`assign`, so the answer must depend on nothing but that
set.  Hence the rules of this module: inputs are sorted before use, every score comes
from BLAKE2b (never :func:`hash`, which is salted per process), and quotas are
computed in exact fractions.  The one floating-point step that a C library could
round differently is the logarithm used with mixed weights; two costs would have to
agree to about 15 digits for that to change an owner.

The method is weighted rendezvous hashing with exact quotas:

* **Scores.**  Every (shard, runner) pair gets a uniform ``u`` in ``(0, 1)`` from
  BLAKE2b, keyed by the runner's address, the shard's group and its index alone, so a
  pair's score never changes while both exist.  The pair's cost is ``-ln(u) / weight``
  (the logarithmic method of weighted rendezvous hashing): without quotas every shard
  would go to its cheapest runner, and each runner would win a share proportional to
  its weight.
* **Quotas.**  Per group, a runner may hold at most ``ceil(n * w / W)`` and at least
  ``floor(n * w / W)`` shards.  Rendezvous alone is balanced only on average (about
  ``sqrt(n / N)`` off per runner), and an overloaded runner is what this module exists
  to prevent.
* **Greedy.**  Pairs are taken cheapest first, and a pair is kept when its shard is
  still free and its runner is under quota; the ``n - sum(floor)`` shards above the
  floors go to whichever runners reach them first.  The result is the stable
  assignment for these quotas: no shard and runner prefer each other to what they
  got.  A join or a leave changes scores only for the runner that came or went, so
  the greedy keeps most decisions; letting the competition, rather than a fixed
  order of runners, decide who carries the rounding extra measurably cuts movement.

Movement, measured (``ideal`` is what the runner that came or went holds, its share
rounded up; a leave is a join played backwards, so the figures are the same):

* 100,000 random joins, N -> N + 1 runners with N in 1..12, 1..300 shards, equal
  weights: on average 1.14 x ideal moved; the worst case was 1.5 x ideal + 10, and
  none exceeded 2 x ideal + 5 (``tests/test_assignment.py`` checks 2 x ideal + 10).
  50,000 such joins with mixed weights: 1.12 x ideal on average, at most 2 x ideal + 7.
* 1,000 shards, 20 -> 21 runners (40 joins): 1.38 x ideal on average, 1.5 x at worst.

The moves beyond the ideal are rounding cascades: the newcomer takes its best shards
from whichever runners hold them, while the quotas shrink evenly, so a runner that
lost two shards but must shed only one takes one back from another runner, which
takes one back in turn...  They grow like the imbalance the quotas remove (about
``sqrt(n)``), not like ``n``; unbounded rendezvous moves exactly the ideal but leaves
runners that much over quota.

Why not a ring: the same quotas on a ring of 128 virtual nodes per runner (walking on
to the next runner with room) did worse over 3,000 random joins of the first kind:
1.17 x ideal on average against 1.15, and 14 joins above 1.5 x ideal + 6 against 1 (worst excess 21
shards against 16).  On a ring a full runner's overflow lands on its neighbour, whose
overflow moves on along the ring; rendezvous spreads a displaced shard over
independent second choices.

Speed (CPython 3.11 on a small 2-core container): 1,000 shards on 20 runners take
about 3 ms with equal weights and 5 ms with mixed ones.  The cost is the 20,000
scores: eight per BLAKE2b call, turned into floats by one ``struct`` call per runner,
and the logarithm only when weights differ.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import operator
import struct
from collections import defaultdict
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import attrs

from .hashing import ShardId
from .validation import number

__all__ = ["RunnerSpec", "assign"]

_PERSON = b"tc-assign-v1"
"""Domain separation: the scores must differ from any other BLAKE2b use of these names."""

_MAX_INDEX = 2**64
_EXPONENT_LOW_NIBBLE = bytes(0xF0 | (byte & 0x0F) for byte in range(256))


def _non_empty(_instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name}: must not be empty")


def _group_set(groups: Iterable[str]) -> frozenset[str]:
    """Accept any iterable of names, but not a bare string (a set of its letters)."""
    if isinstance(groups, str):
        raise TypeError(f"groups: expected a collection of group names, got {groups!r}")
    return frozenset(groups)


@attrs.frozen
class RunnerSpec:
    """A healthy runner as the assignment sees it.

    ``weight`` scales the share of every group the runner hosts; ``groups`` lets
    runners specialise (a shard of a group nobody hosts stays unassigned).
    """

    address: str = attrs.field(validator=[attrs.validators.instance_of(str), _non_empty])
    weight: float = attrs.field(default=1.0, validator=number(minimum=0, inclusive=False))
    groups: frozenset[str] = attrs.field(default=frozenset({"default"}), converter=_group_set)


def assign(shards: Iterable[ShardId], runners: Iterable[RunnerSpec]) -> dict[ShardId, str]:
    """Map each shard to the address of the runner that owns it.

    The result does not depend on the order of either input.  A shard whose group no
    runner hosts is absent.  Raises ValueError for two runners with one address (each
    runner would think it owns the other's shards) and for a shard index outside
    ``0 <= index < 2**64``.
    """
    specs = sorted(runners, key=lambda spec: spec.address)
    for before, after in itertools.pairwise(specs):
        if before.address == after.address:
            raise ValueError(f"two runners share the address {before.address!r}")
    by_group: defaultdict[str, dict[int, ShardId]] = defaultdict(dict)
    for shard in shards:
        if not 0 <= shard.index < _MAX_INDEX:
            raise ValueError(f"shard index out of range: {shard}")
        by_group[shard.group][shard.index] = shard
    result: dict[ShardId, str] = {}
    for group in sorted(by_group):
        eligible = [spec for spec in specs if group in spec.groups]
        if not eligible:
            continue
        members = by_group[group]
        indices = sorted(members)
        addresses = [spec.address for spec in eligible]
        owners = _assign_group(group, indices, eligible)
        for index, owner in zip(indices, owners, strict=True):
            result[members[index]] = addresses[owner]
    return result


def _assign_group(group: str, indices: list[int], runners: list[RunnerSpec]) -> list[int]:
    """Return, for each of the sorted ``indices``, the position of its runner.

    Equivalent to sorting all pairs by (cost, shard position, runner position) and
    keeping each pair whose shard is free and whose runner is under quota; a heap of
    each free shard's best remaining candidate yields the pairs in that order without
    sorting all of them.
    """
    n = len(indices)
    floors, may_exceed, spare = _quotas(n, [spec.weight for spec in runners])
    rows = list(zip(*_cost_columns(group, indices, runners), strict=True))
    best = list(map(min, rows))
    # tuple.index finds the first minimum: ties go to the lower runner position.
    heap = list(zip(best, range(n), map(tuple.index, rows, best), strict=True))
    heapq.heapify(heap)
    counts = [0] * len(runners)
    full = [floor == 0 and not extra for floor, extra in zip(floors, may_exceed, strict=True)]
    owners = [-1] * n
    rankings: dict[int, list[int]] = {}
    while heap:
        _, k, r = heapq.heappop(heap)
        if not full[r]:
            owners[k] = r
            counts[r] += 1
            if counts[r] > floors[r]:
                spare -= 1
                if spare == 0:  # no extras left: every runner at its floor is now full
                    full = [count >= floor for count, floor in zip(counts, floors, strict=True)]
            full[r] = counts[r] > floors[r] or (
                counts[r] == floors[r] and (spare == 0 or not may_exceed[r])
            )
            continue
        row = rows[k]
        ranking = rankings.get(k)
        if ranking is None:
            # A stable sort, so equal costs rank by runner position, as in the pair order.
            ranking = rankings[k] = sorted(range(len(row)), key=row.__getitem__)
        # Full runners stay full, so the first one with room is the next pair in order.
        nxt = next(candidate for candidate in ranking if not full[candidate])
        heapq.heappush(heap, (row[nxt], k, nxt))
    return owners


def _quotas(n: int, weights: list[float]) -> tuple[list[int], list[bool], int]:
    """Return each runner's floor, whether it may hold one more, and how many may.

    Fractions, not floats: ``n * w / W`` must round the same way on every runner, and
    a float product such as ``3.0000000000000004`` would turn a ceiling of 3 into 4.
    """
    exact = [Fraction(w) for w in weights]
    total = sum(exact, Fraction(0))
    shares = [n * w / total for w in exact]
    floors = [math.floor(share) for share in shares]
    may_exceed = [share != floor for share, floor in zip(shares, floors, strict=True)]
    return floors, may_exceed, n - sum(floors)


def _cost_columns(
    group: str, indices: list[int], runners: list[RunnerSpec]
) -> list[tuple[float, ...] | list[float]]:
    """For each runner, the cost ``-ln(u) / weight`` of each shard of ``group``.

    ``u`` takes 52 bits of a BLAKE2b digest keyed by (runner, group, index // 8), so a
    pair's score depends on that pair alone, whatever else is being assigned; one
    64-byte digest serves eight consecutive indices.  The bits become a float by
    bytewise surgery (the IEEE exponent of 1.0 written over each word's top 12 bits)
    and one ``struct`` call: a Python loop over 20,000 scores would cost more than
    everything else together.  When all runners weigh the same, ``-ln(u) / weight``
    ranks pairs exactly as ``2 - u`` does, and the logarithm is skipped.
    """
    blocks = sorted({index >> 3 for index in indices})
    suffixes = [block.to_bytes(8, "big") for block in blocks]
    block_rank = {block: rank for rank, block in enumerate(blocks)}
    positions = [block_rank[index >> 3] * 8 + (index & 7) for index in indices]
    pick = operator.itemgetter(*positions)
    words = 8 * len(blocks)
    unpack = struct.Struct(f">{words}d").unpack
    one_weight = len({spec.weight for spec in runners}) == 1
    columns: list[tuple[float, ...] | list[float]] = []
    for spec in runners:
        base = hashlib.blake2b(digest_size=64, person=_PERSON)
        for name in (spec.address, group):
            encoded = name.encode("utf-8", "surrogatepass")
            base.update(len(encoded).to_bytes(8, "big") + encoded)
        stream = bytearray(b"".join([_digest(base, suffix) for suffix in suffixes]))
        # Give every word the sign and exponent of 1.0 (its top 12 bits), keeping 52
        # random mantissa bits: a float uniform in [1, 2), which we take as 2 - u.
        stream[0::8] = b"\x3f" * words
        stream[1::8] = stream[1::8].translate(_EXPONENT_LOW_NIBBLE)
        picked = pick(unpack(stream))
        two_minus_u: tuple[float, ...] = picked if len(positions) > 1 else (picked,)
        if one_weight:
            columns.append(two_minus_u)
        else:
            u = map(operator.sub, itertools.repeat(2.0), two_minus_u)
            columns.append(
                list(map(operator.mul, itertools.repeat(-1.0 / spec.weight), map(math.log, u)))
            )
    return columns


def _digest(base: hashlib.blake2b, suffix: bytes) -> bytes:
    hasher = base.copy()
    hasher.update(suffix)
    return hasher.digest()
