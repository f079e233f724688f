"""Group commit's pure decisions: how queued writes become batches, notes become payloads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.postgres.batching import fits, pack_notes, split_conflicts

items = st.lists(st.tuples(st.integers(0, 50), st.lists(st.integers(0, 6), max_size=3)))


@given(items)
def test_split_keeps_every_item_once_and_no_batch_repeats_a_key(
    queued: list[tuple[int, list[int]]],
) -> None:
    batches = split_conflicts(queued, lambda item: item[1])
    assert sorted(x for batch in batches for x in batch) == sorted(queued)
    for batch in batches:
        keys = [key for _, item_keys in batch for key in set(item_keys)]
        assert len(keys) == len(set(keys))
        assert batch  # no empty batch


@given(items)
def test_split_keeps_the_order_of_items_sharing_a_key(
    queued: list[tuple[int, list[int]]],
) -> None:
    numbered = list(enumerate(queued))
    batches = split_conflicts(numbered, lambda item: item[1][1])
    where = {n: b for b, batch in enumerate(batches) for n, _ in batch}
    for n, (_, keys) in numbered:
        for m, (_, other) in numbered[:n]:
            if set(keys) & set(other):
                assert where[m] < where[n]


def test_items_without_conflicts_go_in_one_batch() -> None:
    assert split_conflicts([1, 2, 3], lambda n: (n,)) == [[1, 2, 3]]
    assert split_conflicts([1, 2, 1, 3, 1], lambda n: (n,)) == [[1, 2, 3], [1], [1]]


notes = st.lists(st.one_of(st.none(), st.text(alphabet="ab", min_size=1, max_size=40)))


@given(notes, st.integers(0, 10), st.integers(50, 120))
def test_packed_payloads_fit_and_keep_order(
    queued: list[str | None], header: int, limit: int
) -> None:
    groups = pack_notes(queued, header, limit)
    assert len(groups) == len(queued)
    assert all((g == -1) == (note is None) for g, note in zip(groups, queued, strict=True))
    sent = [g for g in groups if g >= 0]
    assert sent == sorted(sent)  # in order, each payload a run
    assert sent == [] or set(sent) == set(range(sent[-1] + 1))
    for group in set(sent):
        members = [n for n, g in zip(queued, groups, strict=True) if g == group and n]
        assert header + len(",".join(members)) <= limit


def test_small_notes_share_one_payload_and_a_big_one_does_not_fit() -> None:
    assert pack_notes(["a" * 10] * 5, 2) == [0] * 5
    assert not fits("a" * 8000, 2)
    assert fits("a" * 7997, 2)
