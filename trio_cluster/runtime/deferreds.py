"""Signals: deferreds a persisted request suspends on, and the resume tokens that name them.

A deferred belongs to one persisted request and has a name within it. The
handler asks for its outcome with ``await ctx.deferred(name, type)``: with
one stored, that is the value (or the failure, raised); without, the
request suspends there (``Suspended`` ends the handler, the runtime stores
the request as suspended on that deferred and answers nobody). Whoever
holds the deferred's resume token completes it from any runner; the
request is then delivered again, to its entity wherever its shard lives,
and its handler runs again from the start, this time finding the outcome.

A resume token is the deferred's address (shard, request id, name), not a
secret: hand it only to whoever may complete the deferred.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol, TypeVar

import msgspec

from ..core import reply as replies
from ..core.envelope import text_problem
from ..core.hashing import ShardId
from ..errors import MalformedMessage, Suspended
from .calls import Handling, current_request

T = TypeVar("T")

MAX_DEFERRED_NAME_BYTES = 255
_TOKEN_PREFIX = "d1."


class _Token(msgspec.Struct, array_like=True, frozen=True):
    request_id: int
    name: str
    shard_group: str
    shard_index: int


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Token).decode


def resume_token(shard: ShardId, request_id: int, name: str) -> str:
    """The token naming deferred ``name`` of request ``request_id`` (URL-safe text)."""
    raw = _encode(_Token(request_id, name, shard.group, shard.index))
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_token(token: str) -> tuple[int, str]:
    """The request id and deferred name a token names; MalformedMessage when it names none."""
    if not isinstance(token, str) or not token.startswith(_TOKEN_PREFIX):
        raise MalformedMessage(f"not a resume token: {token!r}"[:200])
    body = token[len(_TOKEN_PREFIX) :]
    try:
        parsed = _decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError, msgspec.MsgspecError) as error:
        raise MalformedMessage(f"not a resume token: {error}") from error
    problem = text_problem("deferred name", parsed.name, MAX_DEFERRED_NAME_BYTES)
    if problem is not None or not parsed.name:
        raise MalformedMessage(f"not a resume token: {problem or 'no deferred name'}")
    return parsed.request_id, parsed.name


class DeferredHost(Protocol):
    """What deferreds need of the entity's shard (a ShardRuntime)."""

    async def deferred_result(self, request_id: int, name: str) -> bytes | None: ...


class EntityDeferreds:
    """The deferreds of the requests one entity handles (behind ``ctx.deferred``)."""

    __slots__ = ("_host", "_shard")

    def __init__(self, host: DeferredHost, shard: ShardId) -> None:
        self._host = host
        self._shard = shard

    def token(self, name: str) -> str:
        handling = _persisted_request(name)
        return resume_token(self._shard, handling.request_id, name)

    async def outcome(self, name: str, result_type: type[T]) -> T:
        handling = _persisted_request(name)
        stored = await self._host.deferred_result(handling.request_id, name)
        if stored is None:
            handling.suspended_on = name
            raise Suspended(
                f"waiting on deferred {name!r}",
                resume_token=resume_token(self._shard, handling.request_id, name),
                entity_id=handling.entity_id,
                request_id=handling.request_id,
            )
        value: T = replies.decode(
            stored,
            msgspec.msgpack.Decoder(result_type),
            {},
            entity_id=handling.entity_id,
            request_id=handling.request_id,
        )
        return value


def _persisted_request(name: str) -> Handling:
    """The request being handled, which must be persisted to own deferreds."""
    problem = text_problem("deferred name", name, MAX_DEFERRED_NAME_BYTES)
    if problem is not None or not name:
        raise ValueError(problem or "a deferred needs a name")
    handling = current_request.get()
    if handling is None:
        raise LookupError("deferreds belong to a request: use them inside a handler method")
    if not handling.persisted:
        raise TypeError(
            f"{handling.rpc!r} is volatile: only a persisted request can suspend on a deferred"
        )
    return handling
