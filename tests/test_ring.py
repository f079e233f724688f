"""Who watches whom (``postgres.ring``): every live runner watched by exactly one other."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.postgres.ring import successor

ids = st.frozensets(st.integers(min_value=0, max_value=1023), min_size=2, max_size=40)


@given(ids)
def test_the_watch_is_one_ring_through_every_live_runner(live: frozenset[int]) -> None:
    watched = {me: successor(live, me) for me in live}
    # Each runner watches another live one, and each is watched by exactly one.
    assert sorted(target for target in watched.values() if target is not None) == sorted(live)
    assert all(watched[me] != me for me in live)
    # One cycle, not several: from any runner, following the watch visits them all.
    start = min(live)
    seen, at = {start}, watched[start]
    while at != start:
        assert at is not None and at not in seen
        seen.add(at)
        at = watched[at]
    assert seen == live


@given(ids, st.integers(min_value=0, max_value=1023))
def test_a_join_or_death_changes_one_watchers_target(live: frozenset[int], other: int) -> None:
    changed = live ^ {other}
    if len(changed) < 2:
        return
    moved = {me for me in live & changed if successor(live, me) != successor(changed, me)}
    assert len(moved) <= 1


def test_alone_or_unregistered_watches_nobody() -> None:
    assert successor({5}, 5) is None
    assert successor(set(), 5) is None
    assert successor({1, 2}, -1) is None
    assert successor({1, 2}, 3) == 1  # not yet in the read: the ring still has a place for it
    assert successor({1, 4, 9}, 9) == 1
