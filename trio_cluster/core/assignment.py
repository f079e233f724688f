"""Which runner owns which shard, computed alike by every runner.

There is no coordinator: each runner reads the same set of healthy runners from
PostgreSQL and calls :func:`assign`, so the answer must depend on nothing but that
set.  Hence the rules of this module: inputs are sorted before use, every position
comes from BLAKE2b (never :func:`hash`, which is salted per process), caps are
computed in exact fractions, and ties are broken by position in the sorted inputs.
The one floating-point step is a product ``distance * (1 / weight)`` with mixed
weights, and IEEE rounds those the same way on every platform.

The method is consistent hashing with bounded loads, solved as a stable matching:

* **Ring.**  Every runner puts ``VNODES`` points on a ring of ``2**32`` positions,
  from BLAKE2b keyed by its address alone; shard ``i`` of a group sits at
  ``offset + i * 0x9E3779B9`` (a golden-ratio step from an offset hashed from the
  group), so consecutive shards spread evenly and a shard's place never changes.
  A shard's *cost* for a runner is the clockwise distance to that runner's nearest
  point, divided by the runner's weight (the smallest of independent exponential
  distances divided by weights falls to each runner in proportion to its weight).
* **Caps.**  Per group, a runner's cap is its share ``n * w / W`` rounded up while
  that is below 8; above, 5/4 of the share first rounded up to a coarse step (8 to
  15 steps per doubling), so at most about 1.4 times the share (see ``_caps``).
* **Matching.**  The result is what taking pairs cheapest first would give, keeping
  a pair while its shard is free and its runner under cap: the unique stable
  matching for these costs.  It is found by deferred acceptance: every shard asks
  its cheapest runner, a runner over its cap keeps its cheapest shards, and a
  refused shard walks on along the ring to its next runner.  Nine shards in ten
  or more are settled by their first ask (one ``bisect``), so the cost grows with
  ``shards + VNODES * runners``, not with their product.

Why not exact quotas: the previous version held every runner between the floor
and the ceiling of its share (rendezvous hashing over all pairs, under quotas).  A
join then must take exactly one shard from each of the runners that end below the
old share, which the competition for the rounding extras cannot know; the rest is
cascades.  At 30 shards per runner (100 runners x 3,000 shards, 200 x 6,000) a
join or a leave moved 2.2 to 2.7 times the ideal ``n / N``.  Slack in the caps
ends cascades within a step or two, at the price of balance: loads spread about
as a Poisson count does around the mean (at 30 shards per runner, from about 16
to the cap of 38 or 40).  With less slack cascades come back (with caps at 11/10
of the share, a leave at 1,000 runners x 30,000 shards moved 12 times the ideal).
A cap that changes costs a shard or two per runner at its cap (a leave from
1,000 runners at 30,000 shards, where the share crosses 30, moved 3.5 times the
ideal); the coarse steps make that rare.

Measured (``benchmarks/assignment.py``; the figures with their command are in
``benchmarks/RESULTS.md``, issue 13): a join or a leave moves the shards of the
runner that came or went plus a few percent of cascade, so on average about the
ideal share; 1,000 runners x 30,000 shards take about 0.2 s of CPU on a loaded
2-core machine, where rendezvous over all pairs took 7.8 s on a quiet one.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import operator
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any, TypeVar

import attrs

from .hashing import ShardId
from .validation import number

__all__ = ["VNODES", "RunnerSpec", "assign"]

_T = TypeVar("_T")

_PERSON = b"tc-assign-v2"
"""Domain separation: the positions must differ from any other BLAKE2b use of these names."""

VNODES = 64
"""Ring points per runner: the spread of loads shrinks like ``1 / sqrt(VNODES)``
down to that of the shard count itself, and building the ring costs
``VNODES * runners``."""

SLACK = Fraction(1, 4)
"""How far above its share a runner may go: what keeps a join from cascading."""

_COARSE = 8
"""Shares below this get exact ceilings as caps, larger ones slack and coarse steps."""
_SLICE = 4096
"""Elements per C-level pass.  A worker thread holds the GIL for all of one C call,
so passes over every shard or point are cut into slices: between two, the event
loop's thread can take the GIL (a slice takes about a millisecond at most)."""
_RING = 2**32
_STEP = 0x9E3779B9  # 2**32 / golden ratio: the most even spread of 0, 1, 2, ...
_MAX_INDEX = 2**64


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
        by_group[shard.group][shard.index] = shard
    for members in by_group.values():
        for extreme in (min(members), max(members)):
            if not 0 <= extreme < _MAX_INDEX:
                raise ValueError(f"shard index out of range: {members[extreme]}")
    points: dict[str, tuple[int, ...]] = {}
    rings: dict[tuple[str, ...], _Ring] = {}
    result: dict[ShardId, str] = {}
    for group in sorted(by_group):
        eligible = [spec for spec in specs if group in spec.groups]
        if not eligible:
            continue
        addresses = tuple(spec.address for spec in eligible)
        ring = rings.get(addresses)
        if ring is None:
            for address in addresses:
                if address not in points:
                    points[address] = _ring_points(address)
            ring = rings[addresses] = _Ring([points[address] for address in addresses])
        members = by_group[group]
        indices = sorted(members)
        owners = _assign_group(group, indices, ring, [spec.weight for spec in eligible])
        for first in range(0, len(indices), _SLICE):
            some = indices[first : first + _SLICE]
            placed = map(addresses.__getitem__, owners[first : first + _SLICE])
            result.update(zip(map(members.__getitem__, some), placed, strict=True))
    return result


