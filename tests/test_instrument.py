"""The instrumentation hook: which events a runner reports, in which order, and that an
instrument can neither fail a message nor slow the runner when it is absent."""

from __future__ import annotations

import logging

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import (
    EntityContext,
    EntityOptions,
    Instrument,
    MailboxFull,
    RpcClientError,
    SendTimeout,
    ShardId,
)
from trio_cluster.core import reply as replies
from trio_cluster.errors import CLUSTER_ERRORS
from trio_cluster.instrument import EVENTS
from trio_cluster.runtime.calls import Call, Handling
from trio_cluster.runtime.context import EntityAddress
from trio_cluster.runtime.hooks import Hooks
from trio_cluster.storage.memory import MemoryStorage
from trio_cluster.testing import open_test_cluster, open_test_runner

from .entities import (
    Add,
    Block,
    Boom,
    Counter,
    CounterHandler,
    Get,
    Negative,
    Probe,
    add,
    add_persisted,
    block,
    boom,
    counter,
    get,
    slow_add,
)
from .test_runtime import shard_of


class Recorder(Instrument):
    """Every event it hears, as a tuple of plain values."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.changed = trio.Event()

    def _add(self, *event: object) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, *event: object) -> None:
        while event not in self.events:
            await self.changed.wait()

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [event for event in self.events if event[0] == name]

    def request_sent(self, call: Call) -> None:
        self._add("sent", call.kind, call.rpc, call.entity_id)

    def request_finished(self, call: Call, outcome: str) -> None:
        self._add("finished", call.rpc, outcome)

    def handling_started(self, handling: Handling) -> None:
        self._add("started", handling.rpc, handling.redelivered)

    def handling_finished(self, handling: Handling, outcome: str) -> None:
        self._add("handled", handling.rpc, outcome)

    def defect(self, handling: Handling, error: Exception) -> None:
        self._add("defect", handling.rpc, type(error).__name__)

    def request_refused(self, entity_type: str, rpc: str, reason: str) -> None:
        self._add("refused", rpc, reason)

    def storage_written(self, operation: str, seconds: float, outcome: str) -> None:
        assert seconds >= 0
        self._add("stored", operation, outcome)

    def entity_activated(self, address: EntityAddress) -> None:
        self._add("activated", address.entity_id)

    def entity_passivated(self, address: EntityAddress) -> None:
        self._add("passivated", address.entity_id)

    def shard_acquired(self, shard: ShardId, epoch: int) -> None:
        self._add("acquired", shard)

    def shard_stopped(self, shard: ShardId, how: str) -> None:
        self._add("stopped", shard, how)

    def runner_joined(self, address: str) -> None:
        self._add("joined", address)

    def runner_left(self, address: str) -> None:
        self._add("left", address)


def traffic(events: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """The request events alone, without lifecycles."""
    kept = {"sent", "finished", "started", "handled", "defect", "refused", "stored"}
    return [event for event in events if event[0] in kept]


# -- the events of a request ---------------------------------------------------------


async def test_a_local_ask_is_bracketed_on_both_sides() -> None:
    impl, _ = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, _):
        assert await runner.ask(add, "a", Add(2)) == 2
    assert traffic(recorder.events) == [
        ("sent", "ask", "add", "a"),
        ("started", "add", False),
        ("handled", "add", "success"),
        ("finished", "add", "success"),
    ]
    assert ("activated", "a") in recorder.events


async def test_a_persisted_ask_reports_its_request_and_reply_writes() -> None:
    impl, _ = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, _):
        assert await runner.ask(add_persisted, "a", Add(3)) == 3
    # (Whether it counts as redelivered depends on whether the shard's first scan,
    # still running as the runner starts, read it: the flag is tested below.)
    assert [
        event[:2] if event[0] == "started" else event
        for event in recorder.events
        if event in traffic(recorder.events)
    ] == [
        ("sent", "ask", "add_persisted", "a"),
        ("stored", "request", "success"),
        ("started", "add_persisted"),
        ("stored", "reply", "success"),
        ("handled", "add_persisted", "success"),
        ("finished", "add_persisted", "success"),
    ]


async def test_outcomes_name_declared_errors_and_cluster_errors() -> None:
    impl, probe = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, _):
        with pytest.raises(Negative):
            await runner.ask(add, "a", Add(-1))
        with pytest.raises(RpcClientError):
            await runner.ask(boom, "a", Boom(failures=100))
        assert runner.snapshot().errors == {"RpcClientError": 1}
    assert ("handled", "add", "error") in recorder.events
    assert ("finished", "add", "error") in recorder.events
    assert recorder.named("defect") == [("defect", "boom", "RuntimeError")] * 3
    assert ("handled", "boom", "RpcClientError") in recorder.events
    assert ("finished", "boom", "RpcClientError") in recorder.events
    assert probe.runs["boom"] == 3


async def test_a_timed_out_ask_finishes_with_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, probe = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, _):
        with pytest.raises(SendTimeout):
            await runner.ask(block, "a", Block(), timeout=1.0, interrupt=False)
        assert runner.snapshot().waiting_callers == 0
        assert runner.snapshot().errors == {"SendTimeout": 1}
        probe.release.set()
        await recorder.wait_for("handled", "block", "success")
    assert ("finished", "block", "SendTimeout") in recorder.events


async def test_a_cancelled_caller_is_not_counted_as_an_error() -> None:
    impl, probe = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.ask, block, "a", Block())
            await probe.started.wait()
            nursery.cancel_scope.cancel()
        probe.release.set()
        assert runner.snapshot().errors == {}
        assert runner.snapshot().waiting_callers == 0
    assert ("finished", "block", "cancelled") in recorder.events


async def test_a_full_mailbox_is_a_refusal() -> None:
    impl, probe = counter(EntityOptions(mailbox_capacity=1))
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, _):
        await runner.tell(block, "a", Block())
        await probe.started.wait()
        await runner.tell(add, "a", Add(1))
        with pytest.raises(MailboxFull):
            await runner.tell(add, "a", Add(2))
        probe.release.set()
        await recorder.wait_for("handled", "add", "success")
    assert recorder.named("refused") == [("refused", "add", "MailboxFull")]
    assert ("finished", "add", "MailboxFull") in recorder.events


# -- headers ---------------------------------------------------------------------------


class Stamp(Instrument):
    """Adds a header to every request, as a tracing instrument adds ``traceparent``."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def request_sent(self, call: Call) -> None:
        call.headers["x-stamp"] = f"{call.rpc}:{call.entity_id}"

    def handling_started(self, handling: Handling) -> None:
        self.seen.append(handling.headers.get("x-stamp"))


