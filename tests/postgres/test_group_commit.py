"""Group commit, the same on both storages where the protocol says so.

Conformance (memory and PostgreSQL): concurrent requests and replies stored at
once keep every guarantee they have alone: two requests with one primary key
store one request, a reply from a stale lease is refused (its writer alone
learns it) while the others in flight are stored, a state is written exactly
with its reply, and reply notices carry the reply. PostgreSQL only: concurrent
writes share statements, a bad row fails alone, a reply too large for a
notice is announced without it, and a stored request's notice carries it: its
owner uses that copy with no read unless a read of the shard may have returned
the request (then it reads, so a processed request is not run again), the
request was too large to carry, or the runner does not surely hold the shard.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import msgspec
import pytest
import trio

from trio_cluster import EntityNotAssignedToRunner, PersistenceError, ShardId
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.hashing import shard_index
from trio_cluster.pgdriver import open_connection
from trio_cluster.postgres import PostgresStorage, open_postgres_storage
from trio_cluster.storage import (
    Lease,
    MembershipChanged,
    MemoryStorage,
    Notice,
    Replied,
    Saved,
    StateWrite,
    Stored,
)

T = TypeVar("T")

SHARDS = 4
_prefixes = itertools.count()
_ids = itertools.count(1)


def shard_of(entity_id: str) -> ShardId:
    return ShardId("default", shard_index(entity_id, SHARDS))


ENTITIES = [f"e{n}" for n in range(40)]
OTHER = next(e for e in ENTITIES if shard_of(e) != shard_of("e0"))


def envelope(entity_id: str, key: str | None = None, request_id: int | None = None) -> Envelope:
    return Envelope(
        request_id=next(_ids) if request_id is None else request_id,
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
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_", retention=None) as pg:
        yield pg


async def all_at_once(*calls: Awaitable[T]) -> list[T | Exception]:
    """Run the calls concurrently; each one's result or exception, in order."""
    outcomes: list[T | Exception] = [Exception("not run")] * len(calls)

    async def one(n: int, call: Awaitable[T]) -> None:
        try:
            outcomes[n] = await call
        except Exception as error:
            outcomes[n] = error

    async with trio.open_nursery() as nursery:
        for n, call in enumerate(calls):
            nursery.start_soon(one, n, call)
    return outcomes


async def test_concurrent_requests_with_one_key_store_one_request(
    storage: MemoryStorage | PostgresStorage,
) -> None:
    messages = storage.messages
    keyed = [envelope("e0", key="k") for _ in range(3)]
    others = [envelope(e) for e in ENTITIES]
    saved = await all_at_once(
        *(messages.save_request(e, origin=1, announce=False) for e in [*keyed, *others])
    )
    assert all(isinstance(s, Saved) for s in saved)
    keyed_saved = [s for s in saved[:3] if isinstance(s, Saved)]
    originals = [s for s in keyed_saved if not s.duplicate]
    assert len(originals) == 1
    original = originals[0].request_id
    assert all(s.request_id == original for s in keyed_saved)
    assert [getattr(s, "request_id", None) for s in saved[3:]] == [e.request_id for e in others]
    pending = await messages.unprocessed(shard_of("e0"), entity=("Counter", "e0"))
    assert {e.request_id for e in pending} == {original, others[0].request_id}


async def test_a_stale_lease_is_refused_among_concurrent_replies(
    storage: MemoryStorage | PostgresStorage,
) -> None:
    messages = storage.messages
    requests = [envelope(e) for e in ENTITIES]
    for e in requests:
        await messages.save_request(e, origin=1, announce=False)
    async with storage.runners.session(RunnerSpec("r"), lambda _: None) as session:
        leases: dict[ShardId, Lease] = {}
        for shard in {shard_of(e) for e in ENTITIES}:
            lease = await session.acquire(shard)
            assert lease is not None
            leases[shard] = lease
        victim = shard_of("e0")
        stale = leases[victim]
        await session.release(stale)
        current = await session.acquire(victim)
        assert current is not None and current.epoch > stale.epoch
        outcomes = await all_at_once(
            *(
                messages.save_reply(
                    e.request_id,
                    f"r{e.entity_id}".encode(),
                    leases[shard_of(e.entity_id)],
                    StateWrite("Counter", e.entity_id, b"s"),
                )
                for e in requests
            )
        )
        for e, outcome in zip(requests, outcomes, strict=True):
            if shard_of(e.entity_id) == victim:
                assert isinstance(outcome, EntityNotAssignedToRunner)
                assert await messages.reply_for(e.request_id) is None
                assert await storage.states.load_state("Counter", e.entity_id) is None
            else:
                assert outcome is None
                assert await messages.reply_for(e.request_id) == f"r{e.entity_id}".encode()
                assert await storage.states.load_state("Counter", e.entity_id) == b"s"