def _hasher(name: str) -> hashlib.blake2b:
    hasher = hashlib.blake2b(digest_size=64, person=_PERSON)
    encoded = name.encode("utf-8", "surrogatepass")
    hasher.update(len(encoded).to_bytes(8, "big") + encoded)
    return hasher


def _ring_points(address: str) -> tuple[int, ...]:
    """The runner's ``VNODES`` ring positions: sixteen 32-bit words per digest."""
    base = _hasher(address)
    digests = []
    for block in range(VNODES // 16):
        hasher = base.copy()
        hasher.update(block.to_bytes(8, "big"))
        digests.append(hasher.digest())
    return struct.unpack(f">{VNODES}I", b"".join(digests))


class _Ring:
    """The ring of some runners: sorted positions and, for each, its runner's position.

    Each point is sorted as one integer, its position above its runner's, so two
    runners on one position (about one pair in a ring of 90,000 points) stay in
    runner order, and ``bisect_left`` finds the first.  The points are sorted by
    buckets of their top bits, each on its own, so that no single C call sorts them
    all (see ``_SLICE``).
    """

    __slots__ = ("owners", "positions")

    def __init__(self, points: list[tuple[int, ...]]) -> None:
        bits = max(1, (len(points) - 1).bit_length())
        count = len(points) * VNODES
        spread = max(0, (count // _SLICE).bit_length())
        shift = 32 + bits - spread
        buckets: list[list[int]] = [[] for _ in range(1 << spread)]
        for r, runner in enumerate(points):
            for point in runner:
                key = (point << bits) | r
                buckets[key >> shift].append(key)
        keys: list[int] = []
        for bucket in buckets:
            bucket.sort()
            keys += bucket
        self.positions = [key >> bits for key in keys]
        self.owners = _sliced(((1 << bits) - 1).__and__, keys)


def _sliced(function: Callable[..., _T], *columns: Sequence[Any]) -> list[_T]:
    """``list(map(function, *columns))``, a slice at a time (see ``_SLICE``)."""
    result: list[_T] = []
    for first in range(0, len(columns[0]), _SLICE):
        result += map(function, *(column[first : first + _SLICE] for column in columns))
    return result


def _caps(n: int, weights: list[float]) -> list[int]:
    """Each runner's cap: its share rounded up while below 8, else 5/4 of its share
    rounded up to the next of 8, 9, ..., 15, 16, 18, ..., 30, 32, 36, ... first.

    Small shares get no slack: a cascade is short there anyway, and with exact
    ceilings no runner of a small cluster is left with nothing.  Above, the slack
    ends cascades, and the coarse steps keep the caps still: a join or a leave
    that changes a cap moves a shard or two for every runner at its cap, so the
    caps change every ~7% of membership instead of at every step of the share.
    Fractions: the rounding must come out alike on every runner.
    """
    if len(set(weights)) == 1:  # one cap for all: no Fractions per runner and group
        return [_cap(Fraction(n, len(weights)))] * len(weights)
    exact = [Fraction(w) for w in weights]
    total = sum(exact, Fraction(0))
    return [_cap(n * w / total) for w in exact]


def _cap(share: Fraction) -> int:
    if share < _COARSE:
        return math.ceil(share)
    step = 1 << (math.ceil(share).bit_length() - 4)  # 8 to 15 steps per doubling
    return math.ceil((1 + SLACK) * (math.ceil(share / step) * step))


def _assign_group(group: str, indices: list[int], ring: _Ring, weights: list[float]) -> list[int]:
    """Return, for each of the sorted ``indices``, the position of its runner."""
    offset = int.from_bytes(_hasher(group).digest()[:4], "big")
    spots = [(offset + index * _STEP) % _RING for index in indices]
    return _Matching(spots, ring, weights).solve()


class _Matching:
    """Deferred acceptance, shards asking, for one group.

    The cheapest pair wins whatever the order of asking: shards and runners rank
    every pair by the same key (cost, shard position, runner position), so the
    stable matching is unique.
    """

    def __init__(self, spots: list[int], ring: _Ring, weights: list[float]) -> None:
        self.spots = spots
        self.ring = ring
        positions, size = ring.positions, len(ring.positions)
        self.starts = [bisect.bisect_left(positions, spot) % size for spot in spots]
        self.caps = _caps(len(spots), weights)
        self.one_weight = len(set(weights)) == 1
        self.inverse = [1.0 / weight for weight in weights]
        n = len(spots)
        self.owner = [-1] * n
        self.cost: list[float] = [0.0] * n
        self.counts: Counter[int] = Counter()
        self.kept: dict[int, list[tuple[float, int]]] = {}
        """Per full runner, a max-heap of what it holds, as (-cost, -shard)."""
        self.walks: dict[int, Iterator[tuple[float, int]]] = {}

    def solve(self) -> list[int]:
        refused = self._first_asks()
        for k in refused:
            self.walks[k] = walk = self._asks(k)
            next(walk)  # the first ask, just refused
        while refused:
            k = refused.pop()
            walk = self.walks.get(k) or self.walks.setdefault(k, self._asks(k))
            price, r = next(walk)
            if self.counts[r] < self.caps[r]:
                self._take(k, r, price)
                continue
            held = self._held(r)
            worst_cost, worst = held[0]
            if (price, k) < (-worst_cost, -worst):
                heapq.heapreplace(held, (-price, -k))
                self.owner[-worst] = -1
                self.owner[k], self.cost[k] = r, price
                refused.append(-worst)
            else:
                refused.append(k)
        return self.owner

    def _asks(self, k: int) -> Iterator[tuple[float, int]]:
        """Shard ``k``'s runners, cheapest first: along the ring, each at its nearest point.

        No runner's point lies nearer than the next unvisited one, so no unseen runner
        costs less than that distance over the heaviest weight.
        """
        positions, owners, size = self.ring.positions, self.ring.owners, len(self.ring.positions)
        spot, start, one_weight, inverse = (
            self.spots[k],
            self.starts[k],
            self.one_weight,
            self.inverse,
        )
        bound = 1 if one_weight else min(inverse)
        seen: set[int] = set()
        pending: list[tuple[float, int]] = []
        for q in itertools.chain(range(start, size), range(start)):
            distance = (positions[q] - spot) % _RING
            while pending and pending[0][0] < distance * bound:
                yield heapq.heappop(pending)
            r = owners[q]
            if r not in seen:
                seen.add(r)
                heapq.heappush(pending, (distance if one_weight else distance * inverse[r], r))
        while pending:
            yield heapq.heappop(pending)

    def _first_asks(self) -> list[int]:
        """Settle every shard's first ask at once; return the shards refused.

        With one weight the first ask is the next point's runner; with several, the
        cheapest runner met before the distance over the heaviest weight passes its
        cost (as in :meth:`_asks`).  Each runner asked by more shards than its cap
        keeps its cheapest.
        """
        if self.one_weight:
            positions = self.ring.positions
            owner = _sliced(self.ring.owners.__getitem__, self.starts)
            distances = _sliced(
                operator.sub, _sliced(positions.__getitem__, self.starts), self.spots
            )
            cost: list[float] = _sliced(_RING.__rmod__, distances)
        else:
            owner, cost = self._cheapest()
        self.owner, self.cost = owner, cost
        for first in range(0, len(owner), _SLICE):
            self.counts.update(owner[first : first + _SLICE])
        over = sorted(r for r, count in self.counts.items() if count > self.caps[r])
        asked = itertools.compress(range(len(owner)), _sliced(set(over).__contains__, owner))
        ranked = sorted(asked, key=lambda k: (owner[k], cost[k], k))
        refused: list[int] = []
        for r, shards in itertools.groupby(ranked, key=owner.__getitem__):
            ordered, cap = list(shards), self.caps[r]
            self.kept[r] = held = [(-cost[k], -k) for k in ordered[:cap]]
            heapq.heapify(held)
            for k in ordered[cap:]:
                owner[k] = -1
            self.counts[r] = cap
            refused.extend(ordered[cap:])
        return refused

    def _cheapest(self) -> tuple[list[int], list[float]]:
        """Each shard's cheapest runner and its cost, with mixed weights."""
        positions, owners, size = self.ring.positions, self.ring.owners, len(self.ring.positions)
        inverse = self.inverse
        bound = min(inverse)
        owner: list[int] = []
        cost: list[float] = []
        for spot, start in zip(self.spots, self.starts, strict=True):
            q = start % size
            best_r = owners[q]
            best = ((positions[q] - spot) % _RING) * inverse[best_r]
            for step in range(1, size):
                q = (start + step) % size
                distance = (positions[q] - spot) % _RING
                if distance * bound > best:
                    break
                r = owners[q]
                price = distance * inverse[r]
                best, best_r = min((best, best_r), (price, r))
            owner.append(best_r)
            cost.append(best)
        return owner, cost

    def _take(self, k: int, r: int, price: float) -> None:
        self.counts[r] += 1
        self.owner[k], self.cost[k] = r, price
        if r in self.kept:
            heapq.heappush(self.kept[r], (-price, -k))

    def _held(self, r: int) -> list[tuple[float, int]]:
        """Full runner ``r``'s heap, built from what it holds on its first refusal.

        Found by a scan mostly in C, once per runner that fills up: a few
        dozen of them, where indexing every runner's shards would cost more.
        """
        held = self.kept.get(r)
        if held is None:
            holds = itertools.compress(range(len(self.owner)), _sliced(r.__eq__, self.owner))
            held = self.kept[r] = [(-self.cost[k], -k) for k in holds]
            heapq.heapify(held)
        return held