class HeaderEcho(CounterHandler):
    """Answers ``get`` with the length of the header the caller's instrument set."""

    probe = Probe()

    def __init__(self, ctx: EntityContext) -> None:
        super().__init__(ctx)

    @add_persisted.handler
    async def add_persisted(self, p: Add) -> int:
        return len(self.ctx.request.headers.get("x-stamp", ""))


async def test_headers_added_when_sent_reach_the_handler_volatile_and_persisted() -> None:
    stamp = Stamp()
    async with open_test_runner(Counter.implement(HeaderEcho), instruments=[stamp]) as (
        runner,
        _,
    ):
        assert await runner.ask(add_persisted, "abc", Add(1)) == len("add_persisted:abc")
        await runner.ask(get, "abc", Get())
    assert stamp.seen == ["add_persisted:abc", "get:abc"]


async def test_headers_cross_runners_over_the_network() -> None:
    impl, _ = counter()
    stamp = Stamp()
    async with open_test_cluster(impl, runners=2, instruments=[stamp]) as cluster:
        owner = cluster.owner_of(Counter, "x")
        caller = next(r for r in cluster.runners if r is not owner)
        await caller.ask(add, "x", Add(1))
    assert stamp.seen == ["add:x"]


# -- a faulty instrument ---------------------------------------------------------------


class Faulty(Instrument):
    def __init__(self) -> None:
        self.calls = 0

    def request_sent(self, call: Call) -> None:
        self.calls += 1
        raise ValueError("bug in an exporter")

    def handling_finished(self, handling: Handling, outcome: str) -> None:
        self.calls += 1