async def test_a_lone_reply_writes_or_deletes_its_state_unless_its_lease_is_stale(
    storage: MemoryStorage | PostgresStorage,
) -> None:
    """Each write alone (the statement for one row, on PostgreSQL): the same fence
    and the same state write as in a batch."""
    messages = storage.messages
    first, second, late = (envelope("e0") for _ in range(3))
    for e in (first, second, late):
        await messages.save_request(e, origin=1, announce=False)
    async with storage.runners.session(RunnerSpec("r"), lambda _: None) as session:
        lease = await session.acquire(shard_of("e0"))
        assert lease is not None
        await messages.save_reply(first.request_id, b"1", lease, StateWrite("Counter", "e0", b"s"))
        assert await storage.states.load_state("Counter", "e0") == b"s"
        await messages.save_reply(second.request_id, b"2", lease, StateWrite("Counter", "e0", None))
        assert await storage.states.load_state("Counter", "e0") is None
        await session.release(lease)
        assert await session.acquire(shard_of("e0")) is not None
        with pytest.raises(EntityNotAssignedToRunner, match="stale"):
            await messages.save_reply(
                late.request_id, b"3", lease, StateWrite("Counter", "e0", b"x")
            )
        assert await storage.states.load_state("Counter", "e0") is None
    assert await messages.reply_for(first.request_id) == b"1"
    assert await messages.reply_for(second.request_id) == b"2"
    assert await messages.reply_for(late.request_id) is None


async def test_reply_notices_carry_the_reply(storage: MemoryStorage | PostgresStorage) -> None:
    messages = storage.messages
    async with (
        storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
        session.notices() as notices,
    ):
        me = session.machine_id  # a reply is announced to the caller that stored it
        requests = [envelope(e) for e in ENTITIES[:10]]
        await all_at_once(*(messages.save_request(e, origin=me, announce=True) for e in requests))
        leases: dict[ShardId, Lease] = {}
        for shard in {shard_of(e.entity_id) for e in requests}:
            lease = await session.acquire(shard)
            assert lease is not None
            leases[shard] = lease
        await all_at_once(
            *(
                messages.save_reply(e.request_id, b"done", leases[shard_of(e.entity_id)])
                for e in requests
            )
        )
        shards = {e.request_id: shard_of(e.entity_id) for e in requests}
        wanted = {e.request_id for e in requests}
        stored: set[int] = set()
        replied: dict[int, bytes | None] = {}
        with trio.fail_after(10):
            while len(replied) < len(wanted):
                match await notices.receive():
                    case Stored(shard, request_id, origin) if request_id in wanted:
                        assert origin == me
                        assert shard == shards[request_id]
                        stored.add(request_id)
                    case Replied(request_id, _, reply) if request_id in wanted:
                        replied[request_id] = reply
        assert stored == wanted
        assert replied == dict.fromkeys(wanted, b"done")


# -- PostgreSQL only ----------------------------------------------------------------


async def test_concurrent_requests_share_statements(pg_dsn: str) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        await all_at_once(
            *(messages.save_request(envelope(e), origin=1, announce=True) for e in ENTITIES)
        )
        writer = messages.requests
        assert writer.items == len(ENTITIES)
        assert writer.batches <= 4  # whatever queued while the first was written went together


async def test_a_bad_row_fails_alone(pg_dsn: str) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        taken = envelope("e0")
        await messages.save_request(taken, origin=1, announce=False)
        # Same request id, another key: the primary key refuses it, and only it.
        clash = envelope("e1", key="other", request_id=taken.request_id)
        good = [envelope(e) for e in ENTITIES[2:12]]
        outcomes = await all_at_once(
            messages.save_request(clash, origin=1, announce=False),
            *(messages.save_request(e, origin=1, announce=False) for e in good),
        )
        assert isinstance(outcomes[0], PersistenceError)
        assert [getattr(o, "request_id", None) for o in outcomes[1:]] == [
            e.request_id for e in good
        ]


async def test_a_reply_too_large_for_a_notice_is_announced_without_it(pg_dsn: str) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        big, small = envelope("e0"), envelope(OTHER)
        async with (
            storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
            session.notices() as notices,
        ):
            for e in (big, small):
                await messages.save_request(e, origin=session.machine_id, announce=False)
            big_lease = await session.acquire(shard_of(big.entity_id))
            small_lease = await session.acquire(shard_of(small.entity_id))
            assert big_lease is not None and small_lease is not None
            await all_at_once(
                messages.save_reply(big.request_id, b"x" * 20_000, big_lease),
                messages.save_reply(small.request_id, b"y", small_lease),
            )
            seen: dict[int, bytes | None] = {}
            with trio.fail_after(10):
                while len(seen) < 2:
                    notice = await notices.receive()
                    if isinstance(notice, Replied):
                        seen[notice.request_id] = notice.reply
            assert seen == {big.request_id: None, small.request_id: b"y"}
            assert await messages.reply_for(big.request_id) == b"x" * 20_000


