"""Retention, the same on both storages: what a purge deletes, and what it must keep.

Conformance: the memory storage and the PostgreSQL storage answer these alike.
A purge deletes processed requests whose reply is older than the window, in
batches, in the lease's shard only; it never deletes an unprocessed request, and
never a request (so never a dedup key) inside the window.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from trio_cluster import ShardId
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import shard_index
from trio_cluster.postgres import PostgresStorage, open_postgres_storage
from trio_cluster.storage import Lease, MemoryStorage

SHARDS = 4
HOUR = 3600.0
_prefixes = itertools.count()
_ids = itertools.count(1)


def shard_of(entity_id: str) -> ShardId:
    return ShardId("default", shard_index(entity_id, SHARDS))


ELSEWHERE = next(f"b{n}" for n in itertools.count() if shard_of(f"b{n}") != shard_of("a"))


def envelope(key: str, entity_id: str = "a") -> Envelope:
    return Envelope(
        request_id=next(_ids),
        entity_type="Counter",
        entity_id=entity_id,
        shard_group="default",
        shard_index=shard_of(entity_id).index,
        rpc="add_persisted",
        payload=b"\x92\x01\xa0",
        persisted=True,
        primary_key=key,
    )


@pytest.fixture(params=["memory", "postgres"])
async def storage(
    request: pytest.FixtureRequest, pg_dsn: str
) -> AsyncIterator[MemoryStorage | PostgresStorage]:
    if request.param == "memory":
        yield MemoryStorage(retention=None)
        return
    prefix = f"ret{next(_prefixes)}_"
    async with open_postgres_storage(pg_dsn, prefix=prefix, retention=None) as pg:
        yield pg


async def stored(storage: MemoryStorage | PostgresStorage, key: str, entity: str = "a") -> int:
    saved = await storage.messages.save_request(envelope(key, entity), origin=0, announce=False)
    assert not saved.duplicate
    return saved.request_id


async def is_duplicate(storage: MemoryStorage | PostgresStorage, key: str) -> bool:
    saved = await storage.messages.save_request(envelope(key), origin=0, announce=False)
    return saved.duplicate


async def test_only_processed_requests_past_the_window_go(
    storage: MemoryStorage | PostgresStorage,
) -> None:
    messages = storage.messages
    async with storage.runners.session(RunnerSpec("r"), lambda _: None) as session:
        lease = await session.acquire(shard_of("a"))
        elsewhere = await session.acquire(shard_of(ELSEWHERE))
        assert lease is not None and elsewhere is not None
        done = [await stored(storage, f"done{n}") for n in range(3)]
        waiting = await stored(storage, "waiting")
        other = await stored(storage, "other", ELSEWHERE)
        for request_id in done:
            await messages.save_reply(request_id, b"ok", lease)
        await messages.save_reply(other, b"ok", elsewhere)

        # Inside the window nothing goes, and every dedup key still holds.
        assert await messages.purge(lease, HOUR, 100) == 0
        assert all([await is_duplicate(storage, f"done{n}") for n in range(3)])

        # Past it, processed requests go in batches of the limit, this shard's only.
        assert [await messages.purge(lease, 0.0, 2) for _ in range(3)] == [2, 1, 0]
        assert [await messages.reply_for(i) for i in done] == [None, None, None]

        # The unprocessed request stays, whatever its age, with its key.
        assert [e.request_id for e in await messages.unprocessed(shard_of("a"))] == [waiting]
        assert await is_duplicate(storage, "waiting")
        assert not await is_duplicate(storage, "done0")  # that key is free again
        # The other shard's processed request waits for its own shard's purge.
        assert await messages.reply_for(other) == b"ok"
        assert await messages.purge(elsewhere, 0.0, 100) == 1
        assert await messages.reply_for(other) is None


async def test_a_purge_needs_no_lease_to_be_current(
    storage: MemoryStorage | PostgresStorage,
) -> None:
    """Rows past their window are the same whoever deletes them: a stale owner's purge
    deletes nothing a current owner would keep (so the purge is not fenced)."""
    async with storage.runners.session(RunnerSpec("r"), lambda _: None) as session:
        lease = await session.acquire(shard_of("a"))
        assert lease is not None
        request_id = await stored(storage, "k")
        await storage.messages.save_reply(request_id, b"ok", lease)
        stale = Lease(lease.shard, lease.machine_id, lease.epoch - 1)
        assert await storage.messages.purge(stale, HOUR, 100) == 0
        assert await storage.messages.purge(stale, 0.0, 100) == 1
