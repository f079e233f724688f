"""Backoff schedules: bounded in count, size and total, reproducible from a seed."""

import random
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core.retry import RetryPolicy

policies = st.builds(
    RetryPolicy,
    base_delay=st.floats(min_value=0, max_value=10),
    factor=st.floats(min_value=1, max_value=10),
    max_delay=st.floats(min_value=0, max_value=100),
    max_attempts=st.integers(min_value=1, max_value=30),
    max_elapsed=st.floats(min_value=0, max_value=1000),
    jitter=st.floats(min_value=0, max_value=1),
)
seeds = st.integers(min_value=0, max_value=2**32)


def schedule(policy: RetryPolicy, seed: int) -> list[float]:
    return list(policy.delays(random.Random(seed)))


def nominal(policy: RetryPolicy) -> list[float]:
    return list(attrs.evolve(policy, jitter=0.0).delays())


@given(policies, seeds)
def test_schedule_is_bounded(policy: RetryPolicy, seed: int) -> None:
    delays = schedule(policy, seed)
    assert len(delays) <= policy.max_attempts - 1
    assert all(0 <= delay <= policy.max_delay for delay in delays)
    assert sum(delays) <= policy.max_elapsed


@given(policies, seeds)
def test_without_jitter_delays_grow_geometrically_up_to_the_cap(
    policy: RetryPolicy, seed: int
) -> None:
    delays = schedule(attrs.evolve(policy, jitter=0.0), seed)
    for k, delay in enumerate(delays):
        assert delay == min(policy.base_delay * policy.factor**k, policy.max_delay)


@given(policies)
def test_stops_only_when_out_of_attempts_or_budget(policy: RetryPolicy) -> None:
    delays = nominal(policy)
    if len(delays) < policy.max_attempts - 1:
        k = len(delays)
        upcoming = min(policy.base_delay * policy.factor**k, policy.max_delay)
        assert sum(delays) + upcoming > policy.max_elapsed


@given(policies, seeds)
def test_jitter_shortens_each_delay_by_at_most_its_fraction(policy: RetryPolicy, seed: int) -> None:
    jittered = schedule(policy, seed)
    full = nominal(policy)
    # The budget is checked before jitter, so luck never changes the number of attempts.
    assert len(jittered) == len(full)
    for delay, upper in zip(jittered, full, strict=True):
        assert upper * (1 - policy.jitter) <= delay <= upper


@given(policies, seeds)
def test_same_seed_same_schedule(policy: RetryPolicy, seed: int) -> None:
    assert schedule(policy, seed) == schedule(policy, seed)


def test_default_schedule() -> None:
    policy = RetryPolicy()
    assert nominal(policy) == [0.05, 0.1, 0.2, 0.4]
    delays = list(policy.delays())  # the shared generator
    assert len(delays) == 4
    assert all(0 <= d <= n for d, n in zip(delays, nominal(policy), strict=True))


def test_full_jitter_actually_varies() -> None:
    policy = RetryPolicy(max_attempts=50, max_elapsed=1000)
    assert schedule(policy, 1) != schedule(policy, 2)


def test_budget_stops_the_schedule_instead_of_shortening_the_last_delay() -> None:
    policy = RetryPolicy(base_delay=1, factor=2, max_delay=100, max_attempts=10, max_elapsed=10)
    # 1 + 2 + 4 = 7; a fourth delay of 8 would overrun 10, so there is none (not a 3).
    assert nominal(policy) == [1, 2, 4]


def test_cap_applies_to_each_delay() -> None:
    policy = RetryPolicy(base_delay=1, factor=3, max_delay=5, max_attempts=6, max_elapsed=100)
    assert nominal(policy) == [1, 3, 5, 5, 5]


def test_single_attempt_never_retries() -> None:
    assert nominal(RetryPolicy(max_attempts=1)) == []


def test_huge_factor_does_not_overflow() -> None:
    policy = RetryPolicy(base_delay=1, factor=1e300, max_delay=5, max_attempts=5, max_elapsed=1e9)
    assert nominal(policy) == [1, 5, 5, 5]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("base_delay", -0.1, ValueError),
        ("base_delay", float("inf"), ValueError),
        ("base_delay", "1", TypeError),
        ("factor", 0.5, ValueError),
        ("factor", float("nan"), ValueError),
        ("max_delay", -1, ValueError),
        ("max_attempts", 0, ValueError),
        ("max_attempts", 2.0, TypeError),
        ("max_attempts", True, TypeError),
        ("max_elapsed", -1.0, ValueError),
        ("max_elapsed", 10**400, ValueError),
        ("jitter", -0.1, ValueError),
        ("jitter", 1.5, ValueError),
    ],
)
def test_invalid_fields_are_named(field: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"^{field}: "):
        RetryPolicy(**{field: value})


def test_integers_are_fine_for_float_fields() -> None:
    assert RetryPolicy(base_delay=1, max_delay=2, max_elapsed=3, jitter=0).base_delay == 1
