"""Shard assignment: the same on every runner, balanced, and stable when runners come and go."""

import math
import os
import random
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core import assignment
from trio_cluster.core.assignment import RunnerSpec, assign
from trio_cluster.core.hashing import ShardId

addresses = st.text(min_size=1, max_size=12)
weights = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 7.5])
groups = st.sampled_from(["default", "orders", "users"])


def runner_lists(
    min_size: int = 1, max_size: int = 12, *, weighted: bool = False, grouped: bool = False
) -> st.SearchStrategy[list[RunnerSpec]]:
    spec = st.builds(
        RunnerSpec,
        address=addresses,
        weight=weights if weighted else st.just(1.0),
        groups=st.frozensets(groups, max_size=3) if grouped else st.just(frozenset({"default"})),
    )
    return st.lists(spec, min_size=min_size, max_size=max_size, unique_by=lambda spec: spec.address)


def shards_of(count: int, group: str = "default") -> list[ShardId]:
    return [ShardId(group, index) for index in range(count)]


shard_counts = st.integers(min_value=1, max_value=300)
weighted_runners = runner_lists(min_size=2, max_size=13, weighted=True)
mixed_shards = st.lists(
    st.builds(ShardId, groups, st.integers(min_value=0, max_value=400)), max_size=300
)


def moved(before: dict[ShardId, str], after: dict[ShardId, str]) -> int:
    return sum(1 for shard, owner in before.items() if after.get(shard) != owner)


def movement_bound(count: int, runners: list[RunnerSpec], mover: RunnerSpec) -> float:
    """How many shards a join or a leave of ``mover`` may move among ``count``.

    ``ideal`` is the mover's share rounded up.  The mover itself may hold up to
    its cap (5/4 of its share, rounded up), and caps add short cascades on top
    (see the module docstring of assignment).
    """
    total = sum(Fraction(spec.weight) for spec in runners)
    ideal = math.ceil(count * Fraction(mover.weight) / total)
    return 2 * ideal + 10


# -- determinism ----------------------------------------------------------------


@given(mixed_shards, runner_lists(weighted=True, grouped=True), st.randoms())
def test_independent_of_input_order(
    shards: list[ShardId], runners: list[RunnerSpec], rng: random.Random
) -> None:
    expected = assign(shards, runners)
    shuffled_shards, shuffled_runners = list(shards), list(runners)
    rng.shuffle(shuffled_shards)
    rng.shuffle(shuffled_runners)
    assert assign(iter(shuffled_shards), iter(shuffled_runners)) == expected


def test_pinned_assignment() -> None:
    # Every runner must compute the same answer, whatever its build: a change to the
    # positions or to the matching shows up here, and is a cluster-wide reshuffle.
    runners = [RunnerSpec(f"10.0.0.{i}:7000") for i in range(1, 4)]
    owners = assign(shards_of(12), runners)
    last_digits = "".join(owners[ShardId("default", i)][7] for i in range(12))
    assert last_digits == "233323211121"


SCRIPT = """
import hashlib, sys
from trio_cluster.core.assignment import RunnerSpec, assign
from trio_cluster.core.hashing import ShardId
runners = [
    RunnerSpec(f"10.0.0.{i}:7000", weight=(1.0, 2.5)[i % 2], groups={"a", "b"} - {"ab"[i % 3 == 0]})
    for i in range(40)
]
shards = [ShardId(group, index) for group in "ab" for index in range(500)]
owners = assign(shards, runners)
text = ";".join(f"{shard}={owners.get(shard)}" for shard in shards)
sys.stdout.write(hashlib.sha256(text.encode()).hexdigest())
"""


@pytest.mark.parametrize("seed", ["0", "1", "4242"])
def test_the_same_in_every_process(seed: str) -> None:
    # Nothing may depend on str hashing (salted per process) or set order.
    def run(hash_seed: str) -> str:
        environ = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=environ, capture_output=True, text=True, check=True
        )
        return done.stdout

    assert run(seed) == run("random")


