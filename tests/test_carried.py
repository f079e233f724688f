"""The fence of carried requests: snapshots' visibility, and when a carried copy is used."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import ShardId
from trio_cluster.core.envelope import Envelope
from trio_cluster.postgres.carried import Carried, CarriedRequests
from trio_cluster.postgres.leases import LeaseTiming
from trio_cluster.postgres.snapshots import Snapshot, parse, union, visible


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    xmin = draw(st.integers(3, 60))
    xmax = draw(st.integers(xmin, 70))
    xip = draw(st.frozensets(st.integers(xmin, xmax - 1))) if xmax > xmin else frozenset()
    return Snapshot(xmin, xmax, xip)


def text(snapshot: Snapshot) -> str:
    return f"{snapshot.xmin}:{snapshot.xmax}:{','.join(map(str, sorted(snapshot.xip)))}"


@given(snapshots())
def test_parse_reads_what_postgres_writes(snapshot: Snapshot) -> None:
    assert parse(text(snapshot)) == snapshot


@pytest.mark.parametrize("bad", ["", "1:2", "5:3:", "3:9:10", "3:9:2", "a:b:", "3:9:4,x"])
def test_parse_refuses_what_is_not_a_snapshot(bad: str) -> None:
    with pytest.raises(ValueError):
        parse(bad)


def test_visible_follows_xmin_xmax_and_xip() -> None:
    snapshot = parse("10:20:12,15")
    assert [x for x in range(5, 25) if visible(snapshot, x)] == [
        *range(5, 12),
        13,
        14,
        *range(16, 20),
    ]


@given(snapshots(), snapshots(), st.integers(0, 80))
def test_union_sees_what_either_sees(a: Snapshot, b: Snapshot, xid: int) -> None:
    assert visible(union(a, b), xid) == (visible(a, xid) or visible(b, xid))
    assert union(a, b) == union(b, a)
    assert parse(text(union(a, b))) == union(a, b)  # still a snapshot PostgreSQL could take


SHARD = ShardId("default", 1)


def envelope(request_id: int, shard: ShardId = SHARD) -> Envelope:
    return Envelope(request_id, "Counter", "e", shard.group, shard.index, "add", b"", True)


def test_a_copy_no_read_saw_is_used_once() -> None:
    carried = CarriedRequests()
    carried.saw(SHARD, parse("100:100:"))
    carried.keep(Carried(100, envelope(1)))
    assert carried.take(SHARD, [1], owned=True) == ([envelope(1)], [])
    assert carried.take(SHARD, [1], owned=True) == ([], [1])
    assert carried.used == 1


def test_a_copy_a_read_may_have_returned_is_read_again() -> None:
    carried = CarriedRequests()
    carried.saw(SHARD, parse("90:95:"))
    carried.saw(SHARD, parse("98:101:99"))  # the union sees 100, not 99
    for xid, request_id in [(100, 1), (99, 2), (101, 3), (94, 4)]:
        carried.keep(Carried(xid, envelope(request_id)))
    assert carried.take(SHARD, [1, 2, 3, 4], owned=True) == ([envelope(2), envelope(3)], [1, 4])


def test_without_a_read_of_the_shard_or_for_another_shard_copies_are_read() -> None:
    carried = CarriedRequests()
    carried.keep(Carried(100, envelope(1)))
    assert carried.take(SHARD, [1], owned=True) == ([], [1])
    carried.saw(SHARD, parse("50:50:"))
    carried.keep(Carried(100, envelope(2, ShardId("default", 2))))
    assert carried.take(SHARD, [2], owned=True) == ([], [2])


def test_an_unreadable_snapshot_forgets_what_the_shard_saw() -> None:
    carried = CarriedRequests()
    carried.saw(SHARD, parse("50:50:"))
    carried.saw(SHARD, None)
    carried.keep(Carried(100, envelope(1)))
    assert carried.take(SHARD, [1], owned=True) == ([], [1])


def test_the_oldest_copies_are_evicted_beyond_capacity() -> None:
    carried = CarriedRequests(capacity=2)
    carried.saw(SHARD, parse("50:50:"))
    for request_id in (1, 2, 3):
        carried.keep(Carried(100, envelope(request_id)))
    assert carried.take(SHARD, [1, 2, 3], owned=True) == ([envelope(2), envelope(3)], [1])


def test_a_shard_not_surely_owned_reads_every_copy() -> None:
    carried = CarriedRequests()
    carried.saw(SHARD, parse("50:50:"))
    carried.keep(Carried(100, envelope(1)))
    assert carried.take(SHARD, [1], owned=False) == ([], [1])
    assert carried.take(SHARD, [1], owned=True) == ([], [1])  # dropped all the same


def test_a_lease_is_surely_held_for_the_smaller_of_both_sides_bounds() -> None:
    assert LeaseTiming().held_for_sure == 3.0  # heartbeat 1 s + liveness 2 s; server 5 s
    assert LeaseTiming(idle_session_timeout_ms=1500).held_for_sure == 1.5
    assert LeaseTiming(user_timeout_ms=2500, idle_session_timeout_ms=0).held_for_sure == 2.5
