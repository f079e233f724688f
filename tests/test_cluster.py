"""Several runners in one process, over the real routing code and real sockets."""

from __future__ import annotations

import trio

from trio_cluster import MemoryStorage, open_runner
from trio_cluster.core.assignment import RunnerSpec
from trio_cluster.testing import TEST_CONFIG, open_test_cluster
from trio_cluster.transport.network import TransportConfig

from .entities import Add, Get, add, add_once, add_persisted, counter, get


async def test_asks_cross_runners_to_the_shard_owner() -> None:
    impl, probe = counter()
    async with open_test_cluster(impl, runners=3) as cluster:
        first = cluster.runners[0]
        remote = next(
            f"e{n}" for n in range(100) if cluster.owner_of(impl.entity, f"e{n}") is not first
        )
        assert await first.ask(add, remote, Add(2)) == 2
        assert await first.ask(add_persisted, remote, Add(3)) == 5
        assert await first.ask(add_once, remote, Add(4, key="k")) == 9
        assert await cluster.runners[1].ask(add_once, remote, Add(4, key="k")) == 9
        assert await cluster.runners[2].ask(get, remote, Get()) == 9
        assert probe.runs[f"{remote}/add_once/k"] == 1
        owner = cluster.owner_of(impl.entity, remote)
        assert f"Counter/{remote}" in owner.resident
        assert all(f"Counter/{remote}" not in r.resident for r in cluster.runners if r is not owner)


async def test_every_shard_has_exactly_one_owner() -> None:
    impl, _ = counter()
    async with open_test_cluster(impl, runners=3) as cluster:
        owned = [set(runner.shards) for runner in cluster.runners]
        assert sum(len(shards) for shards in owned) == TEST_CONFIG.shards_per_group
        assert set().union(*owned) == {s for s in cluster.runners[0].assignment}
        assert all(owned)  # everyone got some


async def test_runners_join_and_leave_under_traffic_without_a_failed_request() -> None:
    impl, probe = counter()
    storage = MemoryStorage()
    errors: list[Exception] = []
    answered = 0
    async with open_test_cluster(impl, runners=2, storage=storage) as cluster:
        sender = cluster.runners[0]
        stop = trio.Event()

        async def traffic(worker: int) -> None:
            nonlocal answered
            n = 0
            while not stop.is_set():
                try:
                    await sender.ask(add, f"w{worker}-{n % 7}", Add(1))
                    answered += 1
                except Exception as error:
                    errors.append(error)
                n += 1

        async with trio.open_nursery() as nursery:
            for worker in range(4):
                nursery.start_soon(traffic, worker)
            async with open_runner(
                impl, storage=storage, config=TEST_CONFIG, transport=TransportConfig()
            ) as newcomer:
                cluster.runners.append(newcomer)
                await cluster.settled()
                assert newcomer.shards
                cluster.runners.remove(newcomer)
            # The newcomer left again: its shards went back to the others.
            await cluster.settled()
            before = answered
            while answered < before + 50:
                await probe.wait_until(lambda: answered >= before + 50)
            stop.set()
    assert errors == []
    assert len(probe.order) == answered


async def test_garbage_on_the_wire_closes_only_that_connection() -> None:
    impl, _ = counter()
    async with open_test_cluster(impl, runners=2) as cluster:
        target = cluster.runners[1]
        host, _, port = target.address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"\x00\x00\x00\x05hello, this is not msgpack")
        with trio.fail_after(5):
            assert await stream.receive_some(4096) is not None  # a Reject, then EOF
        await stream.aclose()
        remote = next(
            f"e{n}" for n in range(100) if cluster.owner_of(impl.entity, f"e{n}") is target
        )
        assert await cluster.runners[0].ask(add, remote, Add(1)) == 1


async def test_two_runners_claiming_one_address_do_not_stop_the_others() -> None:
    impl, _ = counter()
    storage = MemoryStorage()
    async with (
        open_test_cluster(impl, runners=2, storage=storage) as cluster,
        # A deployment mistake: a third runner registers an address in use.
        storage.session(RunnerSpec(cluster.runners[0].address), lambda _: None),
    ):
        await cluster.runners[1]._keeper._refresh_assignment()
        assert await cluster.runners[1].ask(add, "a", Add(1)) == 1
