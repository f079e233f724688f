"""Tracing: spans for calls, handling and storage writes, one trace across runners."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trio_cluster import EntityContext, RpcClientError
from trio_cluster.testing import open_test_cluster, open_test_runner
from trio_cluster.tracing import Tracing

from .entities import Add, Boom, Counter, CounterHandler, Negative, Probe, add, add_persisted, boom
from .entities import counter as counter_impl


class Spans:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def instrument(self) -> Tracing:
        return Tracing(tracer_provider=self.provider)

    @property
    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.finished if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.named(name)
        return span


@pytest.fixture
def spans() -> Iterator[Spans]:
    yield Spans()


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


async def test_a_local_ask_is_one_trace_of_two_spans(spans: Spans) -> None:
    impl, _ = counter_impl()
    async with open_test_runner(impl, instruments=[spans.instrument()]) as (runner, _):
        await runner.ask(add, "a", Add(1))
    ask, handle = spans.one("ask Counter.add"), spans.one("handle Counter.add")
    assert ask.kind is trace.SpanKind.CLIENT and handle.kind is trace.SpanKind.SERVER
    assert ids(handle)[0] == ids(ask)[0]
    assert parent_of(handle) == ids(ask)[1]
    assert handle.attributes is not None
    assert handle.attributes["trio_cluster.entity_id"] == "a"
    assert handle.attributes["trio_cluster.runner"] == runner.address
    assert handle.attributes["trio_cluster.redelivered"] is False


async def test_a_persisted_ask_has_its_storage_writes_in_the_trace(spans: Spans) -> None:
    impl, _ = counter_impl()
    async with open_test_runner(impl, instruments=[spans.instrument()]) as (runner, _):
        await runner.ask(add_persisted, "a", Add(1))
    ask = spans.one("ask Counter.add_persisted")
    handle = spans.one("handle Counter.add_persisted")
    assert parent_of(spans.one("store request")) == ids(ask)[1]
    assert parent_of(handle) == ids(ask)[1]
    assert parent_of(spans.one("store reply")) == ids(handle)[1]
    assert {ids(span)[0] for span in spans.finished} == {ids(ask)[0]}


async def test_one_trace_across_runners_over_the_network(spans: Spans) -> None:
    impl, _ = counter_impl()
    async with open_test_cluster(impl, runners=2, instruments=[spans.instrument()]) as cluster:
        owner = cluster.owner_of(Counter, "x")
        caller = next(r for r in cluster.runners if r is not owner)
        await caller.ask(add, "x", Add(1))
    ask, handle = spans.one("ask Counter.add"), spans.one("handle Counter.add")
    assert parent_of(handle) == ids(ask)[1]
    assert ask.attributes is not None and handle.attributes is not None
    assert ask.attributes["trio_cluster.runner"] == caller.address
    assert handle.attributes["trio_cluster.runner"] == owner.address


class Nesting(CounterHandler):
    """Opens a span of its own inside the handler, as a traced HTTP client would."""

    probe = Probe()
    provider: TracerProvider

    def __init__(self, ctx: EntityContext) -> None:
        super().__init__(ctx)

    @add.handler
    async def add(self, p: Add) -> int:
        with trace.get_tracer("app", tracer_provider=self.provider).start_as_current_span("db"):
            await trio.lowlevel.checkpoint()
        return p.amount


async def test_spans_made_by_handlers_nest_under_their_handling_even_when_concurrent(
    spans: Spans,
) -> None:
    handler = type("NestingHere", (Nesting,), {"provider": spans.provider})
    tracing = spans.instrument()
    async with (
        open_test_runner(Counter.implement(handler), instruments=[tracing]) as (runner, _),
        trio.open_nursery() as nursery,
    ):
        for n in range(5):
            nursery.start_soon(runner.ask, add, f"e{n}", Add(n))
    asks = {ids(span)[0]: span for span in spans.named("ask Counter.add")}
    handles = {ids(span)[0]: span for span in spans.named("handle Counter.add")}
    dbs = {ids(span)[0]: span for span in spans.named("db")}
    assert len(asks) == len(handles) == len(dbs) == 5  # five traces, one per ask
    for trace_id, ask in asks.items():
        assert parent_of(handles[trace_id]) == ids(ask)[1]
        assert parent_of(dbs[trace_id]) == ids(handles[trace_id])[1]


async def test_failures_are_marked_but_declared_errors_are_answers(spans: Spans) -> None:
    impl, _ = counter_impl()
    async with open_test_runner(impl, instruments=[spans.instrument()]) as (runner, _):
        with pytest.raises(Negative):
            await runner.ask(add, "a", Add(-1))
        with pytest.raises(RpcClientError):
            await runner.ask(boom, "a", Boom(failures=100))
    assert spans.one("ask Counter.add").status.status_code is trace.StatusCode.UNSET
    failed = spans.one("ask Counter.boom")
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["trio_cluster.outcome"] == "RpcClientError"
    handled = spans.one("handle Counter.boom")
    assert [event.name for event in handled.events] == ["exception"] * 3
