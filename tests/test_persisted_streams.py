"""Persisted streams on memory storage: every chunk once, in order, across a lost lease.

The chunks travel through storage, so what a run produced and what the
caller acknowledged are read there; the handler's own record says where
each run started. No sleeps: events and ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import Entity, Runner
from trio_cluster.runtime.stored_streams import StreamWatch
from trio_cluster.storage.memory import MemoryStorage
from trio_cluster.testing import TEST_CONFIG, open_test_cluster, open_test_runner

from .interrupt_entities import Recorder
from .stream_entities import Job, Ticker, journal, tickers

SHARD = Ticker.shard_of("t", TEST_CONFIG.shards_per_group)


@asynccontextmanager
async def stream_caller(where: str) -> AsyncIterator[tuple[Runner, MemoryStorage, Recorder]]:
    """A runner to stream from: the owner of the Ticker ``t`` itself, or another runner."""
    impl, recorder = tickers()
    if where == "local":
        async with open_test_runner(impl) as (runner, storage):
            yield runner, storage, recorder
        return
    async with open_test_cluster(impl, runners=2) as cluster:
        caller = next(r for r in cluster.runners if SHARD not in r.shards)
        yield caller, cluster.storage, recorder


async def stream_id(storage: MemoryStorage) -> int:
    """The request id of the one stream running, read from storage."""
    (stored,) = await storage.unprocessed(SHARD)
    return stored.request_id


def test_a_persisted_stream_declares_its_window_and_key() -> None:
    entity = Entity("Declared")
    with pytest.raises(ValueError, match="persisted"):
        entity.stream("keyed", Job, int, primary_key=lambda job: job.key)
    with pytest.raises(ValueError, match="window"):
        entity.stream("wide", Job, int, persisted=True, window=0)
    assert journal.rpc.window == 4
    assert not journal.rpc.interruptible


@pytest.mark.parametrize("where", ["local", "remote"])
async def test_every_chunk_comes_once_in_order_and_the_window_bounds_the_owner(
    where: str,
) -> None:
    async with stream_caller(where) as (runner, storage, recorder):
        async with runner.client.stream(journal, "t", Job("a", 30)) as chunks:
            got = [(await anext(chunks)).i]
            await trio.testing.wait_all_tasks_blocked()
            # One taken, none acknowledged yet (half a window is 2): a window stored.
            request_id = await stream_id(storage)
            assert [seq for seq, _ in await storage.chunks(request_id, 0, 100)] == [0, 1, 2, 3]
            got += [tick.i async for tick in chunks]
        assert got == list(range(30))
        assert recorder.of(0)[0] == "started"
        assert [n for what, n in recorder.events if what == "produced"] == list(range(30))
        with pytest.raises(TypeError, match="declared"):
            async with runner.client.stream(journal, "t", Job("b", 1), window=2):
                pass


async def test_a_lost_lease_resumes_from_the_acknowledged_chunk() -> None:
    async with stream_caller("remote") as (runner, storage, recorder):
        async with runner.client.stream(journal, "t", Job("a", 40)) as chunks:
            got = [(await anext(chunks)).i for _ in range(7)]
            await trio.testing.wait_all_tasks_blocked()
            request_id = await stream_id(storage)
            acked = await storage.acked(request_id)
            assert acked == 6  # acknowledged two at a time
            storage.revoke(SHARD)
            await recorder.wait_for("started", acked)
            got += [tick.i async for tick in chunks]
        assert got == list(range(40))
        produced = [n for what, n in recorder.events if what == "produced"]
        # Nothing acknowledged was produced again: the first run had stored a window
        # past the ack and was producing the next chunk, waiting for room.
        assert sorted(set(produced)) == list(range(40))
        again = sorted(n for n in set(produced) if produced.count(n) > 1)
        assert again == list(range(acked, acked + journal.rpc.window + 1))
        assert [n for what, n in recorder.events if what == "started"] == [0, acked]


async def test_a_new_caller_with_the_same_key_resumes_after_the_acknowledged_chunks() -> None:
    async with stream_caller("remote") as (runner, _, recorder):
        async with runner.client.stream(journal, "t", Job("a", 20)) as chunks:
            first = [(await anext(chunks)).i for _ in range(5)]
        async with runner.client.stream(journal, "t", Job("a", 20)) as chunks:
            rest = [tick.i async for tick in chunks]
        assert first == list(range(5))
        assert rest == list(range(4, 20))  # chunk 4 was taken but not yet acknowledged
        # The finished stream answers a third caller with its end alone.
        async with runner.client.stream(journal, "t", Job("a", 20)) as chunks:
            assert [tick.i async for tick in chunks] == []
        assert [n for what, n in recorder.events if what == "started"] == [0]


@given(
    window=st.integers(1, 8),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("notice"), st.integers(0, 30), st.booleans()),
            st.tuples(st.just("take"), st.just(0), st.just(False)),
        ),
        max_size=60,
    ),
)
def test_a_caller_watch_holds_a_window_at_most_and_never_drops_a_notice_silently(
    window: int, steps: list[tuple[str, int, bool]]
) -> None:
    """Whatever order notices come in, and whether they carry their chunk: what the
    watch holds is from the caller's next index on, within a window, and a chunk
    it did not keep (nor had) makes it read storage."""
    watch = StreamWatch(window)
    watch.reread = False
    for kind, seq, carried in steps:
        if kind == "take":
            if watch.chunks.pop(watch.low, None) is not None:
                watch.low += 1
            continue
        held = seq in watch.chunks
        watch.chunk(seq, b"%d" % seq if carried else None)
        if seq >= watch.low and not held and seq not in watch.chunks:
            assert watch.reread
            watch.reread = False  # the caller read storage
        assert all(watch.low <= n < watch.low + window for n in watch.chunks)
        assert all(chunk == b"%d" % n for n, chunk in watch.chunks.items())
