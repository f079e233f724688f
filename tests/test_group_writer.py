"""The group-commit writer's turns: a lone write in its caller's task, the rest batched.

The write function here is a stand-in the test controls (each call blocks until
released), so the tests see which task wrote what, in which batch and order;
the SQL behind the real write functions is tested against PostgreSQL in
tests/postgres/test_group_commit.py.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_cluster.errors import ClusterError, PersistenceError
from trio_cluster.postgres.writer import GroupWriter


class Server:
    """Records each statement (its batch and the task that sent it); holds it while
    ``hold`` is set, so writes can be made to arrive while one is out."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.tasks: list[trio.lowlevel.Task] = []
        self.out = 0
        self.most_out = 0
        self.hold = False
        self.release = trio.Event()

    async def write(self, batch: list[int]) -> list[int | ClusterError]:
        self.batches.append(list(batch))
        self.tasks.append(trio.lowlevel.current_task())
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            if self.hold:
                await self.release.wait()
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self.out -= 1
        return [item * 10 for item in batch]


async def test_a_lone_write_is_made_by_its_callers_task() -> None:
    server = Server()
    writer = GroupWriter("test", server.write)
    async with writer.running():
        assert await writer.submit(1) == 10
        assert await writer.submit(2) == 20
    assert server.batches == [[1], [2]]
    assert server.tasks == [trio.lowlevel.current_task()] * 2


async def test_writes_arriving_during_a_lone_write_wait_and_go_together_after_it() -> None:
    server = Server()
    server.hold = True
    writer = GroupWriter("test", server.write)
    results: dict[int, int] = {}

    async def submit(item: int) -> None:
        results[item] = await writer.submit(item)

    async with writer.running(), trio.open_nursery() as nursery:
        nursery.start_soon(submit, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert server.batches == [[1]]  # out, held
        for item in (2, 3, 4):
            nursery.start_soon(submit, item)
            await trio.testing.wait_all_tasks_blocked()
        assert server.batches == [[1]]  # the others wait their turn
        server.hold = False
        server.release.set()
    assert server.batches == [[1], [2, 3, 4]]
    assert results == {1: 10, 2: 20, 3: 30, 4: 40}
    assert server.most_out == 1


async def test_after_a_batch_of_several_writes_go_through_the_writer_until_one_is_alone() -> None:
    """Under load the callers of one batch write again together: the writer takes
    them in one statement, rather than the first alone and the rest after it."""
    server = Server()
    server.hold = True
    writer = GroupWriter("test", server.write)
    me = trio.lowlevel.current_task()
    async with writer.running():
        async with trio.open_nursery() as nursery:
            for item in (1, 2, 3):
                nursery.start_soon(writer.submit, item)
                await trio.testing.wait_all_tasks_blocked()
            server.hold = False
            server.release.set()
        assert server.batches == [[1], [2, 3]]
        await writer.submit(4)  # after a batch of two: through the writer, alone
        await writer.submit(5)  # after a batch of one: in this task
    assert server.batches[2:] == [[4], [5]]
    assert server.tasks[2] is not me
    assert server.tasks[3] is me


async def test_a_write_right_after_a_lone_one_does_not_pass_one_the_writer_holds() -> None:
    """The caller of a lone write writes again at once, while the writer, woken by
    the lone write's end, has not run yet but holds a write that came before."""
    server = Server()
    server.hold = True
    writer = GroupWriter("test", server.write)

    async def caller() -> None:
        await writer.submit(1)
        await writer.submit(3)

    async with writer.running(), trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer.submit, 2)
        await trio.testing.wait_all_tasks_blocked()  # the writer holds 2, waits its turn
        server.hold = False
        server.release.set()
    assert server.batches == [[1], [2, 3]]


async def test_a_write_handed_to_the_waiting_writer_is_not_overtaken() -> None:
    """The channel hands a write straight to a writer waiting to receive, before that
    writer runs: a lone write begun right then must still come after it. Each
    round races the two (Trio orders a scheduling batch at random); every write
    takes its number as it is submitted, so the statements must come in order."""
    for _ in range(40):
        assert await race_a_lone_write_with_a_handed_one() == [0, 1, 2]


async def race_a_lone_write_with_a_handed_one() -> list[int]:
    server = Server()
    server.hold = True
    writer = GroupWriter("test", server.write)
    numbers = itertools.count()

    async def submit_next() -> None:
        await writer.submit(next(numbers))

    async def caller() -> None:
        await submit_next()  # alone, held
        await submit_next()  # right after it

    async with writer.running(), trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        server.hold = False
        nursery.start_soon(submit_next)
        server.release.set()
    return [item for batch in server.batches for item in batch]


async def test_a_write_the_writer_holds_fails_when_the_storage_closes() -> None:
    server = Server()
    server.hold = True
    writer = GroupWriter("test", server.write)
    outcome: list[BaseException] = []

    async def queued() -> None:
        try:
            await writer.submit(2)
        except PersistenceError as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        async with writer.running():
            nursery.start_soon(writer.submit, 1)  # alone, held
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(queued)  # the writer takes it and waits its turn
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1):
            while not outcome:
                await trio.testing.wait_all_tasks_blocked()
        server.release.set()
    assert "closed" in str(outcome[0])
    assert server.batches == [[1]]


@settings(deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_writes_are_made_one_statement_at_a_time_in_the_order_they_came(
    pauses: list[int],
) -> None:
    """Whatever mix of lone and queued writes the arrivals make (a pause lets what
    is out finish), every write is made once, in arrival order, one at a time."""

    async def main() -> None:
        server = Server()
        writer = GroupWriter("test", server.write)
        async with writer.running(), trio.open_nursery() as nursery:
            for item, pause in enumerate(pauses):
                nursery.start_soon(writer.submit, item)
                await trio.testing.wait_all_tasks_blocked()  # it has begun or queued
                for _ in range(pause):
                    await trio.lowlevel.checkpoint()
        assert [item for batch in server.batches for item in batch] == list(range(len(pauses)))
        assert server.most_out == 1

    trio.run(main)


async def test_a_lone_write_after_the_writer_stopped_fails_like_a_queued_one() -> None:
    server = Server()
    writer = GroupWriter("test", server.write)
    async with writer.running():
        pass
    with pytest.raises(PersistenceError, match="closed"):
        await writer.submit(1)
    assert server.batches == []
