"""OpenTelemetry tracing of a runner (the ``tracing`` extra): an instrument.

Give ``Tracing()`` to ``open_runner(instruments=[...])``. Each ``ask`` and
``tell`` becomes a span in the caller's task (``CLIENT`` for an ask,
``PRODUCER`` for a tell), its W3C ``traceparent`` and ``tracestate`` travel
in the request's headers (through storage, for a persisted request), and
each delivery to a handler becomes a span in the task that runs it
(``SERVER``), a child of the sender's. A persisted request
redelivered after its owner died carries the same headers, so its new
handling joins the sender's trace, marked ``trio_cluster.redelivered``.
Storage writes for a request are spans of their own under the one current
when they happen.

While a span is open it is the current OpenTelemetry context of its task,
so spans a handler makes (an HTTP call, a query) nest under its handling.
Trio gives each task its own contextvars, so concurrent requests never see
each other's spans. Only ``opentelemetry-api`` is needed; spans go wherever
the tracer provider you configure sends them (the global one by default).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as error:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "trio_cluster.tracing needs the tracing extra: pip install 'trio-cluster[tracing]'"
    ) from error

from .instrument import Instrument, Outcome

if TYPE_CHECKING:
    from .runtime.calls import Call, Handling

__all__ = ["Tracing"]

_PROPAGATOR = TraceContextTextMapPropagator()
_SPAN = "trio_cluster.span"
_TOKEN = "trio_cluster.context_token"
_NOT_FAILED = frozenset({"success", "error", "cancelled"})
"""A declared error is an answer the caller expects, and a cancelled caller chose to
stop waiting: neither is a failure of the call."""


class Tracing(Instrument):
    """Spans for calls, handling and storage writes, linked across runners."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("trio_cluster", tracer_provider=tracer_provider)

    # -- the caller's side ------------------------------------------------------------

    def request_sent(self, call: Call) -> None:
        kind = trace.SpanKind.PRODUCER if call.kind == "tell" else trace.SpanKind.CLIENT
        span = self._tracer.start_span(
            f"{call.kind} {call.entity_type}.{call.rpc}",
            kind=kind,
            attributes={
                "trio_cluster.entity_type": call.entity_type,
                "trio_cluster.entity_id": call.entity_id,
                "trio_cluster.rpc": call.rpc,
                "trio_cluster.shard": str(call.shard),
                "trio_cluster.persisted": call.persisted,
                "trio_cluster.request_id": call.request_id,
                "trio_cluster.runner": call.runner,
            },
        )
        current = trace.set_span_in_context(span)
        _PROPAGATOR.inject(call.headers, context=current)
        call.notes[_SPAN] = span
        call.notes[_TOKEN] = otel_context.attach(current)

    def request_finished(self, call: Call, outcome: Outcome) -> None:
        _end(call.notes, outcome)

    # -- the handler's side -----------------------------------------------------------

    def handling_started(self, handling: Handling) -> None:
        parent = _PROPAGATOR.extract(handling.headers)
        address = handling.address
        span = self._tracer.start_span(
            f"handle {address.entity_type}.{handling.rpc}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "trio_cluster.entity_type": address.entity_type,
                "trio_cluster.entity_id": address.entity_id,
                "trio_cluster.rpc": handling.rpc,
                "trio_cluster.shard": str(address.shard),
                "trio_cluster.persisted": handling.persisted,
                "trio_cluster.request_id": handling.request_id,
                "trio_cluster.redelivered": handling.redelivered,
                "trio_cluster.runner": handling.runner,
            },
        )
        handling.notes[_SPAN] = span
        handling.notes[_TOKEN] = otel_context.attach(trace.set_span_in_context(span))

    def handling_finished(self, handling: Handling, outcome: Outcome) -> None:
        _end(handling.notes, outcome)

    def defect(self, handling: Handling, error: Exception) -> None:
        span = handling.notes.get(_SPAN)
        if isinstance(span, trace.Span):
            span.record_exception(error, attributes={"trio_cluster.defect": True})

    # -- storage ----------------------------------------------------------------------

    def storage_written(self, operation: str, seconds: float, outcome: Outcome) -> None:
        end = time.time_ns()
        span = self._tracer.start_span(
            f"store {operation}",
            kind=trace.SpanKind.INTERNAL,
            start_time=end - int(seconds * 1e9),
            attributes={"trio_cluster.operation": operation},
        )
        _set_status(span, outcome)
        span.end(end_time=end)


def _end(notes: dict[object, object], outcome: Outcome) -> None:
    span, token = notes.pop(_SPAN, None), notes.pop(_TOKEN, None)
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]
    if isinstance(span, trace.Span):
        _set_status(span, outcome)
        span.end()


def _set_status(span: trace.Span, outcome: Outcome) -> None:
    span.set_attribute("trio_cluster.outcome", outcome)
    if outcome not in _NOT_FAILED:
        span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
