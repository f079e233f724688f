"""Shards moving in bulk: what a joining runner, or a survivor of a death, does.

Conformance (both storages): free shards are taken, each under a newer epoch than
its last, and shards another runner holds (or this one, until it releases them)
are left out; the first reads of many shards, concurrent, return what each would
alone. PostgreSQL alone: shards are taken in batches of ``ACQUIRE_BATCH`` per
group, and a statement that fails leaves no lock behind (session advisory locks
outlive the failed transaction), while what earlier batches took is returned and
held; releases asked for together all let go of their locks; concurrent first
reads go out as one statement.
"""

from __future__ import annotations

import itertools
import uuid

import msgspec
import pytest
import trio

from trio_cluster import PersistenceError, ShardId
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.pgdriver import open_connection
from trio_cluster.postgres import leases as pg_leases
from trio_cluster.postgres.schema import lock_namespace
from trio_cluster.postgres.storage import PostgresStorage, open_postgres_storage
from trio_cluster.storage import NO_ORIGIN
from trio_cluster.storage.base import Storage

_ids = itertools.count(1000)


def shards(group: str, *indices: int) -> list[ShardId]:
    return [ShardId(group, index) for index in indices]


async def test_free_shards_are_taken_under_newer_epochs_and_held_ones_left_out(
    storage: Storage,
) -> None:
    runners = storage.runners
    async with (
        runners.session(RunnerSpec("a"), lambda _: None) as first,
        runners.session(RunnerSpec("b"), lambda _: None) as second,
    ):
        taken = await first.acquire_many(shards("default", 0, 1) + shards("other", 0))
        assert sorted(lease.shard for lease in taken) == sorted(
            shards("default", 0, 1) + shards("other", 0)
        )
        assert {lease.machine_id for lease in taken} == {first.machine_id}
        before = {lease.shard: lease.epoch for lease in taken}
        await first.release(next(lease for lease in taken if lease.shard == ShardId("default", 1)))
        wanted = shards("default", 0, 1, 2) + shards("other", 0, 1)
        got = {lease.shard: lease for lease in await second.acquire_many(wanted)}
        # default/0 and other/0 are still the first runner's.
        assert sorted(got) == shards("default", 1, 2) + shards("other", 1)
        assert got[ShardId("default", 1)].epoch > before[ShardId("default", 1)]
        assert {lease.machine_id for lease in got.values()} == {second.machine_id}
        assert await second.acquire_many([]) == []
        # Held here, and so left out until released (a second lock would outlive one release).
        assert await second.acquire_many(shards("default", 1)) == []
        await second.release(got[ShardId("default", 1)])
        (again,) = await second.acquire_many(shards("default", 1))
        assert again.epoch > got[ShardId("default", 1)].epoch


def request(shard: ShardId) -> Envelope:
    return Envelope(
        request_id=next(_ids),
        entity_type="Counter",
        entity_id=f"e{shard.index}",
        shard_group=shard.group,
        shard_index=shard.index,
        rpc="add",
        payload=msgspec.msgpack.encode(1),
        persisted=True,
    )


async def test_first_reads_of_many_shards_return_what_each_would_alone(storage: Storage) -> None:
    backlog = {0: 3, 1: 0, 2: 5, 3: 1}
    stored: dict[int, list[int]] = {}
    for index, count in backlog.items():
        for _ in range(count):
            envelope = request(ShardId("default", index))
            await storage.messages.save_request(envelope, NO_ORIGIN, announce=False)
            stored.setdefault(index, []).append(envelope.request_id)
    alone = {
        index: [e.request_id for e in await storage.messages.unprocessed(shard, limit=2)]
        for index, shard in enumerate(shards("default", *backlog))
    }
    assert alone == {index: stored.get(index, [])[:2] for index in backlog}
    first_pages = storage.messages.first_pages if isinstance(storage, PostgresStorage) else None
    statements = 0 if first_pages is None else first_pages.batches
    together: dict[int, list[int]] = {}

    async def read(shard: ShardId) -> None:
        found = await storage.messages.unprocessed(shard, limit=2)
        together[shard.index] = [e.request_id for e in found]

    async with trio.open_nursery() as nursery:
        for shard in shards("default", *backlog):
            nursery.start_soon(read, shard)
    assert together == alone
    if first_pages is not None:
        # The first read goes alone; the three others wait for it, then share one.
        assert first_pages.batches == statements + 2


async def held_indices(dsn: str, prefix: str, group: str) -> set[int]:
    """The shard locks of ``group`` held on the server, by anyone: read from outside."""
    async with open_connection(dsn) as conn:
        namespace = await lock_namespace(conn, f"{prefix}:group:{group}")
        rows = await conn.fetch(
            "SELECT objid::int FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 2 AND classid = $1::int::oid",
            [namespace],
        )
    return {int(index) for (index,) in rows}


async def test_batches_and_a_failing_statement_leave_no_stray_lock(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_leases, "ACQUIRE_BATCH", 2)
    prefix = f"am{uuid.uuid4().hex[:8]}_"
    async with (
        open_postgres_storage(pg_dsn, prefix=prefix) as storage,
        storage.session(RunnerSpec("a"), lambda _: None) as session,
    ):
        # Five shards in three statements, all taken.
        taken = await session.acquire_many(shards("default", *range(5)))
        assert sorted(lease.shard.index for lease in taken) == list(range(5))
        assert await held_indices(pg_dsn, prefix, "default") == set(range(5))
        async with trio.open_nursery() as nursery:  # released together: one unlock batch
            for lease in taken:
                nursery.start_soon(session.release, lease)
        assert await held_indices(pg_dsn, prefix, "default") == set()

        # A shard index the table refuses makes its batch's statement fail after
        # that statement locked it and its batch-mate.
        async with open_connection(pg_dsn) as conn:
            await conn.execute(
                f"ALTER TABLE {prefix}shards ADD CONSTRAINT below_7 CHECK (shard_index < 7)"
            )
        with pytest.raises(PersistenceError, match="acquire 2 shards of default"):
            await session.acquire_many(shards("default", 7, 8))
        assert await held_indices(pg_dsn, prefix, "default") == set()
        # Failing after an earlier batch: that batch's leases are returned and held.
        partial = await session.acquire_many(shards("default", 5, 6, 7, 8))
        assert sorted(lease.shard.index for lease in partial) == [5, 6]
        assert await held_indices(pg_dsn, prefix, "default") == {5, 6}
        assert all(session.surely_holds(lease.shard) for lease in partial)
