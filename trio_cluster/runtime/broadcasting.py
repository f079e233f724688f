"""Broadcasts: find the targets, deliver to each under one deadline, collect the outcomes.

Targets are found page by page (stored state ids from the state storage;
resident ids by a runner message to each live runner) and fed through a
channel of ``concurrency`` places to ``concurrency`` senders, so listing
never runs far ahead of delivery and at most ``concurrency`` requests are
in flight. Each delivery is an ordinary ``ask``: a volatile one fails on its
own (best effort), a persisted one is stored under the broadcast's primary
key, so a broadcast run again with the same id finds its requests already
stored and delivers nothing twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import trio

from ..broadcast import RESIDENT, STORED, Audience, BroadcastOutcome, BroadcastResult, broadcast_key
from ..config import ShardingConfig
from ..core import reply as replies
from ..entity import Rpc
from ..errors import ClusterError, SendTimeout
from ..storage.base import RunnerStorage, StateStorage
from .client import Client
from .runner_calls import RESIDENT_PAGE, ResidentPage, RunnerCalls, resident_ids

P = TypeVar("P")
S = TypeVar("S")

STORED_PAGE = 1000
"""Ids per read of the stored state ids."""
MAX_CONCURRENCY = 1024


class _Collector:
    """The outcomes so far: kept in a mapping, or passed on and only counted."""

    def __init__(self, on_outcome: Callable[[str, BroadcastOutcome[Any]], None] | None) -> None:
        self.outcomes: dict[str, BroadcastOutcome[Any]] = {}
        self.delivered = 0
        self.failed = 0
        self._on_outcome = on_outcome

    def add(self, target: str, outcome: BroadcastOutcome[Any]) -> None:
        if outcome.ok:
            self.delivered += 1
        else:
            self.failed += 1
        if self._on_outcome is None:
            self.outcomes[target] = outcome
        else:
            self._on_outcome(target, outcome)


class Broadcaster:
    def __init__(
        self,
        *,
        config: ShardingConfig,
        client: Client,
        calls: RunnerCalls,
        runners: RunnerStorage,
        states: StateStorage,
    ) -> None:
        self._config = config
        self._client = client
        self._calls = calls
        self._runners = runners
        self._states = states

    def _deadline(self, timeout: float | None) -> float:
        limit = self._config.send_timeout if timeout is None else timeout
        return trio.current_time() + limit if limit > 0 else math.inf

    async def to_runners(
        self,
        rpc: Rpc[P, S],
        payload: P,
        *,
        timeout: float | None,  # noqa: ASYNC109 - SendTimeout is part of the contract
    ) -> BroadcastResult[S]:
        """Send a runner message to every live runner; one outcome per runner address."""
        _check_payload(rpc, payload, self._config)
        deadline = self._deadline(timeout)
        addresses = sorted({spec.address for spec in await self._runners.live_runners()})
        collected = _Collector(None)

        async def one(address: str) -> None:
            def ask(remaining: float) -> Awaitable[S]:
                return self._calls.ask(address, rpc, payload, timeout=remaining)

            collected.add(address, await _attempt(ask, rpc, address, deadline))

        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(one, address)
        return _result(str(self._client.generate_id()), collected, {})

    async def to_entities(
        self,
        rpc: Rpc[P, S],
        payload: P,
        *,
        to: Audience,
        broadcast_id: str | None,
        concurrency: int,
        timeout: float | None,  # noqa: ASYNC109 - SendTimeout is part of the contract
        on_outcome: Callable[[str, BroadcastOutcome[S]], None] | None,
    ) -> BroadcastResult[S]:
        """Send ``rpc`` to every entity of its type that ``to`` names."""
        _check_payload(rpc, payload, self._config)
        if to not in (RESIDENT, STORED):
            raise ValueError(f"to must be RESIDENT or STORED (got {to!r})")
        if not (isinstance(concurrency, int) and 1 <= concurrency <= MAX_CONCURRENCY):
            raise ValueError(f"concurrency must be an int in 1..{MAX_CONCURRENCY}")
        broadcast_id = str(self._client.generate_id()) if broadcast_id is None else broadcast_id
        if not isinstance(broadcast_id, str) or not broadcast_id:
            raise TypeError("broadcast_id must be a non-empty str")
        key = broadcast_key(broadcast_id) if rpc.persisted else None
        deadline = self._deadline(timeout)
        collected = _Collector(on_outcome)
        unlisted: dict[str, ClusterError] = {}

        async def deliver(entity_id: str) -> BroadcastOutcome[S]:
            def ask(remaining: float) -> Awaitable[S]:
                return self._client.ask(rpc, entity_id, payload, timeout=remaining, primary_key=key)

            return await _attempt(ask, rpc, entity_id, deadline)

        async def sender(ids: trio.MemoryReceiveChannel[str]) -> None:
            async with ids:
                async for entity_id in ids:
                    collected.add(entity_id, await deliver(entity_id))

        send, receive = trio.open_memory_channel[str](concurrency)
        listing = (
            self._stored(rpc, unlisted) if to == STORED else self._resident(rpc, unlisted, deadline)
        )
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(sender, receive.clone())
            receive.close()
            async with send, contextlib.aclosing(listing):
                with trio.move_on_at(deadline) as listed:
                    async for entity_id in listing:
                        await send.send(entity_id)
                if listed.cancelled_caught:
                    unlisted[to] = SendTimeout("the broadcast's deadline passed while listing")
        return _result(broadcast_id, collected, unlisted)

    def _listing(
        self, address: str, query: ResidentPage
    ) -> Callable[[float], Awaitable[list[str]]]:
        def ask(remaining: float) -> Awaitable[list[str]]:
            return self._calls.ask(address, resident_ids, query, timeout=remaining)

        return ask

    async def _stored(
        self, rpc: Rpc[Any, Any], unlisted: dict[str, ClusterError]
    ) -> AsyncGenerator[str]:
        after = ""
        while True:
            try:
                page = await self._states.state_ids(rpc.entity.name, after=after, limit=STORED_PAGE)
            except ClusterError as error:
                unlisted[STORED] = error
                return
            for entity_id in page:
                yield entity_id
            if len(page) < STORED_PAGE:
                return
            after = page[-1]

    async def _resident(
        self, rpc: Rpc[Any, Any], unlisted: dict[str, ClusterError], deadline: float
    ) -> AsyncGenerator[str]:
        """Each live runner's resident ids of the type, each id once (an entity moving
        between runners may be resident on two for a moment)."""
        try:
            addresses = sorted({spec.address for spec in await self._runners.live_runners()})
        except ClusterError as error:
            unlisted[RESIDENT] = error
            return
        seen: set[str] = set()
        for address in addresses:
            after = ""
            while True:
                query = ResidentPage(rpc.entity.name, after, RESIDENT_PAGE)
                listed = await _attempt(
                    self._listing(address, query), resident_ids, address, deadline
                )
                if listed.error is not None:
                    assert isinstance(listed.error, ClusterError)
                    unlisted[address] = listed.error
                    break
                page = listed.value or []
                for entity_id in page:
                    if entity_id not in seen:
                        seen.add(entity_id)
                        yield entity_id
                if len(page) < RESIDENT_PAGE:
                    break
                after = page[-1]


async def _attempt(
    ask: Callable[[float], Awaitable[S]], rpc: Rpc[Any, S], target: str, deadline: float
) -> BroadcastOutcome[S]:
    """One delivery within what is left of the deadline; its failure is its outcome."""
    remaining = deadline - trio.current_time()
    if remaining <= 0:
        return BroadcastOutcome(
            error=SendTimeout("the broadcast's deadline passed", entity_id=target)
        )
    caught: tuple[type[Exception], ...] = (ClusterError, *rpc.errors)
    try:
        value = await ask(remaining)
    except caught as error:
        return BroadcastOutcome(error=error)
    return BroadcastOutcome(value)


def _check_payload(rpc: Rpc[Any, Any], payload: object, config: ShardingConfig) -> None:
    """Refuse a payload that cannot be sent before anything is sent."""
    if not isinstance(rpc, Rpc):
        raise TypeError(f"broadcast takes an Rpc (got {rpc!r})")
    replies.encode_payload(payload, config.max_message_size)


def _result(
    broadcast_id: str, collected: _Collector, unlisted: dict[str, ClusterError]
) -> BroadcastResult[Any]:
    return BroadcastResult(
        broadcast_id=broadcast_id,
        outcomes=collected.outcomes,
        delivered=collected.delivered,
        failed=collected.failed,
        unlisted=unlisted,
    )
