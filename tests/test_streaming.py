"""Streaming replies: chunks in order under a credit window, here and across runners.

Back-pressure is checked on the handler's own record: it reaches the
window's end and, with nothing consumed, goes no further. Cancellation is
checked by the handler's ``finally`` running. No sleeps: events and
``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import (
    AlreadyProcessingMessage,
    Entity,
    MalformedMessage,
    RpcClientError,
    Runner,
    RunnerUnavailable,
    SendTimeout,
    ShardId,
)
from trio_cluster.core import reply as replies
from trio_cluster.core.streaming import MAX_WINDOW, CreditWindow, granted
from trio_cluster.testing import TEST_CONFIG, open_test_cluster, open_test_runner

from .interrupt_entities import Recorder
from .stream_entities import (
    Count,
    Exhausted,
    Relay,
    Tick,
    Ticker,
    arm_stream,
    count,
    relay,
    stall,
    tickers,
)


@asynccontextmanager
async def stream_caller(where: str) -> AsyncIterator[tuple[Runner, Recorder]]:
    """A runner to stream from: the owner of the Ticker ``t`` itself, or another runner."""
    impl, recorder = tickers()
    if where == "local":
        async with open_test_runner(impl) as (runner, _):
            yield runner, recorder
        return
    async with open_test_cluster(impl, runners=2) as cluster:
        shard = Ticker.shard_of("t", TEST_CONFIG.shards_per_group)
        yield next(r for r in cluster.runners if shard not in r.shards), recorder


WHERE = pytest.mark.parametrize("where", ["local", "remote"])


def produced(recorder: Recorder) -> list[int]:
    return [n for what, n in recorder.events if what == "produced"]


async def closed(recorder: Recorder) -> int:
    """Wait for the handler's ``finally``; the chunk index it ran at."""
    await recorder.wait_until(lambda: any(what == "closed" for what, _ in recorder.events))
    return next(n for what, n in recorder.events if what == "closed")


@WHERE
async def test_chunks_arrive_in_order_and_the_stream_ends(where: str) -> None:
    async with stream_caller(where) as (runner, recorder):
        async with runner.stream(count, "t", Count(100), window=3) as chunks:
            assert runner.snapshot().waiting_callers == 1
            assert [tick.i async for tick in chunks] == list(range(100))
        await recorder.wait_for("closed", 100)
        assert runner.snapshot().waiting_callers == 0


@WHERE
async def test_the_handler_runs_at_most_the_window_ahead(where: str) -> None:
    window = 4
    async with stream_caller(where) as (runner, recorder):
        async with runner.stream(count, "t", Count(-1), window=window) as chunks:
            # window chunks sent, the next one made and held at its yield.
            await recorder.wait_for("produced", window)
            await trio.testing.wait_all_tasks_blocked()
            assert produced(recorder) == list(range(window + 1))
            # Credits go back by half windows: one chunk consumed frees none...
            assert (await anext(chunks)).i == 0
            await trio.testing.wait_all_tasks_blocked()
            assert produced(recorder) == list(range(window + 1))
            # ...two free two.
            assert (await anext(chunks)).i == 1
            await recorder.wait_for("produced", window + 2)
            await trio.testing.wait_all_tasks_blocked()
            assert produced(recorder) == list(range(window + 3))
        # Leaving the block interrupted the handler at its yield.
        await recorder.wait_for("closed", window + 2)


@WHERE
async def test_leaving_the_iteration_early_runs_the_handlers_finally(where: str) -> None:
    async with stream_caller(where) as (runner, recorder):
        async with runner.stream(count, "t", Count(-1), window=2) as chunks:
            async for tick in chunks:
                if tick.i == 5:
                    break
        # Interrupted at a yield up to the window ahead of what was consumed.
        assert 6 <= await closed(recorder) <= 6 + 2
        # The entity serves on.
        async with runner.stream(count, "t", Count(2)) as chunks:
            assert [tick.i async for tick in chunks] == [0, 1]


@WHERE
async def test_a_cancelled_caller_cancels_the_handler_between_yields(where: str) -> None:
    async with stream_caller(where) as (runner, recorder):
        with trio.CancelScope() as scope:
            async with runner.stream(stall, "t", Count(3)) as chunks:
                assert [(await anext(chunks)).i for _ in range(3)] == [0, 1, 2]
                await recorder.wait_for("waiting", 3)
                scope.cancel()
                await anext(chunks)
        await recorder.wait_for("closed", 3)


@WHERE
async def test_a_declared_error_ends_the_stream_after_its_chunks(where: str) -> None:
    async with stream_caller(where) as (runner, recorder):
        received: list[int] = []
        with pytest.raises(Exhausted, match="gave up at 3"):
            async with runner.stream(count, "t", Count(10, fail_at=3)) as chunks:
                async for tick in chunks:  # a loop: the chunks before the error are kept
                    received.append(tick.i)  # noqa: PERF401
        assert received == [0, 1, 2]
        await recorder.wait_for("closed", 3)


@WHERE
async def test_a_defect_ends_the_stream_unretried(where: str) -> None:
    async with stream_caller(where) as (runner, recorder):
        received: list[int] = []
        with pytest.raises(RpcClientError, match="broke at 2"):
            async with runner.stream(count, "t", Count(10, defect_at=2)) as chunks:
                async for tick in chunks:  # a loop: the chunks before the error are kept
                    received.append(tick.i)  # noqa: PERF401
        assert received == [0, 1]
        assert produced(recorder) == [0, 1]  # not run again: its chunks would repeat