def cheapest_pairs_first(shards: list[ShardId], runners: list[RunnerSpec]) -> dict[ShardId, str]:
    """The definition that ``assign`` computes faster: every (shard, runner) pair's
    cost, all pairs sorted, each kept while its shard is free and its runner under cap."""
    specs = sorted(runners, key=lambda spec: spec.address)
    owners: dict[ShardId, str] = {}
    for group in sorted({shard.group for shard in shards}):
        eligible = [spec for spec in specs if group in spec.groups]
        if not eligible:
            continue
        indices = sorted({shard.index for shard in shards if shard.group == group})
        offset = int.from_bytes(assignment._hasher(group).digest()[:4], "big")
        weights = {spec.weight for spec in eligible}
        pairs = []
        for k, index in enumerate(indices):
            spot = (offset + index * 0x9E3779B9) % 2**32
            for r, spec in enumerate(eligible):
                points = assignment._ring_points(spec.address)
                distance = min((point - spot) % 2**32 for point in points)
                cost = distance if len(weights) == 1 else distance * (1.0 / spec.weight)
                pairs.append((cost, k, r))
        caps = assignment._caps(len(indices), [spec.weight for spec in eligible])
        counts = [0] * len(eligible)
        for _, k, r in sorted(pairs):
            shard = ShardId(group, indices[k])
            if shard not in owners and counts[r] < caps[r]:
                owners[shard] = eligible[r].address
                counts[r] += 1
    return owners


@given(
    st.lists(st.builds(ShardId, groups, st.integers(min_value=0, max_value=60)), max_size=60),
    runner_lists(max_size=6, weighted=True, grouped=True),
)
def test_the_same_as_taking_the_cheapest_pairs_first(
    shards: list[ShardId], runners: list[RunnerSpec]
) -> None:
    assert assign(shards, runners) == cheapest_pairs_first(shards, runners)


@given(shard_counts, runner_lists(min_size=2, max_size=8))
def test_the_same_as_taking_the_cheapest_pairs_first_when_caps_bind(
    count: int, runners: list[RunnerSpec]
) -> None:
    assert assign(shards_of(count), runners) == cheapest_pairs_first(shards_of(count), runners)


# -- coverage and groups --------------------------------------------------------


@given(mixed_shards, runner_lists(min_size=0, weighted=True, grouped=True))
def test_every_shard_goes_to_an_eligible_runner(
    shards: list[ShardId], runners: list[RunnerSpec]
) -> None:
    owners = assign(shards, runners)
    hosts = {spec.address: spec.groups for spec in runners}
    hosted = {group for spec in runners for group in spec.groups}
    assert set(owners) == {shard for shard in shards if shard.group in hosted}
    for shard, owner in owners.items():
        assert shard.group in hosts[owner]


def test_groups_are_balanced_separately() -> None:
    runners = [
        RunnerSpec("a", groups={"orders", "users"}),
        RunnerSpec("b", groups={"orders"}),
        RunnerSpec("c", groups={"users"}),
    ]
    owners = assign(shards_of(40, "orders") + shards_of(40, "users") + shards_of(3, "x"), runners)
    per_group = Counter((shard.group, owner) for shard, owner in owners.items())
    assert set(per_group) == {("orders", "a"), ("orders", "b"), ("users", "a"), ("users", "c")}
    assert max(per_group.values()) <= 25  # each group's cap: 5/4 of 20


def test_no_runners_no_assignment() -> None:
    assert assign(shards_of(5), []) == {}
    assert assign([], [RunnerSpec("a")]) == {}


# -- balance ----------------------------------------------------------------------


@given(mixed_shards, runner_lists(weighted=True, grouped=True))
def test_no_runner_holds_more_than_five_quarters_of_its_share(
    shards: list[ShardId], runners: list[RunnerSpec]
) -> None:
    owners = assign(shards, runners)
    for group in {shard.group for shard in shards}:
        count = len({shard for shard in shards if shard.group == group})
        eligible = [spec for spec in runners if group in spec.groups]
        total = sum(Fraction(spec.weight) for spec in eligible)
        loads = Counter(owner for shard, owner in owners.items() if shard.group == group)
        for spec in eligible:
            assert loads[spec.address] <= math.ceil(Fraction(5, 4) * count * spec.weight / total)


def test_weights_set_the_shares() -> None:
    # Costs are distances over weights: a runner twice as heavy wins about twice as
    # many shards, and none goes above its cap.
    runners = [RunnerSpec(f"light-{i}") for i in range(8)] + [
        RunnerSpec(f"heavy-{i}", weight=2.0) for i in range(4)
    ]
    loads = Counter(assign(shards_of(4000), runners).values())
    light = sum(loads[f"light-{i}"] for i in range(8))
    heavy = sum(loads[f"heavy-{i}"] for i in range(4))
    assert light + heavy == 4000
    assert 0.9 < heavy / light < 1.1
    assert max(loads.values()) <= math.ceil(1.25 * 500)


