"""Persisted streams: one conformance suite, run against both storages.

Storage first (what storing chunks and acks keeps, refuses and announces,
and that retention deletes them with their request), then the runtime over
it: a stream whose owner leaves mid-stream, resumed by the next owner from
the chunk its caller acknowledged.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import msgspec
import pytest
import trio

from trio_cluster import EntityNotAssignedToRunner, MemoryStorage, open_runner
from trio_cluster.core import reply as replies
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import ShardId, shard_index
from trio_cluster.postgres.messages import PgMessageStorage
from trio_cluster.storage import Lease, Storage
from trio_cluster.storage.base import ChunksAcked, ChunkStored, Notice
from trio_cluster.testing import TEST_CONFIG

from ..stream_entities import Job, journal, tickers

CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=4)
WAIT_S = 20.0


# -- storage ----------------------------------------------------------------------------------

_ids = itertools.count(5000)
SHARD = ShardId("default", shard_index("t", CONFIG.shards_per_group))


def request() -> Envelope:
    return Envelope(
        request_id=next(_ids),
        entity_type="Ticker",
        entity_id="t",
        shard_group=SHARD.group,
        shard_index=SHARD.index,
        rpc="journal",
        payload=msgspec.msgpack.encode(Job("k", 3)),
        persisted=True,
    )


@asynccontextmanager
async def lease_and_notices(
    storage: Storage,
) -> AsyncIterator[tuple[Lease, trio.MemoryReceiveChannel[Notice]]]:
    """A runner's session holding ``SHARD``, and the notices it hears."""
    async with (
        storage.runners.session(RunnerSpec("holder"), lambda _: None) as session,
        session.notices() as notices,
    ):
        lease = await session.acquire(SHARD)
        assert lease is not None
        yield lease, notices


@asynccontextmanager
async def lease_of(storage: Storage) -> AsyncIterator[Lease]:
    async with lease_and_notices(storage) as (lease, _):
        yield lease


async def next_notice(notices: trio.MemoryReceiveChannel[Notice], request_id: int) -> Notice:
    """The next stream notice of ``request_id`` (others, like the request's own, skipped)."""
    with trio.fail_after(WAIT_S):
        async for notice in notices:
            if isinstance(notice, ChunkStored | ChunksAcked) and notice.request_id == request_id:
                return notice
    raise AssertionError("the notices ended")


async def test_chunks_are_fenced_kept_first_and_announced(storage: Storage) -> None:
    streams = storage.streams
    async with lease_and_notices(storage) as (lease, notices):
        stream = request()
        await storage.messages.save_request(stream, 1, announce=False)
        rid = stream.request_id
        await streams.save_chunk(rid, 0, b"zero", lease)
        assert await next_notice(notices, rid) == ChunkStored(rid, 0, lease.machine_id, b"zero")
        await streams.save_chunk(rid, 1, b"one", lease)
        assert await next_notice(notices, rid) == ChunkStored(rid, 1, lease.machine_id, b"one")
        # Produced again by a new run: the first copy stands.
        await streams.save_chunk(rid, 0, b"again", lease)
        notice = await next_notice(notices, rid)
        assert isinstance(notice, ChunkStored)
        assert notice.seq == 0
        assert notice.chunk in (None, b"zero")
        stale = attrs.evolve(lease, epoch=lease.epoch + 1)
        with pytest.raises(EntityNotAssignedToRunner):
            await streams.save_chunk(rid, 2, b"two", stale)
        assert await streams.chunks(rid, 0, 10) == [(0, b"zero"), (1, b"one")]
        assert await streams.chunks(rid, 1, 10) == [(1, b"one")]
        assert await streams.chunks(rid, 0, 1) == [(0, b"zero")]
        # The ack only moves forward, and announces each move.
        assert await streams.acked(rid) == 0
        await streams.ack(rid, 2, 7)
        assert await next_notice(notices, rid) == ChunksAcked(rid, 2, 7)
        await streams.ack(rid, 1, 7)
        await streams.ack(rid, 3, 7)
        assert await next_notice(notices, rid) == ChunksAcked(rid, 3, 7)
        assert await streams.acked(rid) == 3
        await streams.ack(424242, 5, 7)  # no such request: nothing is stored
        assert await streams.acked(424242) == 0


async def test_a_large_chunk_is_announced_without_it(storage: Storage) -> None:
    async with lease_and_notices(storage) as (lease, notices):
        stream = request()
        await storage.messages.save_request(stream, 1, announce=False)
        big = b"x" * 20_000
        await storage.streams.save_chunk(stream.request_id, 0, big, lease)
        notice = await next_notice(notices, stream.request_id)
        assert isinstance(notice, ChunkStored)
        assert notice.chunk in (None, big)
        assert await storage.streams.chunks(stream.request_id, 0, 1) == [(0, big)]


async def test_retention_deletes_chunks_and_ack_with_their_request(storage: Storage) -> None:
    messages = storage.messages
    assert isinstance(messages, MemoryStorage | PgMessageStorage)
    async with lease_of(storage) as lease:
        stream = request()
        rid = stream.request_id
        await messages.save_request(stream, 1, announce=False)
        await storage.streams.save_chunk(rid, 0, b"zero", lease)
        await storage.streams.ack(rid, 1, 1)
        await messages.save_reply(rid, replies.success(None), lease)
        assert await messages.purge(lease, 0.0, 100) == 1
        assert await storage.streams.chunks(rid, 0, 10) == []
        assert await storage.streams.acked(rid) == 0


# -- the runtime ------------------------------------------------------------------------------


async def test_a_stream_resumes_on_the_next_owner_from_the_acknowledged_chunk(
    storage: Storage,
) -> None:
    async with (
        open_runner(storage=storage, config=CONFIG) as caller,
        caller.client.stream(journal, "t", Job("moved", 30), timeout=WAIT_S) as chunks,
    ):
        impl, first = tickers()
        async with open_runner(impl, storage=storage, config=CONFIG):
            got = [(await anext(chunks)).i for _ in range(7)]
            # Acknowledged up to 6, two at a time: the owner waits, a window past it.
            with trio.fail_after(WAIT_S):
                await first.wait_for("produced", 6 + journal.rpc.window)
        # With no owner, what the first one stored is still read, and acknowledged.
        got += [(await anext(chunks)).i for _ in range(3)]
        impl, second = tickers()
        async with open_runner(impl, storage=storage, config=CONFIG):
            got += [tick.i async for tick in chunks]
    assert got == list(range(30))
    assert [n for what, n in first.events if what == "started"] == [0]
    assert [n for what, n in second.events if what == "started"] == [10]
    assert [n for what, n in second.events if what == "produced"] == list(range(10, 30))
