"""One trace from a sender through a cross-process persisted ask, a redelivery included.

The sender (this process) asks ``work`` of an entity owned by runner B, whose
handler holds; B is SIGKILLed mid-request; runner A starts. A takes the shard
over, reads the request back from storage with its ``traceparent``, and
answers. A's handling span must be a child of the sender's ask span, in the
same trace, and marked redelivered. Spans of the runners are read from the
files their processes export to, after A is stopped (so all are written).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trio_cluster import TransportConfig, open_runner
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.tracing import Tracing

from .test_cluster_processes import ROOT, read_line
from .traced_app import CONFIG, Job, work

WAIT_S = 60.0


class Process:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = bytearray()

    async def line(self) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(WAIT_S):
            return await read_line(self.process.stdout, self.buffer)


async def start(dsn: str, prefix: str, spans: Path, *, hold: bool) -> Process:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tests.postgres.traced_app",
            dsn,
            prefix,
            str(spans),
            str(int(hold)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    return Process(process)


def load(spans: Path) -> list[dict[str, Any]]:
    if not spans.exists():
        return []
    return [json.loads(line) for line in spans.read_text().splitlines()]


async def test_one_trace_through_a_persisted_ask_and_its_redelivery(
    pg_dsn: str, tmp_path: Path
) -> None:
    prefix = f"traced_{uuid.uuid4().hex[:8]}_"
    b_spans, a_spans = tmp_path / "b.jsonl", tmp_path / "a.jsonl"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    processes: list[Process] = []
    try:
        b = await start(pg_dsn, prefix, b_spans, hold=True)
        processes.append(b)
        assert (await b.line()).startswith("ready ")
        async with (
            open_postgres_storage(pg_dsn, prefix=prefix, pool_size=2) as storage,
            open_runner(
                storage=storage,
                config=CONFIG,
                transport=TransportConfig(host="127.0.0.1", cluster=prefix),
                instruments=[Tracing(tracer_provider=provider)],
            ) as sender,
            trio.open_nursery() as nursery,
        ):
            answers: list[int] = []

            async def ask() -> None:
                answers.append(await sender.ask(work, "job-entity", Job("one")))

            nursery.start_soon(ask)
            assert await b.line() == "holding"
            b.process.kill()
            await b.process.wait()
            a = await start(pg_dsn, prefix, a_spans, hold=False)
            processes.append(a)
            a_ready = await a.line()
            assert a_ready.startswith("ready ")
        assert answers == [a.process.pid]
        a.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):
            assert await a.process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            for each in processes:
                if each.process.returncode is None:
                    each.process.kill()
                await each.process.wait()

    (ask_span,) = [s for s in exporter.get_finished_spans() if s.name == "ask Traced.work"]
    assert ask_span.context is not None
    trace_id, ask_id = ask_span.context.trace_id, ask_span.context.span_id
    (stored,) = [s for s in exporter.get_finished_spans() if s.name == "store request"]
    assert stored.parent is not None and stored.parent.span_id == ask_id

    handled = [s for s in load(a_spans) if s["name"] == "handle Traced.work"]
    assert len(handled) == 1
    (handle,) = handled
    assert handle["trace_id"] == trace_id
    assert handle["parent_id"] == ask_id
    assert handle["attributes"]["trio_cluster.redelivered"] is True
    assert handle["attributes"]["trio_cluster.runner"] == a_ready.split(" ")[1]
    reply = [s for s in load(a_spans) if s["name"] == "store reply"]
    assert [s["parent_id"] for s in reply] == [handle["span_id"]]
    # B never finished its handling: it was killed in the middle of it.
    assert [s for s in load(b_spans) if s["name"] == "handle Traced.work"] == []
