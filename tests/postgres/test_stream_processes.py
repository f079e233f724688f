"""A persisted stream whose owner is SIGKILLed mid-stream, across runner processes.

The owner is a ``tests.postgres.stream_app`` process; the caller is a
client-only runner in the test, so every chunk crosses through the
database. The caller is slow (each chunk costs it a round trip to the
database), so the owner runs a full window ahead and waits. After chunk 100
the owner is killed and a new one started while the caller keeps
iterating. From outside: the caller got every index once, in order; the
handler rows say the new owner's run began at the stored ack and produced
nothing below it; no chunk below it was produced twice.

Nothing sleeps to synchronise: processes by their ``ready`` line or their
exit, the caller by the chunks it reads.
"""

from __future__ import annotations

from ..stream_entities import Job, tape
from .test_cluster_processes import WAIT_S
from .test_interrupt_processes import open_world

CHUNKS = 300
KILL_AFTER = 100


async def test_a_sigkilled_owner_loses_no_chunk_and_repeats_none_acknowledged(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "stream", app="tests.postgres.stream_app") as world:
        first = await world.start()
        conn, prefix, cluster = world.conn, world.prefix, world.cluster
        acked_at_kill = -1
        second = first
        got: list[int] = []
        async with world.client.client.stream(
            tape, "t", Job("tape", CHUNKS), timeout=WAIT_S
        ) as chunks:
            async for tick in chunks:
                got.append(tick.i)
                await conn.fetchval("SELECT 1")  # the slow consumer's work
                if tick.i == KILL_AFTER:
                    acked_at_kill = int(
                        await conn.fetchval(f"SELECT acked FROM {prefix}stream_acks") or 0
                    )
                    await cluster.kill(first)
                    second = await world.start()
        assert got == list(range(CHUNKS))

        rows = await conn.fetch(f"SELECT what, n, pid FROM {prefix}handled ORDER BY seq")
        starts = [(n, pid) for what, n, pid in rows if what == "started"]
        assert starts[0] == (0, first.pid)
        assert len(starts) == 2, starts
        resumed, pid = starts[1]
        assert pid == second.pid
        # Resumed at the stored ack: what the caller acknowledged by then, no less.
        assert resumed >= acked_at_kill >= KILL_AFTER - tape.rpc.window
        assert resumed <= KILL_AFTER + tape.rpc.window
        produced = {
            who: [n for what, n, p in rows if what == "produced" and p == who]
            for who in (first.pid, second.pid)
        }
        assert produced[second.pid] == list(range(resumed, CHUNKS))
        assert sorted(set(produced[first.pid])) == produced[first.pid]
        again = set(produced[first.pid]) & set(produced[second.pid])
        assert all(n >= resumed for n in again), sorted(again)
        assert len(again) <= tape.rpc.window + 1
        stored = await conn.fetch(f"SELECT seq FROM {prefix}stream_chunks ORDER BY seq")
        assert [seq for (seq,) in stored] == list(range(CHUNKS))
