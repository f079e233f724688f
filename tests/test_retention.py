"""The retention sweep on Trio's mock clock: its pacing, its batches, its failure boundary,
and the memory storage staying bounded under steady traffic."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from trio_cluster import PersistenceError, ShardId
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.core.envelope import Envelope
from trio_cluster.storage import Lease, MemoryStorage
from trio_cluster.storage.retention import Retention, sweep_forever

SHARD = ShardId("default", 0)
LEASE = Lease(SHARD, 1, 1)


async def test_each_sweep_drains_a_shard_in_batches_then_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    retention = Retention(window=5.0, interval=10.0, batch=3)
    backlog = [7]  # rows past the window, in the one shard
    purges: list[tuple[float, int]] = []

    async def purge(lease: Lease, window: float, limit: int) -> int:
        assert (lease, window, limit) == (LEASE, 5.0, 3)
        deleted = min(backlog[0], limit)
        backlog[0] -= deleted
        purges.append((trio.current_time(), deleted))
        return deleted

    with trio.move_on_after(25.0):
        await sweep_forever(retention, lambda: [LEASE], purge)
    # First sweep at 10 s: 3 + 3 + 1 (short: done); the second finds nothing.
    assert purges == [(10.0, 3), (10.0, 3), (10.0, 1), (20.0, 0)]


async def test_a_failed_purge_waits_for_the_next_sweep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    other = Lease(ShardId("default", 1), 1, 1)
    calls: list[tuple[float, ShardId]] = []

    async def purge(lease: Lease, window: float, limit: int) -> int:
        calls.append((trio.current_time(), lease.shard))
        if lease == LEASE and len(calls) == 1:
            raise PersistenceError("database down")
        return 0

    with trio.move_on_after(2.5):
        await sweep_forever(Retention(interval=1.0), lambda: [LEASE, other], purge)
    assert calls == [(1.0, SHARD), (1.0, other.shard), (2.0, SHARD), (2.0, other.shard)]


def test_settings_are_validated() -> None:
    for bad in ({"window": -1.0}, {"interval": 0.0}, {"batch": 0}):
        with pytest.raises(ValueError):
            Retention(**bad)


async def test_memory_storage_stays_bounded_under_steady_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One request a second for ten windows: each is kept for at least the window and
    gone within a window plus a sweep interval, so at most that many rows are ever kept."""
    retention = Retention(window=30.0, interval=5.0, batch=4)
    storage = MemoryStorage(retention=retention)
    ids = itertools.count(1)
    replied_at: dict[int, float] = {}
    async with storage.session(RunnerSpec("r"), lambda _: None) as session:
        lease = await session.acquire(SHARD)
        assert lease is not None
        for second in range(300):
            request_id = next(ids)
            envelope = Envelope(
                request_id=request_id,
                entity_type="Counter",
                entity_id="a",
                shard_group="default",
                shard_index=0,
                rpc="add",
                payload=b"",
                persisted=True,
                primary_key=f"k{request_id}",
            )
            await storage.save_request(envelope, origin=0, announce=False)
            await storage.save_reply(request_id, b"ok", lease)
            replied_at[request_id] = trio.current_time()
            await trio.sleep_until(float(second + 1))
            now = trio.current_time()
            kept = [i for i in replied_at if await storage.reply_for(i) is not None]
            for i, at in replied_at.items():
                if now - at < retention.window:
                    assert i in kept  # inside the window: kept, key and reply
                elif now - at > retention.window + retention.interval:
                    assert i not in kept
            assert len(kept) <= retention.window + retention.interval + 1
