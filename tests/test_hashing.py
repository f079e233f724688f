"""Shard placement: stable forever (it is persisted) and evenly spread."""

import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core.hashing import ShardId, shard_index

# Shard assignments live in PostgreSQL, so this table must never change: if it fails,
# the change to shard_index is a data migration, not a refactoring.
GOLDEN = [
    # entity id, index for 100 shards, for 1024 shards, for 7 shards
    ("", 76, 692, 0),
    ("a", 43, 559, 2),
    ("user-1", 68, 392, 3),
    ("user-2", 64, 968, 6),
    ("user-42", 98, 934, 4),
    ("550e8400-e29b-41d4-a716-446655440000", 8, 252, 1),
    ("order:7:item", 63, 867, 6),
    ("ünïcödé", 69, 501, 2),
    ("🦀", 32, 28, 2),
    ("\ud800", 64, 360, 3),  # a lone surrogate: not valid UTF-8, still placed
]


@pytest.mark.parametrize(("entity_id", "of_100", "of_1024", "of_7"), GOLDEN)
def test_golden_table(entity_id: str, of_100: int, of_1024: int, of_7: int) -> None:
    assert shard_index(entity_id, 100) == of_100
    assert shard_index(entity_id, 1024) == of_1024
    assert shard_index(entity_id, 7) == of_7


def test_golden_full_digest() -> None:
    # With 2**64 shards the index is the whole 64-bit digest: pins every bit.
    assert shard_index("user-1", 2**64) == 11_145_382_709_976_293_768
    assert shard_index("", 2**64) == 16_476_032_584_258_269_876


@given(st.text(), st.integers(min_value=1, max_value=2**70))
def test_deterministic_and_in_range(entity_id: str, shards: int) -> None:
    index = shard_index(entity_id, shards)
    assert 0 <= index < shards
    assert shard_index(entity_id, shards) == index


def test_single_shard_takes_everything() -> None:
    assert {shard_index(f"user-{i}", 1) for i in range(100)} == {0}


@pytest.mark.parametrize("shards", [0, -1])
def test_rejects_fewer_than_one_shard(shards: int) -> None:
    with pytest.raises(ValueError, match="shards_per_group"):
        shard_index("user-1", shards)


def test_shard_id() -> None:
    shard = ShardId("default", 17)
    assert str(shard) == "default/17"
    assert shard == ShardId(group="default", index=17)
    assert shard.index == 17
    assert {shard: 1}[ShardId("default", 17)] == 1
    assert shard != ShardId("other", 17)


# --- balance -----------------------------------------------------------------------
# Deterministic inputs, so these either always pass or always fail: no flakiness.

ID_SHAPES: dict[str, Callable[[int], str]] = {
    "sequential names": lambda i: f"user-{i}",
    "sequential uuids": lambda i: str(uuid.UUID(int=i)),
    # Multiplying by a large odd constant scrambles the bits like a random uuid4, at a
    # fraction of uuid5's cost.
    "scrambled uuids": lambda i: str(
        uuid.UUID(int=i * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128)
    ),
}

# Chi-square critical values at p = 0.001 for (shards - 1) degrees of freedom.
CHI2_CRITICAL = {100: 148.23, 64: 103.44}


def assert_balanced(ids: list[str], shards: int) -> None:
    counts = Counter(shard_index(entity_id, shards) for entity_id in ids)
    observed = [counts[index] for index in range(shards)]
    mean = len(ids) / shards
    assert min(observed) >= 0.85 * mean, observed
    assert max(observed) <= 1.15 * mean, observed
    chi2 = sum((count - mean) ** 2 / mean for count in observed)
    assert chi2 < CHI2_CRITICAL[shards]


@pytest.mark.parametrize("shape", ID_SHAPES)
def test_balanced_over_100_shards(shape: str) -> None:
    make_id = ID_SHAPES[shape]
    assert_balanced([make_id(i) for i in range(100_000)], 100)


def test_balanced_over_power_of_two_shards() -> None:
    # The case where djb2 % n was worst: 6:1 between the busiest and idlest shard.
    assert_balanced([f"user-{i}" for i in range(100_000)], 64)
