"""Where a reply is announced: to its caller, and to whoever else waits on it.

Conformance (memory and PostgreSQL): a duplicate's caller, waiting on the
original's reply, hears it. PostgreSQL only: the reply to a request is
announced on its caller's channel alone, so another runner (its owner
included) never wakes for it; a request stored by an earlier version (no
``reply_to``) has its reply announced to every runner.

"Never hears it" is checked without a sleep: a notice every runner hears is
sent after the reply, and notices reach each listener in commit order, so a
runner that gets the later notice first did not get the reply's.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from trio_cluster import ShardId
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import shard_index
from trio_cluster.pgdriver import open_connection
from trio_cluster.postgres import PostgresStorage, open_postgres_storage
from trio_cluster.storage import MemoryStorage, Notice, Replied, Stored
from trio_cluster.storage.base import LeaseSession

SHARDS = 4
_prefixes = itertools.count()
_ids = itertools.count(1)


def request(entity_id: str, key: str | None = None) -> Envelope:
    return Envelope(
        request_id=next(_ids),
        entity_type="Counter",
        entity_id=entity_id,
        shard_group="default",
        shard_index=shard_index(entity_id, SHARDS),
        rpc="add_persisted",
        payload=b"\x92\x01\xa0",
        persisted=True,
        primary_key=key,
    )


def shard_of(e: Envelope) -> ShardId:
    return ShardId(e.shard_group, e.shard_index)


@pytest.fixture(params=["memory", "postgres"])
async def storage(
    request: pytest.FixtureRequest, pg_dsn: str
) -> AsyncIterator[MemoryStorage | PostgresStorage]:
    if request.param == "memory":
        yield MemoryStorage(retention=None)
        return
    async with open_postgres_storage(pg_dsn, prefix=f"rc{next(_prefixes)}_", retention=None) as pg:
        yield pg


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PostgresStorage]:
    async with open_postgres_storage(pg_dsn, prefix=f"rcp{next(_prefixes)}_", retention=None) as s:
        yield s


async def replies_before(notices: trio.MemoryReceiveChannel[Notice], marker: int) -> list[int]:
    """The replies heard before the ``Stored`` notice of request ``marker``."""
    heard: list[int] = []
    with trio.fail_after(10):
        while True:
            match await notices.receive():
                case Stored(_, request_id, _) if request_id == marker:
                    return heard
                case Replied(request_id, _, _):
                    heard.append(request_id)


async def reply(
    storage: MemoryStorage | PostgresStorage, owner: LeaseSession, e: Envelope, value: bytes
) -> None:
    lease = await owner.acquire(shard_of(e))
    assert lease is not None
    await storage.messages.save_reply(e.request_id, value, lease)


async def test_a_duplicate_waiting_on_the_original_hears_its_reply(
    storage: MemoryStorage | PostgresStorage,
) -> None:
    messages = storage.messages
    async with (
        storage.runners.session(RunnerSpec("caller"), lambda _: None) as caller,
        storage.runners.session(RunnerSpec("retrier"), lambda _: None) as retrier,
        storage.runners.session(RunnerSpec("owner"), lambda _: None) as owner,
        retrier.notices() as heard,
    ):
        original = request("e0", key="k")
        await messages.save_request(original, caller.machine_id, announce=False)
        saved = await messages.save_request(
            request("e0", key="k"), retrier.machine_id, announce=False
        )
        assert saved.duplicate and saved.request_id == original.request_id
        assert saved.reply is None
        assert await messages.watch_reply(original.request_id) is None
        await reply(storage, owner, original, b"done")
        with trio.fail_after(10):
            while True:
                match await heard.receive():
                    case Replied(request_id, _, value) if request_id == original.request_id:
                        assert value == b"done"
                        break
        # Asked once the reply is stored, it is the reply.
        assert await messages.watch_reply(original.request_id) == b"done"


# -- PostgreSQL only ----------------------------------------------------------------


async def test_a_reply_is_announced_to_its_caller_alone(pg: PostgresStorage) -> None:
    messages = pg.messages
    async with (
        pg.runners.session(RunnerSpec("caller"), lambda _: None) as caller,
        pg.runners.session(RunnerSpec("owner"), lambda _: None) as owner,
        pg.runners.session(RunnerSpec("bystander"), lambda _: None) as bystander,
        caller.notices() as at_caller,
        owner.notices() as at_owner,
        bystander.notices() as at_bystander,
    ):
        asked = request("e0")
        await messages.save_request(asked, caller.machine_id, announce=False)
        await reply(pg, owner, asked, b"done")
        marker = request("e1")  # announced to every runner, after the reply
        await messages.save_request(marker, caller.machine_id, announce=True)
        assert await replies_before(at_caller, marker.request_id) == [asked.request_id]
        assert await replies_before(at_owner, marker.request_id) == []
        assert await replies_before(at_bystander, marker.request_id) == []


async def test_a_reply_to_a_request_of_an_earlier_version_is_announced_to_every_runner(
    pg_dsn: str,
) -> None:
    prefix = f"rcv{next(_prefixes)}_"
    async with open_postgres_storage(pg_dsn, prefix=prefix, retention=None) as pg:
        await _earlier_version(pg, pg_dsn, prefix)


async def _earlier_version(pg: PostgresStorage, pg_dsn: str, prefix: str) -> None:
    messages = pg.messages
    async with (
        pg.runners.session(RunnerSpec("owner"), lambda _: None) as owner,
        pg.runners.session(RunnerSpec("bystander"), lambda _: None) as bystander,
        bystander.notices() as at_bystander,
    ):
        old = request("e0")
        await messages.save_request(old, owner.machine_id, announce=False)
        async with open_connection(pg_dsn) as conn:
            # As an earlier version stores it: no reply_to.
            await conn.execute(
                f"UPDATE {prefix}messages SET reply_to = NULL WHERE request_id = $1",
                [old.request_id],
            )
        await reply(pg, owner, old, b"done")
        marker = request("e1")
        await messages.save_request(marker, owner.machine_id, announce=True)
        assert await replies_before(at_bystander, marker.request_id) == [old.request_id]


async def test_a_batch_answering_more_than_two_callers_is_announced_to_every_runner(
    pg_dsn: str,
) -> None:
    prefix = f"rcw{next(_prefixes)}_"
    async with open_postgres_storage(pg_dsn, prefix=prefix, retention=None) as pg:
        await _wide_batch(pg, pg_dsn, prefix)


async def _wide_batch(pg: PostgresStorage, pg_dsn: str, prefix: str) -> None:
    messages = pg.messages
    async with (
        pg.runners.session(RunnerSpec("c1"), lambda _: None) as c1,
        pg.runners.session(RunnerSpec("c2"), lambda _: None) as c2,
        pg.runners.session(RunnerSpec("c3"), lambda _: None) as c3,
        pg.runners.session(RunnerSpec("owner"), lambda _: None) as owner,
        pg.runners.session(RunnerSpec("bystander"), lambda _: None) as bystander,
        bystander.notices() as at_bystander,
    ):
        first, *batch = [request("e0") for _ in range(4)]
        for e, caller in zip([first, *batch], [c1, c1, c2, c3], strict=True):
            await messages.save_request(e, caller.machine_id, announce=False)
        lease = await owner.acquire(shard_of(first))
        assert lease is not None
        async with open_connection(pg_dsn) as blocker, trio.open_nursery() as nursery:
            # The first reply goes out alone and waits on this row lock, so the other
            # three queue behind it and are written as one batch.
            await blocker.execute("BEGIN")
            await blocker.execute(
                f"SELECT 1 FROM {prefix}messages WHERE request_id = $1 FOR UPDATE",
                [first.request_id],
            )
            for e in (first, *batch):
                nursery.start_soon(messages.save_reply, e.request_id, b"done", lease)
                await trio.testing.wait_all_tasks_blocked()
            batches = messages.replies.batches
            await blocker.execute("COMMIT")
        assert messages.replies.batches == batches + 2  # the lone write, then the three
        marker = request("e1")
        await messages.save_request(marker, c1.machine_id, announce=True)
        heard = await replies_before(at_bystander, marker.request_id)
        assert sorted(heard) == sorted(e.request_id for e in batch)
