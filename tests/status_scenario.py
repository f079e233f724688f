"""``read_status`` as every storage must answer it: one scenario, run on each storage.

Two in-process runners host the Counter; persisted requests wait in two
ways that stay put until the test says so: behind a handler blocked on
the probe, and in a shard group no runner serves. The status must name
both runners alive, each default shard's owner and lease epoch as the
runners themselves hold them, and exactly those waiting requests.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from trio_cluster import Entity, Runner, open_runner
from trio_cluster.core.hashing import shard_index
from trio_cluster.storage import StatusStorage, Storage
from trio_cluster.storage.status import ClusterStatus, ShardStatus, Totals
from trio_cluster.testing import TEST_CONFIG

from .entities import Add, add_persisted, counter, slow_add

SHARDS = 4
CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=SHARDS)
WAIT_S = 10.0
POLL_S = 0.01

Parked = Entity("Parked", shard_group="parked")
"""Its group is hosted by no runner: what is sent to it waits in storage."""
park = Parked.rpc("park", Add, int, persisted=True)
PARKED_IDS = ("p0", "p1", "p2", "p3", "p4")


class StatusStore(Storage, StatusStorage, Protocol):
    """A storage the runtime can run on and the status view can read."""


def shards_of(status: ClusterStatus, group: str) -> dict[int, ShardStatus]:
    for found in status.groups:
        if found.name == group:
            return {shard.index: shard for shard in found.shards}
    return {}


async def settle(runners: list[Runner]) -> None:
    """Until every runner sees all of them, and each serves exactly its assignment."""
    addresses = {runner.address for runner in runners}
    with trio.fail_after(WAIT_S):
        for runner in runners:
            while set(runner.assignment.values()) != addresses:
                await runner.changed()
        for runner in runners:
            await runner.settled()


async def poll(storage: StatusStorage, condition: Callable[[ClusterStatus], bool]) -> None:
    """Read the status until ``condition`` holds: completing a request has no event here."""
    with trio.fail_after(WAIT_S):
        while True:
            if condition(await storage.read_status(shards_per_group=SHARDS)):
                return
            await trio.sleep(POLL_S)


def expect_owners(status: ClusterStatus, runners: list[Runner]) -> None:
    """The status's default shards are owned, under the epochs, as the runners hold them."""
    held = {
        shard.index: (runner.machine_id, lease.epoch)
        for runner in runners
        for shard, lease in runner.shards.items()
    }
    listed = shards_of(status, "default")
    assert {index: (s.owner, s.epoch) for index, s in listed.items()} == held
    assert sorted(held) == list(range(SHARDS))


async def check_read_status(storage: StatusStore) -> None:
    impl, probe = counter()
    async with (
        open_runner(impl, storage=storage, config=CONFIG) as first,
        open_runner(impl, storage=storage, config=CONFIG) as second,
    ):
        await settle([first, second])
        status = await storage.read_status(shards_per_group=SHARDS)
        assert [(r.machine_id, r.address, r.alive) for r in status.runners] == sorted(
            (runner.machine_id, runner.address, True) for runner in (first, second)
        )
        assert all(r.groups == ("default",) and r.weight == 1.0 for r in status.runners)
        assert all(r.registered_at is not None for r in status.runners)
        expect_owners(status, [first, second])
        assert status.totals().backlog == 0

        for entity_id in PARKED_IDS:
            await first.tell(park, entity_id, Add(1))
        blocked = shard_index("a", SHARDS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.ask, slow_add, "a", Add(1))
            with trio.fail_after(WAIT_S):
                await probe.started.wait()
            await first.tell(slow_add, "a", Add(2))
            await first.tell(add_persisted, "a", Add(3))

            status = await storage.read_status(shards_per_group=SHARDS)
            parked = Tally(Parked.shard_of(e, SHARDS).index for e in PARKED_IDS)
            assert {i: s.backlog for i, s in shards_of(status, "parked").items()} == {
                index: parked[index] for index in range(SHARDS)
            }
            assert all(s.owner is None for s in shards_of(status, "parked").values())
            default = shards_of(status, "default")
            assert {i: s.backlog for i, s in default.items() if s.backlog} == {blocked: 3}
            age = default[blocked].oldest_age
            assert age is not None and age >= 0
            assert status.totals() == Totals(
                runners_alive=2, runners=2, shards_owned=SHARDS, shards=2 * SHARDS, backlog=8
            )
            # Without the layout, only shards storage knows of are listed.
            bare = await storage.read_status()
            assert bare.shards_per_group is None
            assert sorted(shards_of(bare, "parked")) == sorted(parked)
            probe.release.set()
        await poll(storage, lambda s: s.totals().backlog == len(PARKED_IDS))

    # Both runners left (unregistered): none is listed, nobody owns a shard.
    status = await storage.read_status(shards_per_group=SHARDS)
    assert status.runners == ()
    assert status.totals().shards_owned == 0
    assert status.totals().backlog == len(PARKED_IDS)
