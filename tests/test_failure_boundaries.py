"""Regressions of the failure-boundaries issue that need no PostgreSQL and no peer.

Each test failed on the code before the runtime was rebuilt around failure
boundaries: the runner died, or the caller got an error outside the
ClusterError family, or a handler saw another caller's context.
"""

from __future__ import annotations

import contextvars
from typing import Any

import msgspec
import pytest
import trio

from trio_cluster import (
    Entity,
    EntityContext,
    MalformedMessage,
    SerializationError,
    TransportConfig,
    open_runner,
)
from trio_cluster.core.envelope import MAX_ENTITY_ID_BYTES, MAX_HEADERS, MAX_PRIMARY_KEY_BYTES
from trio_cluster.testing import TEST_CONFIG, open_test_cluster, open_test_runner

from .entities import Add, add, counter


class Nothing(msgspec.Struct):
    pass


class Keyed(msgspec.Struct):
    key: Any


Odd = Entity("Odd")
recursive = Odd.rpc("recursive", Nothing, list[Any])
echo_size = Odd.rpc("echo_size", bytes, int)
whose_tenant = Odd.rpc("whose_tenant", Nothing, str)
keyed = Odd.rpc("keyed", Keyed, int, persisted=True, primary_key=lambda k: k.key)
broken_key = Odd.rpc("broken_key", Keyed, int, persisted=True, primary_key=lambda k: k.key["x"])
headers_seen = Odd.rpc("headers_seen", Nothing, dict[str, str])

tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="(none)")


class OddHandler:
    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @recursive.handler
    async def recursive(self, _: Nothing) -> list[Any]:
        loop: list[Any] = []
        loop.append(loop)
        return loop

    @echo_size.handler
    async def echo_size(self, data: bytes) -> int:
        return len(data)

    @whose_tenant.handler
    async def whose_tenant(self, _: Nothing) -> str:
        return tenant.get()

    @keyed.handler
    async def keyed(self, k: Keyed) -> int:
        return 1

    @broken_key.handler
    async def broken_key(self, k: Keyed) -> int:
        return 1

    @headers_seen.handler
    async def headers_seen(self, _: Nothing) -> dict[str, str]:
        return dict(self.ctx.request.headers)


ODD = Odd.implement(OddHandler)


async def test_a_reply_that_contains_itself_fails_that_request_alone() -> None:
    async with open_test_runner(ODD) as (runner, _):
        with pytest.raises(SerializationError, match="recursion"):
            await runner.ask(recursive, "a", Nothing())
        # The entity and the runner go on.
        assert await runner.ask(echo_size, "a", b"abc") == 3


async def test_a_payload_too_large_to_cross_is_a_serialization_error() -> None:
    async with open_test_cluster(ODD, runners=2) as cluster:
        caller = cluster.runners[0]
        remote = next(f"e{n}" for n in range(100) if cluster.owner_of(Odd, f"e{n}") is not caller)
        too_large = b"x" * (TEST_CONFIG.max_message_size + 1)
        with pytest.raises(SerializationError, match="message size limit"):
            await caller.ask(echo_size, remote, too_large)
        assert await caller.ask(echo_size, remote, b"x" * 1000) == 1000


@pytest.mark.parametrize(
    ("entity_id", "reason"),
    [
        ("nul\x00inside", "NUL"),
        ("lone \ud800 surrogate", "lone surrogate"),
        ("x" * (MAX_ENTITY_ID_BYTES + 1), "over the limit"),
    ],
)
async def test_an_entity_id_no_storage_can_hold_is_malformed(entity_id: str, reason: str) -> None:
    async with open_test_runner(ODD) as (runner, _):
        with pytest.raises(MalformedMessage, match=reason):
            await runner.ask(echo_size, entity_id, b"")
        with pytest.raises(MalformedMessage, match=reason):
            await runner.tell(keyed, entity_id, Keyed("k"))


async def test_primary_keys_are_checked_before_anything_is_stored() -> None:
    async with open_test_runner(ODD) as (runner, storage):
        with pytest.raises(TypeError, match="returned 7, not a str"):
            await runner.ask(keyed, "a", Keyed(7))
        with pytest.raises(TypeError, match=r"primary_key function .* raised TypeError"):
            await runner.ask(broken_key, "a", Keyed("no dict"))
        with pytest.raises(MalformedMessage, match="primary key"):
            await runner.ask(keyed, "a", Keyed("k" * (MAX_PRIMARY_KEY_BYTES + 1)))
        assert await runner.ask(keyed, "a", Keyed("fine")) == 1
        shard = Odd.shard_of("a", runner.config.shards_per_group)
        assert await storage.unprocessed(shard) == []


async def test_headers_reach_the_handler_and_are_bounded() -> None:
    async with open_test_runner(ODD) as (runner, _):
        seen = await runner.ask(headers_seen, "a", Nothing(), headers={"tenant": "bob"})
        assert seen == {"tenant": "bob"}
        with pytest.raises(MalformedMessage, match="headers"):
            await runner.ask(
                headers_seen, "a", Nothing(), headers={f"h{n}": "" for n in range(MAX_HEADERS + 1)}
            )
        with pytest.raises(TypeError, match="str to str"):
            await runner.ask(headers_seen, "a", Nothing(), headers={"n": 1})  # type: ignore[dict-item]


async def test_a_handler_never_sees_a_callers_context_variables() -> None:
    tenant.set("opener")
    async with open_test_runner(ODD) as (runner, _):
        seen: dict[str, str] = {}

        async def call_as(name: str) -> None:
            tenant.set(name)
            seen[name] = await runner.ask(whose_tenant, "shared", Nothing())

        # alice activates the entity; bob's request must not run as alice.
        await call_as("alice")
        await call_as("bob")
        assert seen == {"alice": "opener", "bob": "opener"}


async def test_the_body_exception_group_comes_out_as_itself() -> None:
    raised = ExceptionGroup("from the body", [ValueError("inner")])
    with pytest.raises(ExceptionGroup) as caught:
        async with open_runner(ODD, transport=TransportConfig()):
            raise raised
    assert caught.value is raised


async def test_a_body_error_comes_out_as_itself_with_a_user_nursery() -> None:
    impl, _ = counter()
    with pytest.raises(ExceptionGroup) as caught:
        async with open_runner(impl) as runner, trio.open_nursery():
            await runner.ask(add, "a", Add(1))
            raise KeyError("mine")
    assert [type(e) for e in caught.value.exceptions] == [KeyError]