@WHERE
async def test_no_chunk_within_the_timeout_raises_send_timeout_and_interrupts(
    where: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with stream_caller(where) as (runner, recorder):
        with pytest.raises(SendTimeout, match="no chunk"):
            async with runner.stream(stall, "t", Count(1), timeout=5.0) as chunks:
                async for _ in chunks:
                    pass
        await recorder.wait_for("closed", 1)


async def test_a_stream_whose_link_closes_ends_there_and_its_handler_here() -> None:
    impl, recorder = tickers()
    async with open_test_cluster(impl, runners=2) as cluster:
        shard = Ticker.shard_of("t", TEST_CONFIG.shards_per_group)
        owner = next(r for r in cluster.runners if shard in r.shards)
        sender = next(r for r in cluster.runners if r is not owner)
        received: list[int] = []
        with pytest.raises(RunnerUnavailable):
            async with sender.stream(count, "t", Count(-1), window=4) as chunks:
                await recorder.wait_for("produced", 4)
                assert sender._router.network is not None
                sender._router.network._links[owner.address].close("going away")
                async for tick in chunks:  # a loop: the chunks before the error are kept
                    received.append(tick.i)  # noqa: PERF401
        assert received == [0, 1, 2, 3]
        assert await closed(recorder) == 4  # interrupted at its yield, waiting for credit
        assert owner.snapshot().defects == 0


class _WrongOnce(dict[ShardId, str]):
    """An assignment naming ``wrong`` as the owner of ``shard`` the first time only."""

    def __init__(self, real: dict[ShardId, str], shard: ShardId, wrong: str) -> None:
        super().__init__(real)
        self._wrong = {shard: wrong}

    def get(self, key: ShardId, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._wrong.pop(key, None) or super().get(key, default)


async def test_a_stream_sent_to_a_runner_that_does_not_own_it_is_resent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    impl, recorder = tickers()
    async with open_test_cluster(impl, runners=3) as cluster:
        shard = Ticker.shard_of("t", TEST_CONFIG.shards_per_group)
        owner = next(r for r in cluster.runners if shard in r.shards)
        sender, bystander = [r for r in cluster.runners if r is not owner]
        router = sender._router
        router.assignment = _WrongOnce(router.assignment, shard, bystander.address)
        async with sender.stream(count, "t", Count(5)) as chunks:
            assert [tick.i async for tick in chunks] == list(range(5))
        assert produced(recorder) == list(range(5))  # run once, by the owner
        assert bystander.snapshot().refused == 1


@WHERE
async def test_a_stream_that_never_starts_raises_send_timeout_and_is_interrupted(
    where: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with stream_caller(where) as (runner, recorder):
        with pytest.raises(SendTimeout, match="did not start"):
            async with runner.stream(stall, "t", Count(0), timeout=5.0):
                pass  # pragma: no cover
        await recorder.wait_for("closed", 0)


async def test_an_entity_streams_from_another_but_not_from_itself() -> None:
    impl, _ = tickers()
    async with open_test_runner(impl) as (runner, _):
        assert await runner.ask(relay, "a", Relay("b", 3)) == [0, 1, 2]
        with pytest.raises(AlreadyProcessingMessage):
            await runner.ask(relay, "a", Relay("a", 3))  # a call cycle, refused


async def test_a_stream_is_refused_by_ask_and_an_rpc_by_stream() -> None:
    impl, _ = tickers()
    async with open_test_runner(impl) as (runner, _):
        with pytest.raises(TypeError, match="is a stream"):
            await runner.ask(count.rpc, "t", Count(1))
        with pytest.raises(TypeError, match="window"):
            async with runner.stream(count, "t", Count(1), window=0):
                pass  # pragma: no cover
        assert "no stream" in await runner.ask(arm_stream, "t", Count(1))


async def test_a_plain_request_for_a_stream_rpc_is_malformed() -> None:
    # What an older or hostile peer may send: a Request without a window.
    impl, recorder = tickers()
    async with open_test_runner(impl) as (runner, _):
        envelope = runner.client._envelope(
            count.rpc, "t", Count(1), chain=(), deliver_at=None, headers=None, stream=True
        )
        reply = await runner.client._send_volatile(envelope, True, math.inf)
        assert reply is not None
        with pytest.raises(MalformedMessage, match="is a stream, sent as a request"):
            replies.decode(reply, count.rpc.success_decoder, {})
    assert recorder.events == []


def test_a_stream_handler_must_be_an_async_generator() -> None:
    entity = Entity("Other")
    other = entity.stream("s", Count, Tick)

    class Wrong:
        def __init__(self, ctx: object) -> None:
            pass

        @other.rpc.handler
        async def s(self, job: Count) -> Tick:
            return Tick(0)

    with pytest.raises(TypeError, match="as an async generator"):
        entity.implement(Wrong)


# -- the credit window, as pure logic ---------------------------------------------------


@given(
    st.integers(min_value=1, max_value=64),
    st.lists(st.sampled_from(["produce", "consume"]), max_size=300),
)
def test_the_window_bounds_what_waits_and_never_stalls(window: int, steps: list[str]) -> None:
    credit = CreditWindow(window)
    producer = window  # the producer's own count of its credit
    waiting = 0
    for step in steps:
        if step == "produce" and producer:
            producer -= 1
            assert credit.arrived()
            waiting += 1
        elif step == "consume" and waiting:
            waiting -= 1
            producer = granted(producer, credit.consumed(), window)
        assert waiting <= window
        assert producer == credit.credit
        # Never both stuck: out of credit means something waits to be consumed.
        assert producer or waiting


def test_a_chunk_without_credit_is_refused() -> None:
    credit = CreditWindow(1)
    assert credit.arrived()
    assert not credit.arrived()
    with pytest.raises(ValueError, match="window"):
        CreditWindow(MAX_WINDOW + 1)
    assert granted(0, 10**9, 8) == 8
    assert granted(3, -5, 8) == 3
