"""Property tests of the message lifecycle: dedup, full mailboxes, passivation.

Each example is a whole runner under Trio's MockClock, driven by a schedule
hypothesis chooses: who sends what, in which order, with how many yields
in between, and how the clock moves. The assertions are the guarantees:
no acknowledged message is lost or run twice, duplicates share one reply,
and one sender's messages reach an entity in order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable

import attrs
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import EntityOptions
from trio_cluster.testing import TEST_CONFIG, open_test_runner

from .entities import Add, Block, add, add_once, add_persisted, block, counter


def run_mocked(main: Callable[[], Awaitable[None]]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@given(
    sends=st.lists(
        st.tuples(st.sampled_from(["k1", "k2", "k3"]), st.integers(0, 5), st.booleans()),
        min_size=1,
        max_size=25,
    ),
    capacity=st.integers(1, 4),
)
def test_duplicate_persisted_sends_run_each_key_once(
    sends: list[tuple[str, int, bool]], capacity: int
) -> None:
    async def main() -> None:
        impl, probe = counter(EntityOptions(mailbox_capacity=capacity))
        replies: defaultdict[str, list[int]] = defaultdict(list)
        async with open_test_runner(impl) as (runner, _):

            async def send(key: str, yields: int, wait: bool) -> None:
                for _ in range(yields):
                    await trio.lowlevel.checkpoint()
                if wait:
                    replies[key].append(await runner.ask(add_once, "acct", Add(1, key=key)))
                else:
                    await runner.tell(add_once, "acct", Add(1, key=key))

            async with trio.open_nursery() as nursery:
                for key, yields, wait in sends:
                    nursery.start_soon(send, key, yields, wait)
            keys = {key for key, _, _ in sends}
            await probe.wait_until(lambda: len(probe.order) == len(keys))
            for key in keys:
                assert probe.runs[f"acct/add_once/{key}"] == 1
            for key, answers in replies.items():
                assert len(set(answers)) == 1, (key, answers)
            # Every key was applied exactly once, whatever the interleaving.
            assert sorted(probe.runs.values()) == [1] * len(keys)

    run_mocked(main)


@given(
    targets=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    capacity=st.integers(1, 3),
    block_first=st.booleans(),
)
def test_full_mailboxes_never_lose_or_reorder_persisted_messages(
    targets: list[int], capacity: int, block_first: bool
) -> None:
    async def main() -> None:
        impl, probe = counter(EntityOptions(mailbox_capacity=capacity))
        async with open_test_runner(impl) as (runner, _):
            if block_first:
                await runner.tell(block, "e0", Block())
                await probe.started.wait()
            for sequence, target in enumerate(targets):
                await runner.tell(add_persisted, f"e{target}", Add(sequence))
            probe.release.set()
            await probe.wait_until(lambda: len(probe.order) == len(targets))
        received: defaultdict[str, list[int]] = defaultdict(list)
        for entity_id, sequence in probe.order:
            received[entity_id].append(sequence)
        sent: defaultdict[str, list[int]] = defaultdict(list)
        for sequence, target in enumerate(targets):
            sent[f"e{target}"].append(sequence)
        assert received == sent

    run_mocked(main)


operation = st.one_of(
    st.tuples(st.just("tell"), st.integers(0, 6)),
    st.tuples(st.just("tell_persisted"), st.integers(0, 6)),
    st.tuples(st.just("sleep"), st.integers(0, 3)),
)


@given(
    operations=st.lists(operation, min_size=1, max_size=40),
    max_resident=st.integers(1, 3),
    idle_seconds=st.integers(1, 3),
)
def test_passivation_and_the_resident_cap_never_drop_a_message(
    operations: list[tuple[str, int]], max_resident: int, idle_seconds: int
) -> None:
    async def main() -> None:
        impl, probe = counter(EntityOptions(max_idle_time=float(idle_seconds)))
        config = attrs.evolve(TEST_CONFIG, max_resident_entities=max_resident)
        expected: defaultdict[str, int] = defaultdict(int)
        async with open_test_runner(impl, config=config) as (runner, _):
            for kind, argument in operations:
                if kind == "sleep":
                    await trio.sleep(argument)
                    continue
                entity_id = f"e{argument}"
                rpc = add if kind == "tell" else add_persisted
                await runner.tell(rpc, entity_id, Add(1))
                expected[entity_id] += 1
            total = sum(expected.values())
            await probe.wait_until(lambda: len(probe.order) == total)
            # Wait out every idle timer: everything passivates, nothing is left.
            await trio.sleep(idle_seconds + 1)
            assert len(runner.resident) == 0
        handled: defaultdict[str, int] = defaultdict(int)
        for entity_id, _ in probe.order:
            handled[entity_id] += 1
        assert handled == expected

    run_mocked(main)
