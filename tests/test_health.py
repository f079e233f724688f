"""The health server: probes as the kubelet makes them and metrics as Prometheus scrapes
them, over real sockets; readiness through start, lease loss and the SIGTERM handoff."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import (
    EntityOptions,
    HealthConfig,
    MailboxFull,
    RetryPolicy,
    RpcClientError,
    Runner,
    Singleton,
    SingletonContext,
    open_runner,
)
from trio_cluster.core.reserved import singleton_shard
from trio_cluster.health import Readiness, respond
from trio_cluster.prometheus import PrometheusMetrics
from trio_cluster.storage.memory import MemoryStorage
from trio_cluster.testing import TEST_CONFIG

from .entities import (
    Add,
    Block,
    Boom,
    Get,
    Negative,
    Probe,
    add,
    add_persisted,
    block,
    boom,
    counter,
    slow_add,
)
from .entities import get as get_total
from .probe_client import get, sample
from .test_runtime import ids_on_distinct_shards, shard_of

LOCAL = HealthConfig(host="127.0.0.1", port=0)
NOT_SERVING = b"not serving every shard assigned to it\n"

# -- what is answered (pure) -----------------------------------------------------------


@given(
    st.sampled_from(["/livez", "/healthz", "/readyz", "/metrics", "/other", "/livez?x=1"]),
    st.booleans(),
)
def test_answers_follow_the_path_and_the_readiness(path: str, ready: bool) -> None:
    answer = respond("GET", path, Readiness(ready, "why"), b"m 1\n")
    if path.startswith(("/livez", "/healthz")):
        assert answer.status == 200
    elif path == "/readyz":
        assert (answer.status, answer.body) == (200 if ready else 503, b"why\n")
    elif path == "/metrics":
        assert (answer.status, answer.body) == (200, b"m 1\n")
    else:
        assert answer.status == 404


def test_only_reads_are_served() -> None:
    assert respond("POST", "/livez", Readiness(True, "")).status == 405
    assert respond("GET", "/metrics", Readiness(True, ""), None).status == 404


def test_the_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="port"):
        HealthConfig(port=70000)
    with pytest.raises(ValueError, match="max_connections"):
        HealthConfig(max_connections=0)


# -- the server ------------------------------------------------------------------------


def health_port(runner: Runner) -> int:
    assert runner.health_address is not None
    return runner.health_address[1]


async def test_probes_over_http_and_head() -> None:
    impl, _ = counter()
    async with open_runner(impl, config=TEST_CONFIG, health=LOCAL) as runner:
        port = health_port(runner)
        assert await get(port, "/livez") == (200, b"ok\n")
        assert await get(port, "/readyz") == (200, b"serving its shards\n")
        assert await get(port, "/readyz", method="HEAD") == (200, b"")
        assert (await get(port, "/nope"))[0] == 404
    with pytest.raises(OSError):
        await get(port, "/livez")  # gone with its runner


async def test_idle_surplus_and_garbage_connections_are_dropped() -> None:
    impl, _ = counter()
    config = attrs.evolve(LOCAL, max_connections=2, request_timeout=0.2)
    async with open_runner(impl, config=TEST_CONFIG, health=config) as runner:
        port = health_port(runner)
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        # Both slots are taken, so a third connection is closed as it arrives;
        # the silent ones are closed once their request timeout is over.
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        for stream in (extra, *silent):
            with trio.fail_after(5):
                assert await stream.receive_some() == b""
        garbage = await trio.open_tcp_stream("127.0.0.1", port)
        await garbage.send_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
        with trio.fail_after(5):
            assert await garbage.receive_some() == b""
        assert await get(port, "/livez") == (200, b"ok\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def listening_event() -> Iterator[trio.Event]:
    """Set when a health server says it listens (it logs that once it does)."""
    event = trio.Event()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("health server on"):
                event.set()

    logger = logging.getLogger("trio_cluster.health")
    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def probe(port: int, status: int) -> bytes:
    """Probe ``/readyz`` as the kubelet does; it must answer ``status`` (the body is the why).

    Callers wait on the runner's own events first (its settling, a lease loss
    reported synchronously, every task blocked in the handoff), so one probe
    tells the truth."""
    answer, body = await get(port, "/readyz")
    assert answer == status, body
    return body


async def test_readiness_through_start_lease_loss_and_the_handoff() -> None:
    storage = MemoryStorage()
    slow_drain = attrs.evolve(TEST_CONFIG, entity_termination_timeout=60.0)
    first_impl, first = counter(EntityOptions(mailbox_capacity=5))
    second_impl, second = counter(EntityOptions(mailbox_capacity=5))
    health = attrs.evolve(LOCAL, port=free_port())
    port = health.port
    ids = ids_on_distinct_shards(TEST_CONFIG.shards_per_group)
    entered, leave, gone = trio.Event(), trio.Event(), trio.Event()
    box: list[Runner] = []

    async def host_second() -> None:
        async with open_runner(
            second_impl, storage=storage, config=slow_drain, health=health
        ) as runner:
            box.append(runner)
            entered.set()
            await leave.wait()
        gone.set()

    async with open_runner(first_impl, storage=storage, config=slow_drain) as holder:
        # A busy entity on every shard: the holder cannot hand any shard off yet.
        for entity_id in ids:
            await holder.tell(block, entity_id, Block())
        await first.wait_until(lambda: first.running == len(ids))
        with listening_event() as listening:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(host_second)
                await listening.wait()
                # Starting: alive, but none of its shards is free yet.
                assert await get(port, "/livez") == (200, b"ok\n")
                assert await probe(port, 503) in {b"starting\n", NOT_SERVING}
                first.release.set()  # the holder drains, and hands half its shards off
                await entered.wait()
                (runner,) = box
                await runner.settled()
                assert await probe(port, 200) == b"serving its shards\n"

                # A lease lost while storage is down: not ready until it is back.
                storage.available = False
                storage.revoke(next(iter(runner.shards)))
                assert await probe(port, 503) == NOT_SERVING
                storage.available = True
                await runner.settled()
                await probe(port, 200)

                # The handoff (SIGTERM): not ready from its first moment, while it drains.
                mine = next(e for e in ids if shard_of(e) in runner.shards)
                await runner.tell(block, mine, Block())
                await second.wait_until(lambda: second.running == 1)
                leave.set()
                await trio.testing.wait_all_tasks_blocked()  # the handoff has begun
                assert await probe(port, 503) == b"leaving\n"
                assert await get(port, "/livez") == (200, b"ok\n")
                second.release.set()
                await gone.wait()
    with pytest.raises(OSError):
        await get(port, "/livez")


# -- metrics ---------------------------------------------------------------------------


async def send_traffic_and_faults(runner: Runner, probe: Probe, storage: MemoryStorage) -> None:
    """Asks with each outcome, a full mailbox, and a lease lost under a persisted ask."""
    for amount in (1, 2, 3):
        await runner.ask(add, "a", Add(amount))
    with pytest.raises(Negative):
        await runner.ask(add, "a", Add(-1))
    with pytest.raises(RpcClientError):
        await runner.ask(boom, "b", Boom(failures=100))
    await runner.ask(add_persisted, "c", Add(1))
    # A full mailbox: "d" is busy and has one message queued.
    await runner.tell(block, "d", Block())
    await probe.started.wait()
    await runner.tell(add, "d", Add(1))
    with pytest.raises(MailboxFull):
        await runner.tell(add, "d", Add(1))
    probe.release.set()
    await probe.wait_until(lambda: ("d", 1) in probe.order)
    # A lease lost under a persisted request, which is then read back and run again.
    probe.release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.ask, slow_add, "e", Add(4))
        await probe.wait_until(lambda: probe.runs["slow_add entered"] == 1)
        storage.revoke(shard_of("e"))
        await probe.wait_until(lambda: probe.runs["slow_add entered"] == 2)
        probe.release.set()


async def test_metrics_move_as_the_traffic_and_faults_predict() -> None:
    impl, probe = counter(attrs.evolve(TEST_CONFIG.entity_defaults, mailbox_capacity=1))
    storage = MemoryStorage()
    async with open_runner(impl, storage=storage, config=TEST_CONFIG, health=LOCAL) as runner:
        port = health_port(runner)

        async def scrape() -> bytes:
            status, body = await get(port, "/metrics")
            assert status == 200
            return body

        before = await scrape()
        assert sample(before, "trio_cluster_runners") == 1
        assert sample(before, "trio_cluster_shards", group="default") == len(runner.shards)
        await send_traffic_and_faults(runner, probe, storage)
        await runner.settled()
        after = await scrape()
        resident = len(runner.resident)
        shards = len(runner.shards)

    def count(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    asks = "trio_cluster_request_seconds_count"
    assert count(asks, rpc="add", kind="ask", outcome="success") == 3
    assert count(asks, rpc="add", kind="ask", outcome="error") == 1
    assert count(asks, rpc="boom", kind="ask", outcome="RpcClientError") == 1
    assert count(asks, rpc="add", kind="tell", outcome="MailboxFull") == 1
    assert count(asks, rpc="slow_add", kind="ask", outcome="success") == 1
    assert count("trio_cluster_errors_total", reason="RpcClientError") == 1
    assert count("trio_cluster_errors_total", reason="MailboxFull") == 1
    assert count("trio_cluster_refused_total", reason="MailboxFull") == 1
    assert count("trio_cluster_defects_total", entity_type="Counter", rpc="boom") == 3
    assert count("trio_cluster_handling_seconds_count", rpc="add", outcome="success") == 4
    assert count("trio_cluster_handling_seconds_count", rpc="slow_add", outcome="success") == 1
    writes = "trio_cluster_storage_write_seconds_count"
    assert count(writes, operation="request", outcome="success") == 2
    assert count(writes, operation="reply", outcome="success") == 2
    assert count("trio_cluster_redeliveries_total", entity_type="Counter") >= 1
    assert count("trio_cluster_shard_stops_total", group="default", how="lost") == 1
    assert count("trio_cluster_shard_acquisitions_total", group="default") == 1
    assert sample(after, "trio_cluster_shards", group="default") == shards
    activated = count("trio_cluster_activations_total", entity_type="Counter")
    let_go = count("trio_cluster_passivations_total", entity_type="Counter")
    assert activated >= 5
    assert sample(after, "trio_cluster_entities", entity_type="Counter") == resident
    assert activated - let_go == resident
    assert sample(after, "trio_cluster_waiting_callers") == 0


async def test_mailbox_depth_and_backlog_are_sampled_when_scraped() -> None:
    impl, probe = counter()
    metrics = PrometheusMetrics(backlog_interval=0.0)  # read the backlog at every scrape
    async with open_runner(impl, config=TEST_CONFIG, health=LOCAL, instruments=[metrics]) as runner:
        port = health_port(runner)
        await runner.tell(block, "d", Block())
        await probe.started.wait()
        await runner.tell(add, "d", Add(1))
        for amount in (1, 2, 3):
            await runner.tell(slow_add, "p", Add(amount))
        await probe.wait_until(lambda: probe.runs["slow_add entered"] == 1)
        shard = shard_of("p")
        labels = {"group": shard.group, "shard": str(shard.index)}
        _, busy = await get(port, "/metrics")
        assert sample(busy, "trio_cluster_mailbox_depth") == runner.mailbox_depth() == 3
        assert sample(busy, "trio_cluster_backlog", **labels) == 3
        assert sample(busy, "trio_cluster_backlog_oldest_seconds", **labels) >= 0
        probe.release.set()
        await probe.wait_until(lambda: probe.runs["p/slow_add/"] == 3)
        await runner.ask(get_total, "p", Get())  # after the three replies are stored
        _, idle = await get(port, "/metrics")
        assert sample(idle, "trio_cluster_mailbox_depth") == 0
        assert sample(idle, "trio_cluster_backlog", **labels) == 0


async def test_singleton_metrics_follow_its_starts_stops_and_failures() -> None:
    metrics = PrometheusMetrics()
    storage = MemoryStorage()
    running = trio.Event()

    async def flaky(ctx: SingletonContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        running.set()
        await trio.sleep_forever()

    single = Singleton("flaky", flaky, restart=RetryPolicy(base_delay=0.001, max_delay=0.001))
    labels = {"singleton": "flaky"}
    async with open_runner(
        storage=storage, config=TEST_CONFIG, singletons=[single], instruments=[metrics]
    ) as runner:
        await running.wait()
        held = metrics.exposition()
        running = trio.Event()
        storage.revoke(singleton_shard("flaky"))  # lost, then taken again under a new epoch
        with trio.fail_after(5):
            await running.wait()
        assert runner.singletons == {"flaky"}
    after = metrics.exposition()
    assert sample(held, "trio_cluster_singletons", **labels) == 1
    assert sample(held, "trio_cluster_singleton_failures_total", **labels) == 1
    assert sample(after, "trio_cluster_singletons", **labels) == 0  # released on leaving
    assert sample(after, "trio_cluster_singleton_starts_total", **labels) == 2
    assert sample(after, "trio_cluster_singleton_stops_total", how="lost", **labels) == 1
    assert sample(after, "trio_cluster_singleton_stops_total", how="released", **labels) == 1
    assert sample(after, "trio_cluster_singleton_failures_total", **labels) == 2
