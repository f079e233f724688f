"""Broadcast on three in-process runners over the memory storage (the scenarios of
``tests.broadcast_scenarios``; ``tests/postgres/test_broadcast.py`` runs them on
PostgreSQL), and the mistakes a caller can make."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from trio_cluster import RESIDENT, MemoryStorage, RunnerHandler, Storage, open_runner

from . import broadcast_scenarios as scenarios
from .broadcast_scenarios import Nothing, note, where, whoami


@asynccontextmanager
async def memory() -> AsyncIterator[Storage]:
    yield MemoryStorage()


async def test_runner_broadcast() -> None:
    await scenarios.runner_broadcast_reaches_every_live_runner(memory)


async def test_resident_broadcast() -> None:
    await scenarios.resident_broadcast_reaches_every_resident_entity_once(memory)


async def test_persisted_stored_broadcast_and_its_retry() -> None:
    await scenarios.persisted_stored_broadcast_runs_once_per_entity_across_retries(memory)


async def test_volatile_stored_broadcast_and_its_deadline() -> None:
    await scenarios.volatile_stored_broadcast_under_a_deadline(memory)


@pytest.mark.parametrize("persisted", [True, False], ids=["persisted", "volatile"])
async def test_a_runner_leaving_mid_broadcast(persisted: bool) -> None:
    await scenarios.a_runner_leaving_mid_broadcast(memory, persisted=persisted)


async def test_mistakes_are_refused_before_anything_is_sent() -> None:
    async def answer(_: Nothing) -> str:
        return ""

    with pytest.raises(ValueError, match="volatile"):
        RunnerHandler(note, answer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RunnerHandler"):
        async with open_runner(runner_handlers=[answer]):
            pass
    with pytest.raises(ValueError, match="two handlers"):
        async with open_runner(runner_handlers=[RunnerHandler(whoami, answer)] * 2):
            pass
    async with open_runner() as runner:
        with pytest.raises(ValueError, match="RESIDENT or STORED"):
            await runner.broadcast(where, Nothing(), to="everyone")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="concurrency"):
            await runner.broadcast(where, Nothing(), to=RESIDENT, concurrency=0)
        with pytest.raises(TypeError, match="Rpc"):
            await runner.broadcast("where", Nothing(), to=RESIDENT)  # type: ignore[arg-type]