async def test_requests_wait_for_the_commit_of_their_batch(pg_dsn: str) -> None:
    """Acknowledged means committed: what save_request returned is visible to others."""
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        requests = [envelope(e) for e in ENTITIES]
        await all_at_once(
            *(storage.messages.save_request(e, origin=1, announce=False) for e in requests)
        )
        async with open_connection(pg_dsn) as conn:
            count = await conn.fetchval(f"SELECT count(*) FROM {storage._prefix}messages")
        assert count == len(requests)


async def stored_notices(notices: trio.MemoryReceiveChannel[Notice], *request_ids: int) -> None:
    """Wait until the stored-request notices of ``request_ids`` have all arrived."""
    wanted = set(request_ids)
    with trio.fail_after(10):
        while wanted:
            notice = await notices.receive()
            if isinstance(notice, Stored):
                wanted.discard(notice.request_id)


async def test_a_carried_request_is_delivered_with_no_read(pg_dsn: str) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        shard = shard_of("e0")
        sent = Envelope(
            **{
                **msgspec.structs.asdict(envelope("e0", key="k")),
                "deliver_at_ms": 1_700_000_000_000,
                "headers": {"traceparent": "00-1-2-01"},
                "call_chain": ("Caller/c",),
            }
        )
        async with (
            storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
            session.notices() as notices,
        ):
            assert await session.acquire(shard) is not None
            assert await messages.unprocessed(shard) == []  # the owner's first scan
            await messages.save_request(sent, origin=1, announce=True)
            await stored_notices(notices, sent.request_id)
            reads = messages.reads
            assert await messages.fetch(shard, [sent.request_id]) == [sent]
            assert messages.reads == reads
            assert messages.carried.used == 1
            assert await messages.unprocessed(shard) == [sent]  # what a read returns


async def test_a_runner_not_surely_holding_the_shard_reads_carried_requests(
    pg_dsn: str,
) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        shard = shard_of("e0")
        sent = envelope("e0")
        async with (
            storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
            session.notices() as notices,
        ):
            assert await messages.unprocessed(shard) == []
            await messages.save_request(sent, origin=1, announce=True)
            await stored_notices(notices, sent.request_id)
            reads = messages.reads
            assert await messages.fetch(shard, [sent.request_id]) == [sent]
            assert (messages.reads, messages.carried.used) == (reads + 1, 0)


async def test_a_request_a_read_returned_is_read_again_so_it_is_not_run_twice(
    pg_dsn: str,
) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        shard = shard_of("e0")
        done, running = envelope("e0"), envelope("e0")
        async with (
            storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
            session.notices() as notices,
        ):
            lease = await session.acquire(shard)
            assert lease is not None
            await all_at_once(
                *(messages.save_request(e, origin=1, announce=True) for e in (done, running))
            )
            assert await messages.unprocessed(shard) == [done, running]  # a scan ran them
            await messages.save_reply(done.request_id, b"ok", lease)
            await stored_notices(notices, done.request_id, running.request_id)
            reads = messages.reads
            assert await messages.fetch(shard, [done.request_id, running.request_id]) == [running]
            assert messages.reads == reads + 1
            assert messages.carried.used == 0


async def test_a_request_too_large_for_a_notice_is_announced_by_id_and_read(
    pg_dsn: str,
) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        shard = shard_of("e0")
        big = Envelope(**{**msgspec.structs.asdict(envelope("e0")), "payload": b"x" * 7000})
        small = envelope("e0")
        async with (
            storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
            session.notices() as notices,
        ):
            assert await session.acquire(shard) is not None
            assert await messages.unprocessed(shard) == []
            await all_at_once(
                *(messages.save_request(e, origin=1, announce=True) for e in (big, small))
            )
            await stored_notices(notices, big.request_id, small.request_id)
            reads = messages.reads
            assert await messages.fetch(shard, [small.request_id, big.request_id]) == [
                big,
                small,
            ]
            assert (messages.reads, messages.carried.used) == (reads + 1, 1)


async def test_notices_of_earlier_versions_are_still_understood(pg_dsn: str) -> None:
    async with open_postgres_storage(pg_dsn, prefix=f"gc{next(_prefixes)}_") as storage:
        messages = storage.messages
        ids_only = base64.b64encode(msgspec.msgpack.encode([7, "default", 1, 42])).decode()
        async with (
            storage.runners.session(RunnerSpec("r"), lambda _: None) as session,
            session.notices() as notices,
            open_connection(pg_dsn) as conn,
        ):
            for payload in (f"S:{ids_only},{ids_only}", "s:7:default:2:43"):
                await conn.execute("SELECT pg_notify($1, $2)", [messages.channel, payload])
            received: list[Notice] = []
            with trio.fail_after(10):
                while len(received) < 3:
                    notice = await notices.receive()
                    if not isinstance(notice, MembershipChanged):  # the session's own
                        received.append(notice)
        assert received == [
            Stored(ShardId("default", 1), 42, 7),
            Stored(ShardId("default", 1), 42, 7),
            Stored(ShardId("default", 2), 43, 7),
        ]