async def test_an_instrument_that_raises_is_removed_and_the_message_goes_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    impl, _ = counter()
    faulty, recorder = Faulty(), Recorder()
    async with open_test_runner(impl, instruments=[faulty, recorder]) as (runner, _):
        with caplog.at_level(logging.ERROR, logger="trio_cluster.instrument"):
            assert await runner.ask(add, "a", Add(1)) == 1
            assert await runner.ask(add, "a", Add(1)) == 2
        assert runner.instruments == (recorder,)
    assert faulty.calls == 1  # removed from every event at its first failure
    assert len(recorder.named("handled")) == 2
    assert "bug in an exporter" in caplog.text


def test_only_instruments_are_accepted() -> None:
    with pytest.raises(TypeError, match="Instrument instances"):
        Hooks([object()])  # type: ignore[list-item]


def test_events_nobody_listens_to_share_one_no_op() -> None:
    hooks = Hooks([Stamp()])
    idle = [getattr(hooks, event) for event in EVENTS if event not in Stamp.__dict__]
    assert len(idle) == len(EVENTS) - 2
    assert len(set(map(id, idle))) == 1


# -- lifecycles ------------------------------------------------------------------------


async def test_shards_are_reported_acquired_then_lost_or_released() -> None:
    impl, _ = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, storage):
        owned = set(runner.shards)
        assert {event[1] for event in recorder.named("acquired")} == owned
        lost = shard_of("a")
        storage.revoke(lost)
        await recorder.wait_for("stopped", lost, "lost")
        assert runner.snapshot().lease_losses == 1
    released = {event[1] for event in recorder.named("stopped") if event[2] == "released"}
    assert lost not in released
    assert released == owned - {lost} or released == owned  # retaken after the loss, or not


async def test_runners_are_reported_as_they_join_and_leave() -> None:
    impl, _ = counter()
    storage = MemoryStorage()
    recorder = Recorder()
    async with open_test_runner(impl, storage=storage, instruments=[recorder]) as (first, _):
        await recorder.wait_for("joined", first.address)
        async with open_test_runner(impl, storage=storage) as (second, _):
            await recorder.wait_for("joined", second.address)
            assert first.snapshot().live_runners == 2
        await recorder.wait_for("left", second.address)
        assert first.snapshot().live_runners == 1


async def test_a_request_read_back_after_a_lease_loss_is_marked_redelivered() -> None:
    impl, probe = counter()
    recorder = Recorder()
    async with open_test_runner(impl, instruments=[recorder]) as (runner, storage):
        # The shards' first scans are done: the ask is not read back by one of them.
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.ask, slow_add, "a", Add(4))
            await probe.wait_until(lambda: probe.runs["slow_add entered"] == 1)
            storage.revoke(shard_of("a"))
            await probe.wait_until(lambda: probe.runs["slow_add entered"] == 2)
            probe.release.set()
        assert runner.snapshot().redelivered == 1
    assert recorder.named("started") == [
        ("started", "slow_add", False),
        ("started", "slow_add", True),
    ]
    assert ("handled", "slow_add", "cancelled") in recorder.events
    assert recorder.named("finished") == [("finished", "slow_add", "success")]


# -- outcomes agree with the decoder ---------------------------------------------------


def decoded_outcome(reply: bytes) -> str:
    """The outcome a caller sees, by decoding the reply in full."""
    try:
        replies.decode(reply, msgspec.msgpack.Decoder(), {"Negative": Negative})
    except Negative:
        return "error"
    except CLUSTER_ERRORS as error:
        return error.reason
    return "success"


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
some_reply = st.one_of(
    plain.map(replies.success),
    st.lists(plain, max_size=3).map(lambda args: replies.declared_error(Negative(*args))),
    st.builds(
        lambda cls, text: replies.cluster_error(cls(text)),
        st.sampled_from(CLUSTER_ERRORS),
        st.text(),
    ),
    st.binary(max_size=12),
)


@given(some_reply)
def test_the_outcome_read_from_a_reply_is_the_one_its_caller_sees(reply: bytes) -> None:
    assert replies.outcome(reply) == decoded_outcome(reply)


def test_an_instrument_overriding_nothing_is_never_called() -> None:
    hooks = Hooks([Instrument()])
    assert len({id(getattr(hooks, event)) for event in EVENTS}) == 1
