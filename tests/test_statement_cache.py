"""The prepared-statement cache's bookkeeping, against a model of what it must hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.pgdriver.statements import StatementCache, StatementKey

KEYS = st.sampled_from([(b"SELECT %d" % n, (n % 3,)) for n in range(8)])
OPS = st.lists(st.tuples(st.sampled_from(["use", "stale", "gone"]), KEYS), max_size=60)


@given(capacity=st.integers(1, 5), ops=OPS)
def test_every_name_prepared_is_either_cached_or_handed_back_at_most_once(
    capacity: int, ops: list[tuple[str, StatementKey]]
) -> None:
    """Bounded, never a reused name, and no server-side statement leaked or freed twice."""
    cache = StatementCache(capacity)
    on_server: set[bytes] = set()
    named: set[bytes] = set()
    for op, key in ops:
        if op == "use":
            if cache.get(key) is None:
                fresh = cache.new_name()
                assert fresh not in named
                named.add(fresh)
                on_server.add(fresh)
                cache.add(key, fresh)
            assert cache.get(key) is not None
        else:
            name_before = cache.get(key)
            if op == "gone" and name_before is not None:
                on_server.discard(name_before)  # the server lost it on its own
            cache.discard(key, deallocate=op == "stale")
            assert cache.get(key) is None
        for retired in cache.take_retired():
            assert retired in on_server
            on_server.remove(retired)
        assert len(cache) <= capacity
    cached = {name for _, key in ops if (name := cache.get(key)) is not None}
    assert cached == on_server


def test_least_recently_used_is_evicted() -> None:
    cache = StatementCache(2)
    a, b, c = ((b"a", ()), (b"b", ()), (b"c", ()))
    for key in (a, b):
        cache.add(key, cache.new_name())
    name_a = cache.get(a)  # a is now the most recently used
    name_b = cache.get(b)
    assert cache.get(a) == name_a
    cache.add(c, cache.new_name())
    assert cache.get(b) is None
    assert cache.take_retired() == [name_b]
    assert cache.get(a) == name_a


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StatementCache(0)
