"""A traced runner process, for the test of one trace across processes and a redelivery.

Run from the repository root::

    python -m tests.postgres.traced_app DSN PREFIX SPANS HOLD

It hosts ``Traced`` on the PostgreSQL storage at ``DSN`` with the tracing
instrument, exporting every finished span as one JSON line to the file
``SPANS``; prints ``ready <address>`` once it serves its shards, and runs
until SIGTERM. With ``HOLD`` = 1 its handler prints ``holding`` and never
returns (so its owner can be killed mid-request); with 0 it answers its pid.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import IO, ClassVar

import msgspec
import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from trio_cluster import (
    Entity,
    EntityContext,
    ShardingConfig,
    TransportConfig,
    open_runner,
    wait_for_termination,
)
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.tracing import Tracing


class Job(msgspec.Struct, frozen=True):
    name: str


Traced = Entity("Traced")
work = Traced.rpc("work", Job, int, persisted=True)
CONFIG = ShardingConfig(shards_per_group=4, send_timeout=60.0, entity_termination_timeout=30.0)


class JsonLines(SpanExporter):
    """Each span as a line of JSON, written as it ends (so a SIGKILL loses nothing ended)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            assert span.context is not None
            self._out.write(
                json.dumps(
                    {
                        "name": span.name,
                        "trace_id": span.context.trace_id,
                        "span_id": span.context.span_id,
                        "parent_id": None if span.parent is None else span.parent.span_id,
                        "attributes": dict(span.attributes or {}),
                    }
                )
                + "\n"
            )
        self._out.flush()
        return SpanExportResult.SUCCESS


class TracedHandler:
    hold: ClassVar[bool]

    def __init__(self, ctx: EntityContext) -> None:
        pass

    @work.handler
    async def work(self, job: Job) -> int:
        if self.hold:
            print("holding", flush=True)
            await trio.sleep_forever()
        return os.getpid()


async def serve(dsn: str, prefix: str, spans: str, hold: bool) -> None:
    provider = TracerProvider()
    with open(spans, "a", encoding="utf-8") as out:  # noqa: ASYNC230 - a test's small file
        provider.add_span_processor(SimpleSpanProcessor(JsonLines(out)))
        handler = type("Configured", (TracedHandler,), {"hold": hold})
        async with (
            open_postgres_storage(dsn, prefix=prefix, pool_size=2) as storage,
            open_runner(
                Traced.implement(handler),
                storage=storage,
                config=CONFIG,
                transport=TransportConfig(host="127.0.0.1", cluster=prefix),
                instruments=[Tracing(tracer_provider=provider)],
            ) as runner,
        ):
            await runner.settled()
            print(f"ready {runner.address}", flush=True)
            await wait_for_termination()


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: python -m tests.postgres.traced_app DSN PREFIX SPANS HOLD")
    dsn, prefix, spans, hold = argv
    trio.run(serve, dsn, prefix, spans, hold == "1")


if __name__ == "__main__":
    main(sys.argv[1:])
