"""The pure bounds and checks at the edges: envelopes, scheduled requests, peer identity."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import MailboxFull
from trio_cluster.core.envelope import (
    MAX_CALL_CHAIN,
    MAX_ENTITY_ID_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    Envelope,
    envelope_problem,
    text_problem,
)
from trio_cluster.core.hashing import shard_index
from trio_cluster.runtime.delivery import Delivery
from trio_cluster.runtime.scheduled import Scheduled
from trio_cluster.transport.identity import host_of, identity_problem

SHARDS = 16


def envelope(
    request_id: int = 1, entity_id: str = "a", *, persisted: bool = False, **changes: object
) -> Envelope:
    base = Envelope(
        request_id=request_id,
        entity_type="Counter",
        entity_id=entity_id,
        shard_group="default",
        shard_index=shard_index(entity_id, SHARDS),
        rpc="add",
        payload=b"",
        persisted=persisted,
    )
    return msgspec.structs.replace(base, **changes)


class Sink:
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def resolve(self, reply: bytes) -> None:
        self.replies.append(reply)


# -- envelopes ----------------------------------------------------------------------------


def test_a_well_formed_envelope_passes() -> None:
    assert envelope_problem(envelope(), SHARDS) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"shard_index": -1}, "not in 0..15"),
        ({"shard_index": SHARDS}, "not in 0..15"),
        ({"entity_id": "a\x00"}, "NUL"),
        ({"entity_id": "\udcff"}, "lone surrogate"),
        ({"entity_id": "é" * (MAX_ENTITY_ID_BYTES // 2 + 1)}, "UTF-8 bytes"),
        ({"headers": {f"h{n}": "" for n in range(MAX_HEADERS + 1)}}, "headers"),
        ({"headers": {"h": "x" * MAX_HEADER_BYTES}}, "bytes, over"),
        ({"primary_key": "k\x00"}, "primary key contains a NUL"),
        ({"call_chain": ("x",) * (MAX_CALL_CHAIN + 1)}, "call chain"),
    ],
)
def test_what_a_peer_may_not_send(changes: dict[str, object], reason: str) -> None:
    problem = envelope_problem(msgspec.structs.replace(envelope(), **changes), SHARDS)
    assert problem is not None and reason in problem


@given(st.text(max_size=50))
def test_text_is_refused_exactly_when_no_storage_could_hold_it(text: str) -> None:
    problem = text_problem("entity id", text, MAX_ENTITY_ID_BYTES)
    try:
        encodable = "\x00" not in text and bool(text.encode("utf-8") or True)
    except UnicodeEncodeError:
        encodable = False
    assert (problem is None) == encodable


def test_only_strings_name_entities() -> None:
    assert text_problem("entity id", 7, 10) == "entity id must be a str (got int)"


# -- scheduled requests -------------------------------------------------------------------


def test_scheduled_requests_come_out_in_due_order_then_arrival() -> None:
    scheduled = Scheduled(capacity=10)
    first, second, third = (Delivery(envelope(n), Sink()) for n in (1, 2, 3))
    scheduled.add(second, 200)
    scheduled.add(first, 100)
    scheduled.add(third, 200)
    assert scheduled.next_due() == 100
    assert scheduled.pop_due(150) == ([first], False)
    assert scheduled.pop_due(200) == ([second, third], False)
    assert scheduled.next_due() is None


def test_a_volatile_request_past_the_bound_is_refused() -> None:
    scheduled = Scheduled(capacity=2)
    for n in range(2):
        scheduled.add(Delivery(envelope(n), Sink()), 100)
    with pytest.raises(MailboxFull, match="2 requests waiting"):
        scheduled.add(Delivery(envelope(9), Sink()), 100)
    assert len(scheduled) == 2


def test_a_persisted_request_past_the_bound_is_left_in_storage_and_read_back_when_due() -> None:
    scheduled = Scheduled(capacity=1)
    held = Delivery(envelope(1, persisted=True), Sink())
    scheduled.add(held, 500)
    scheduled.add(Delivery(envelope(2, persisted=True), Sink()), 300)
    scheduled.add(Delivery(envelope(3, persisted=True), Sink()), 400)
    assert len(scheduled) == 1
    assert scheduled.overflow_due == 300
    assert scheduled.next_due() == 300
    # At 300 nothing held is due, but storage must be read for what did not fit.
    assert scheduled.pop_due(300) == ([], True)
    assert scheduled.overflow_due is None
    assert scheduled.pop_due(500) == ([held], False)


def test_a_persisted_request_read_twice_is_held_once() -> None:
    scheduled = Scheduled(capacity=5)
    scheduled.add(Delivery(envelope(1, persisted=True), Sink()), 100)
    scheduled.add(Delivery(envelope(1, persisted=True), Sink()), 100)
    assert len(scheduled) == 1


def test_clearing_gives_back_everything_held() -> None:
    scheduled = Scheduled(capacity=5)
    deliveries = [Delivery(envelope(n), Sink()) for n in range(3)]
    for delivery in deliveries:
        scheduled.add(delivery, 100)
    assert sorted(d.envelope.request_id for d in scheduled.clear()) == [0, 1, 2]
    assert len(scheduled) == 0


# -- peer identity under mutual TLS -------------------------------------------------------

CERT = {"subjectAltName": (("DNS", "runner-1.cluster.local"), ("IP Address", "10.0.0.7"))}


@pytest.mark.parametrize(
    ("address", "proven"),
    [
        ("runner-1.cluster.local:34431", True),
        ("RUNNER-1.cluster.local:1", True),
        ("10.0.0.7:34431", True),
        ("runner-2.cluster.local:34431", False),
        ("10.0.0.8:34431", False),
        ("evil.runner-1.cluster.local:1", False),
    ],
)
def test_a_certificate_proves_the_host_it_names(address: str, proven: bool) -> None:
    assert (identity_problem(CERT, address) is None) is proven


def test_a_wildcard_covers_one_label() -> None:
    cert = {"subjectAltName": (("DNS", "*.cluster.local"),)}
    assert identity_problem(cert, "runner-1.cluster.local:1") is None
    assert identity_problem(cert, "a.b.cluster.local:1") is not None


def test_no_certificate_proves_nothing() -> None:
    problem = identity_problem(None, "a:1")
    assert problem is not None and "no certificate" in problem


def test_host_of_an_address() -> None:
    assert host_of("10.0.0.1:80") == "10.0.0.1"
    assert host_of("[::1]:80") == "::1"
    assert host_of("name.local:80") == "name.local"
