"""Crash recovery across real runner processes on the PostgreSQL storage.

Acceptance: a persisted message acknowledged before its runner is killed
with SIGKILL is processed exactly once after restart, or answered from
storage if it was already done; deduplication holds across restarts.

The runners are ``tests.postgres.ledger_app`` processes. Nothing here
sleeps to synchronise: a process is waited for by its ``ready`` line or
its exit, a handler by the NOTIFY its log row sends, and the one
cross-process condition with no event (a killed runner's server backend
going away) by polling the server. Every wait is bounded.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from trio_cluster import open_runner
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.storage import open_postgres_storage

from .ledger_app import (
    COMPLETED,
    CONFIG,
    ENTERED,
    Post,
    create_log,
    log_channel,
    log_table,
    post,
)

ROOT = Path(__file__).resolve().parents[2]
START_S = 15.0
"""Bound on a runner process getting ready (an interpreter start and a few queries)."""
WAIT_S = 15.0
"""Bound on any other cross-process wait."""
ENTITY = "acct-1"


@attrs.define
class App:
    process: trio.Process
    machine_id: int


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    """The next line of ``stream`` (``buffer`` keeps what was read past it)."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(f"stream ended before a full line: {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


@asynccontextmanager
async def ledger_app(dsn: str, prefix: str, mode: str) -> AsyncIterator[App]:
    """A ledger_app process, once it says it is ready; killed on the way out if still alive."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.postgres.ledger_app", dsn, prefix, mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(START_S):
            line = await read_line(process.stdout, bytearray())
        word, _, machine_id = line.partition(" ")
        assert word == "ready", line
        yield App(process, int(machine_id))
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


async def stop_gracefully(app: App) -> None:
    app.process.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT_S):
        assert await app.process.wait() == 0


async def next_event(listener: Connection) -> tuple[str, str, int]:
    """The next ``(phase, key, runner_pid)`` a ledger handler announced."""
    notification = await listener.wait_notification()
    phase, key, pid = notification.payload.split(":")
    return phase, key, int(pid)


async def wait_for_event(listener: Connection, expected: tuple[str, str, int]) -> None:
    with trio.fail_after(WAIT_S):
        while (event := await next_event(listener)) != expected:
            print("ledger event:", event)


async def log_rows(conn: Connection, prefix: str) -> list[tuple[str, int, str, int | None]]:
    """Every log row, oldest first: ``(key, runner_pid, phase, balance)``."""
    rows = await conn.fetch(
        f"SELECT key, runner_pid, phase, balance FROM {log_table(prefix)} ORDER BY id"
    )
    return [
        (key, int(pid), phase, None if balance is None else int(balance))
        for key, pid, phase, balance in rows
    ]


async def wait_until_backend_gone(conn: Connection, prefix: str, machine_id: int) -> None:
    """Until the killed runner's lock connection has left the server, freeing its leases.

    ``pg_terminate_backend(pid, timeout)`` waits, server-side, until that
    backend has exited (it is already ending, its client dead, so the
    signal changes nothing): an event to wait on, where a query of
    ``pg_stat_activity`` would have to poll.
    """
    lock_pid = await conn.fetchval(
        f"SELECT lock_pid FROM {prefix}runners WHERE machine_id = $1", [machine_id]
    )
    assert lock_pid is not None
    with trio.fail_after(WAIT_S):
        await conn.execute("SELECT pg_terminate_backend($1, $2)", [lock_pid, int(WAIT_S * 1000)])
    assert not await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", [lock_pid]
    )


async def test_acknowledged_request_survives_sigkill_and_runs_once(pg_dsn: str) -> None:
    prefix = f"crash_{uuid.uuid4().hex[:8]}_"
    async with (
        open_connection(pg_dsn) as conn,
        open_connection(pg_dsn) as listener,
        open_postgres_storage(pg_dsn, prefix=prefix, pool_size=4) as storage,
    ):
        await create_log(conn, prefix)
        await listener.listen(log_channel(prefix))
        # A client-only runner: it owns no shard, so every request below
        # reaches a runner process through the database.
        async with open_runner(storage=storage, config=CONFIG) as client:
            # 1. A serving runner completes q1; a graceful stop hands its shards back.
            async with ledger_app(pg_dsn, prefix, "serve") as first:
                with trio.fail_after(WAIT_S):
                    assert await client.ask(post, ENTITY, Post("q1", 5)) == 5
                await stop_gracefully(first)
            first_pid = first.process.pid

            # 2. A holding runner takes h1: tell returns once h1 is stored,
            # the handler enters and blocks, and the runner is killed mid-request.
            async with ledger_app(pg_dsn, prefix, "hold") as crashing:
                crashed_pid = crashing.process.pid
                await client.tell(post, ENTITY, Post("h1", 7))
                await wait_for_event(listener, (ENTERED, "h1", crashed_pid))
                crashing.process.kill()
                with trio.fail_after(WAIT_S):
                    assert await crashing.process.wait() == -signal.SIGKILL

            async with trio.open_nursery() as nursery:
                # A caller asking for h1 while no runner is alive waits for
                # the original's reply, which reaches it by NOTIFY.
                waiting_ask: list[int] = []

                async def ask_h1() -> None:
                    waiting_ask.append(
                        await client.ask(post, ENTITY, Post("h1", 7), timeout=WAIT_S)
                    )

                nursery.start_soon(ask_h1)
                with trio.fail_after(WAIT_S):
                    # In-process, but with no event to wait on (ASYNC110).
                    while not client.snapshot().waiting_callers:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                await wait_until_backend_gone(conn, prefix, crashing.machine_id)

                # 3. A fresh runner finds h1 unprocessed and runs it to completion.
                started = trio.current_time()
                async with ledger_app(pg_dsn, prefix, "serve") as recovering:
                    ready = trio.current_time() - started
                    recovered_pid = recovering.process.pid
                    await wait_for_event(listener, (COMPLETED, "h1", recovered_pid))
                    took = trio.current_time() - started
                    print(
                        f"recovering runner: ready after {ready:.3f} s, h1 done after {took:.3f} s"
                    )

                    with trio.fail_after(WAIT_S):
                        rows = await log_rows(conn, prefix)
                        assert rows == [
                            ("q1", first_pid, ENTERED, None),
                            ("q1", first_pid, COMPLETED, 5),
                            ("h1", crashed_pid, ENTERED, None),
                            ("h1", recovered_pid, ENTERED, None),
                            ("h1", recovered_pid, COMPLETED, 12),
                        ]

                        # Duplicates, asked and told, are answered from storage.
                        assert await client.ask(post, ENTITY, Post("q1", 5)) == 5
                        assert await client.ask(post, ENTITY, Post("h1", 7)) == 12
                        await client.tell(post, ENTITY, Post("h1", 7))
                        await client.tell(post, ENTITY, Post("q1", 5))
                        # Deduplication ignores the payload: the key decides.
                        assert await client.ask(post, ENTITY, Post("q1", 500)) == 5
                        # A new key after all this still runs, once, on the ledger so far.
                        assert await client.ask(post, ENTITY, Post("n1", 1)) == 13
                        assert await log_rows(conn, prefix) == [
                            *rows,
                            ("n1", recovered_pid, ENTERED, None),
                            ("n1", recovered_pid, COMPLETED, 13),
                        ]
                    await stop_gracefully(recovering)
            # The caller that waited across the crash got B's reply.
            assert waiting_ask == [12]
            assert client.snapshot().waiting_callers == 0
        unprocessed = await conn.fetchval(
            f"SELECT count(*) FROM {prefix}messages WHERE NOT processed"
        )
        assert unprocessed == 0