def test_loads_spread_little_on_a_large_cluster() -> None:
    # 100 runners x 3,000 shards: every runner within its cap of 38 and none idle.
    runners = [RunnerSpec(f"runner-{i}") for i in range(100)]
    loads = Counter(assign(shards_of(3000), runners).values())
    assert len(loads) == 100
    assert min(loads.values()) >= 10 and max(loads.values()) <= 38


# -- movement -----------------------------------------------------------------------


@given(shard_counts, st.one_of(runner_lists(min_size=2, max_size=13), weighted_runners))
def test_a_join_moves_little_more_than_the_newcomer_takes(
    count: int, runners: list[RunnerSpec]
) -> None:
    shards = shards_of(count)
    before = assign(shards, runners[:-1])
    after = assign(shards, runners)
    newcomer = runners[-1]
    taken = sum(1 for owner in after.values() if owner == newcomer.address)
    assert taken <= moved(before, after) <= movement_bound(count, runners, newcomer)


@given(shard_counts, runner_lists(min_size=2, max_size=13), st.data())
def test_a_leave_moves_little_more_than_the_leaver_held(
    count: int, runners: list[RunnerSpec], data: st.DataObject
) -> None:
    shards = shards_of(count)
    gone = data.draw(st.sampled_from(runners))
    before = assign(shards, runners)
    after = assign(shards, [spec for spec in runners if spec is not gone])
    held = sum(1 for owner in before.values() if owner == gone.address)
    assert held <= moved(before, after) <= movement_bound(count, runners, gone)


def test_average_movement_is_close_to_ideal() -> None:
    # The bound above is for the worst case; on average a join moves about its share.
    # Fixed names, so this is deterministic.
    total_moved = total_ideal = 0
    for trial in range(150):
        count, size = 1 + trial * 2, 1 + trial % 12
        runners = [RunnerSpec(f"10.0.{trial}.{i}:7000") for i in range(size + 1)]
        shards = shards_of(count)
        total_moved += moved(assign(shards, runners[:-1]), assign(shards, runners))
        total_ideal += math.ceil(count / (size + 1))
    assert total_moved <= 1.25 * total_ideal


def test_movement_on_a_larger_cluster() -> None:
    # 100 -> 101 runners at 3,000 shards, five different newcomers, and each of the
    # hundred leaving in turn: on average the move is about the ideal 30 (what the
    # runner that came or went holds, plus a cascade of a shard or two).
    shards = shards_of(3000)
    runners = [RunnerSpec(f"runner-{i}") for i in range(105)]
    before = assign(shards, runners[:100])
    joins = [moved(before, assign(shards, [*runners[:100], extra])) for extra in runners[100:]]
    leaves = [moved(before, assign(shards, runners[:i] + runners[i + 1 : 100])) for i in range(20)]
    ideal = 3000 / 100
    assert sum(joins) / len(joins) <= 1.25 * ideal
    assert sum(leaves) / len(leaves) <= 1.25 * ideal


# -- validation ---------------------------------------------------------------------


def test_duplicate_addresses_are_refused() -> None:
    with pytest.raises(ValueError, match="share the address 'a'"):
        assign(shards_of(1), [RunnerSpec("a"), RunnerSpec("b"), RunnerSpec("a", weight=2)])


@pytest.mark.parametrize("index", [-1, 2**64])
def test_shard_index_must_fit_64_bits(index: int) -> None:
    with pytest.raises(ValueError, match="shard index out of range"):
        assign([ShardId("default", index)], [RunnerSpec("a")])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"address": ""}, ValueError),
        ({"address": "a", "weight": 0}, ValueError),
        ({"address": "a", "weight": -1.0}, ValueError),
        ({"address": "a", "weight": math.inf}, ValueError),
        ({"address": "a", "weight": math.nan}, ValueError),
        ({"address": "a", "weight": True}, TypeError),
        ({"address": "a", "groups": "default"}, TypeError),
    ],
)
def test_runner_spec_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RunnerSpec(**kwargs)  # type: ignore[arg-type]


def test_runner_spec_accepts_any_collection_of_groups() -> None:
    assert RunnerSpec("a", groups=["x", "y", "x"]).groups == frozenset({"x", "y"})
    assert RunnerSpec("a").groups == frozenset({"default"})
