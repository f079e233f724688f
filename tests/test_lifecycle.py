"""The lifecycle tables of shards, entities and links: pure data, checked exhaustively."""

from __future__ import annotations

import enum
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.core.lifecycle import (
    ENTITY_LIFECYCLE,
    LINK_LIFECYCLE,
    SHARD_LIFECYCLE,
    SINGLETON_LIFECYCLE,
    EntityEvent,
    EntityState,
    Lifecycle,
    LifecycleError,
    LinkEvent,
    LinkState,
    ShardEvent,
    ShardState,
    SingletonEvent,
    SingletonState,
    Table,
)

AnyTable = Table[enum.Enum, enum.Enum]
TABLES: list[tuple[str, AnyTable, type[enum.Enum], type[enum.Enum], enum.Enum]] = [
    ("shard", SHARD_LIFECYCLE, ShardState, ShardEvent, ShardState.STARTING),  # type: ignore[list-item]
    ("entity", ENTITY_LIFECYCLE, EntityState, EntityEvent, EntityState.ACTIVE),  # type: ignore[list-item]
    ("link", LINK_LIFECYCLE, LinkState, LinkEvent, LinkState.HANDSHAKING),  # type: ignore[list-item]
    ("singleton", SINGLETON_LIFECYCLE, SingletonState, SingletonEvent, SingletonState.STARTING),  # type: ignore[list-item]
]
TERMINAL: dict[str, set[enum.Enum]] = {
    "shard": {ShardState.RELEASED, ShardState.LOST, ShardState.FAILED},
    "entity": {EntityState.STOPPED},
    "link": {LinkState.CLOSED},
    "singleton": {SingletonState.RELEASED, SingletonState.LOST},
}


class Case(NamedTuple):
    name: str
    table: AnyTable
    states: type[enum.Enum]
    events: type[enum.Enum]
    initial: enum.Enum


@pytest.fixture(params=TABLES, ids=[entry[0] for entry in TABLES])
def case(request: pytest.FixtureRequest) -> Case:
    return Case(*request.param)


def test_every_state_is_in_the_table_and_leads_only_to_states(case: Case) -> None:
    assert set(case.table) == set(case.states)
    for targets in case.table.values():
        assert set(targets) <= set(case.events)
        assert set(targets.values()) <= set(case.states)


def test_nothing_leaves_a_terminal_state(case: Case) -> None:
    for state in TERMINAL[case.name]:
        assert set(case.table[state].values()) <= {state}


def test_every_state_is_reachable(case: Case) -> None:
    seen = {case.initial}
    frontier = [case.initial]
    while frontier:
        for target in case.table[frontier.pop()].values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(case.states)


@given(st.data())
def test_a_lifecycle_moves_only_as_its_table_says(data: st.DataObject) -> None:
    name, table, _, events, initial = data.draw(st.sampled_from(TABLES))
    life = Lifecycle(name, table, initial)
    for event in data.draw(st.lists(st.sampled_from(list(events)), max_size=12)):
        before = life.state
        if event in table[before]:
            assert life.allows(event)
            assert life.fire(event) is table[before][event]
        else:
            assert not life.allows(event)
            with pytest.raises(LifecycleError, match=event.value):
                life.fire(event)
            assert life.state is before


def test_a_lease_lost_while_draining_ends_lost_not_released() -> None:
    life = Lifecycle("shard", SHARD_LIFECYCLE, ShardState.STARTING)
    life.fire(ShardEvent.STARTED)
    life.fire(ShardEvent.DRAIN)
    life.fire(ShardEvent.LOSE)
    assert life.state is ShardState.LOST
    assert life.fire(ShardEvent.DRAIN) is ShardState.LOST


def test_a_singleton_is_released_only_after_stopping() -> None:
    """The lease goes back only from STOPPING: once the function has exited."""
    for state, events in SINGLETON_LIFECYCLE.items():
        if SingletonEvent.STOPPED in events:
            assert state is SingletonState.STOPPING
