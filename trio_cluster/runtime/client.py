"""Sending to entities: ``ask`` waits for the reply, ``tell`` only for acceptance.

Persisted requests are stored before anything else happens, so an
acknowledged request survives whatever comes next; the direct delivery
that follows is only the fast path, and redelivery from storage is the
guarantee.

This is the public boundary of sending: everything ``ask`` and ``tell``
raise is a ClusterError or the RPC's declared error, except TypeError, which
says the calling code itself is wrong (an argument of the wrong type, a
naive ``deliver_at``, a ``primary_key`` function that raised or returned a
non-string). Bad content that may come from outside input (an entity id
with a NUL, a key too long) is MalformedMessage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from ..config import ShardingConfig
from ..core import reply as replies
from ..core.envelope import (
    MAX_ENTITY_ID_BYTES,
    MAX_PRIMARY_KEY_BYTES,
    Envelope,
    headers_problem,
    text_problem,
)
from ..core.hashing import ShardId, shard_index
from ..core.snowflake import SnowflakeGenerator
from ..entity import Rpc
from ..errors import (
    AlreadyProcessingMessage,
    ClusterError,
    EntityNotAssignedToRunner,
    MalformedMessage,
    RunnerUnavailable,
    SendTimeout,
)
from ..storage.base import LeaseSession, MessageStorage, Saved
from .calls import Call, call_chain
from .hooks import Hooks
from .replies import ReplySlot, StoredReplies
from .routing import Router

if TYPE_CHECKING:
    from ..transport.link import PeerLink

log = logging.getLogger("trio_cluster.client")

P = TypeVar("P")
S = TypeVar("S")


class _Dropped:
    """The reply target of a volatile tell: nobody waits for it."""

    __slots__ = ()

    def resolve(self, reply: bytes) -> None:
        pass


_DROPPED = _Dropped()


class Client:
    """Sends to any entity of the cluster through one runner."""

    def __init__(
        self,
        *,
        config: ShardingConfig,
        router: Router,
        messages: MessageStorage,
        stored_replies: StoredReplies,
        session: LeaseSession,
        hooks: Hooks,
    ) -> None:
        self._config = config
        self._router = router
        self._messages = messages
        self._stored_replies = stored_replies
        self._session = session
        self._hooks = hooks
        self._machine = session.machine_id
        self._ids = SnowflakeGenerator(self._machine % 1024)

    def generate_id(self) -> int:
        """A Snowflake id unique in the cluster: request ids are minted with it too.

        The machine id is read each time: a runner that lost its registration
        and came back under another id must not keep minting with the old one.
        """
        machine = self._session.machine_id
        if machine != self._machine:
            self._machine = machine
            self._ids = SnowflakeGenerator(machine % 1024)
        return self._ids.next_id()

    async def ask(
        self,
        rpc: Rpc[P, S],
        entity_id: str,
        payload: P,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - SendTimeout is part of the contract
        deliver_at: datetime | None = None,
        headers: Mapping[str, str] | None = None,
        primary_key: str | None = None,
    ) -> S:
        """Send a request and return the handler's result, or raise its declared error.

        Raises SendTimeout when no reply comes within ``timeout`` (default
        ``ShardingConfig.send_timeout``). A persisted request stays stored
        after a timeout and is still processed; asking again with the same
        primary key returns its reply. ``deliver_at`` holds the request back
        from the handler until that (timezone-aware) time. ``headers`` reach
        the handler as ``ctx.request.headers``. ``primary_key`` (persisted RPCs
        only) is used in place of the one the RPC derives from the payload.
        """
        chain = call_chain.get()
        envelope = self._envelope(
            rpc,
            entity_id,
            payload,
            chain=chain,
            deliver_at=deliver_at,
            headers=headers,
            primary_key=primary_key,
        )
        target = envelope.entity_key
        if target in chain:
            raise AlreadyProcessingMessage(
                f"{target} is waiting, up the call chain {' -> '.join(chain)}, "
                "for this call: at concurrency 1 it could never answer (use tell, "
                "or raise the entity's concurrency)",
                entity_id=entity_id,
                request_id=envelope.request_id,
            )
        limit = self._config.send_timeout if timeout is None else timeout
        call = self._sending(envelope, "ask")
        envelope = call.envelope
        outcome = "cancelled"
        try:
            with trio.move_on_after(limit if limit > 0 else math.inf):
                reply = await self._send(envelope)
                result = replies.decode(
                    reply,
                    rpc.success_decoder,
                    rpc.errors_by_name,
                    entity_id=entity_id,
                    request_id=envelope.request_id,
                )
                outcome = "success"
                return result  # type: ignore[no-any-return]
            raise SendTimeout(
                f"no reply from {target} to {rpc.name!r} within {limit} s",
                entity_id=entity_id,
                request_id=envelope.request_id,
            )
        except ClusterError as error:
            outcome = error.reason
            raise
        except rpc.errors:
            outcome = "error"
            raise
        finally:
            self._hooks.request_finished(call, outcome)

    async def tell(
        self,
        rpc: Rpc[P, Any],
        entity_id: str,
        payload: P,
        *,
        deliver_at: datetime | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send without waiting for the handler.

        Returns once the request is accepted: stored, for a persisted RPC
        (then it will be processed even if this process dies now), or
        queued in the entity's mailbox for a volatile one. With
        ``deliver_at``, the handler sees it at that time, not before; a
        persisted one is kept to that time across restarts.
        """
        envelope = self._envelope(
            rpc, entity_id, payload, chain=(), deliver_at=deliver_at, headers=headers
        )
        call = self._sending(envelope, "tell")
        envelope = call.envelope
        outcome = "cancelled"
        try:
            if envelope.persisted:
                saved = await self._save(envelope)
                if not saved.duplicate:
                    self._offer_here(envelope)
            else:
                await self._deliver(envelope, _DROPPED)
            outcome = "success"
        except ClusterError as error:
            outcome = error.reason
            raise
        finally:
            self._hooks.request_finished(call, outcome)

    def _sending(self, envelope: Envelope, kind: str) -> Call:
        """Tell the instruments a call starts; the call's envelope carries any headers
        they added (trace context), once checked like the caller's own."""
        call = Call(envelope, kind, self._router.address)
        self._hooks.request_sent(call)
        added = call.headers
        if added != envelope.headers:
            problem = headers_problem(added)
            if problem is None:
                call.envelope = msgspec.structs.replace(envelope, headers=added)
            else:
                log.error("headers added by an instrument are refused: %s", problem)
        return call

    async def _save(self, envelope: Envelope) -> Saved:
        """Store a persisted request (the instruments hear how long it took)."""
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            saved = await self._messages.save_request(
                envelope, self._session.machine_id, announce=not self._serves(envelope)
            )
        except ClusterError as error:
            outcome = error.reason
            raise
        else:
            outcome = "success"
            return saved
        finally:
            self._hooks.storage_written("request", time.perf_counter() - started, outcome)

    def _envelope(
        self,
        rpc: Rpc[P, Any],
        entity_id: str,
        payload: P,
        *,
        chain: tuple[str, ...],
        deliver_at: datetime | None,
        headers: Mapping[str, str] | None,
        primary_key: str | None = None,
    ) -> Envelope:
        """Check what the caller gave and build the request, before anything is sent."""
        if not isinstance(rpc, Rpc):
            raise TypeError(f"ask and tell take an Rpc (got {rpc!r})")
        problem = text_problem("entity id", entity_id, MAX_ENTITY_ID_BYTES)
        if problem is not None:
            if not isinstance(entity_id, str):
                raise TypeError(problem)
            raise MalformedMessage(problem, entity_id=entity_id)
        if primary_key is not None:
            if not rpc.persisted:
                raise TypeError(f"{rpc!r}: a primary key needs a persisted RPC")
            if not isinstance(primary_key, str):
                raise TypeError(f"primary_key must be a str (got {primary_key!r})")
        elif rpc.primary_key is not None:
            primary_key = _primary_key(rpc, payload)
        if primary_key is not None:
            problem = text_problem("primary key", primary_key, MAX_PRIMARY_KEY_BYTES)
            if problem is not None:
                raise MalformedMessage(f"{rpc!r}: {problem}", entity_id=entity_id)
        carried = _NO_HEADERS if not headers else _headers(headers, entity_id)
        entity = rpc.entity
        return Envelope(
            request_id=self.generate_id(),
            entity_type=entity.name,
            entity_id=entity_id,
            shard_group=entity.shard_group,
            shard_index=shard_index(entity_id, self._config.shards_per_group),
            rpc=rpc.name,
            payload=replies.encode_payload(payload, self._config.max_message_size),
            persisted=rpc.persisted,
            primary_key=primary_key,
            deliver_at_ms=None if deliver_at is None else _unix_ms(deliver_at),
            headers=carried,
            call_chain=chain,
        )

    async def _send(self, envelope: Envelope) -> bytes:
        if not envelope.persisted:
            # A request that reached a runner no longer owning its shard
            # never ran: resend it while the shard settles on its new owner.
            delays = self._config.send_retry.delays()
            while True:
                reply = await self._attempt(envelope)
                delay = next(delays, None) if replies.misrouted(reply) else None
                if delay is None:
                    return reply
                await trio.sleep(delay)

        waiting = self._stored_replies
        # Expect the reply before storing: another runner may process the
        # request and announce its reply before the save returns here.
        slot = waiting.expect(envelope.request_id)
        try:
            saved = await self._save(envelope)
            if not saved.duplicate:
                self._offer_here(envelope)
                return await slot.wait()
        finally:
            waiting.forget(envelope.request_id, slot)
        if saved.reply is not None:
            return saved.reply
        slot = waiting.expect(saved.request_id)
        try:
            # The original may have completed between the save and expect();
            # its reply is then only in storage.
            stored = await self._messages.reply_for(saved.request_id)
            return stored if stored is not None else await slot.wait()
        finally:
            waiting.forget(saved.request_id, slot)

    async def _attempt(self, envelope: Envelope) -> bytes:
        slot = ReplySlot()
        link = await self._deliver(envelope, slot)
        try:
            return await slot.wait()
        finally:
            if link is not None:
                link.withdraw(envelope.request_id)

    def _serves(self, envelope: Envelope) -> bool:
        """Whether this runner serves the request's shard, so no notice need announce it."""
        return self._router.serves(ShardId(envelope.shard_group, envelope.shard_index))

    def _offer_here(self, envelope: Envelope) -> None:
        """Offer a stored request to an owner here now; otherwise the storage notice will."""
        with contextlib.suppress(EntityNotAssignedToRunner, RunnerUnavailable):
            self._router.route(envelope, self._stored_replies.target(envelope.request_id))

    async def _deliver(self, envelope: Envelope, target: replies.ReplyTarget) -> PeerLink | None:
        """Queue a volatile request, retrying while its shard has no owner here.

        Returns the link it went out on (None when queued here). Only routing
        failures are retried, within ``ShardingConfig.send_retry``: the
        request has then certainly not reached a handler.
        """
        router = self._router
        delays = self._config.send_retry.delays()
        while True:
            try:
                owner = router.route(envelope, target)
                if owner is None:
                    return None
                assert router.network is not None  # route names an owner only with one
                return await router.network.send_request(owner, envelope, target)
            except (EntityNotAssignedToRunner, RunnerUnavailable):
                delay = next(delays, None)
                if delay is None:
                    raise
                await trio.sleep(delay)


def _primary_key(rpc: Rpc[P, Any], payload: P) -> str:
    assert rpc.primary_key is not None
    try:
        key = rpc.primary_key(payload)
    except Exception as error:
        raise TypeError(f"the primary_key function of {rpc!r} raised {error!r}") from error
    if not isinstance(key, str):
        raise TypeError(f"the primary_key function of {rpc!r} returned {key!r}, not a str")
    return key


_NO_HEADERS: dict[str, str] = {}
"""Shared by every request sent without headers: nothing writes to an envelope's headers."""


def _headers(headers: Mapping[str, str], entity_id: str) -> dict[str, str]:
    carried = dict(headers)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in carried.items()):
        raise TypeError("headers must map str to str")
    problem = headers_problem(carried)
    if problem is not None:
        raise MalformedMessage(problem, entity_id=entity_id)
    return carried


def _unix_ms(moment: datetime) -> int:
    if not isinstance(moment, datetime):
        raise TypeError(f"deliver_at must be a datetime (got {moment!r})")
    if moment.tzinfo is None:
        raise TypeError(
            "deliver_at must be timezone-aware: a naive time names a different "
            "instant on each runner"
        )
    # A time before 1970 is as past as any: due now.
    return max(0, int(moment.timestamp() * 1000))
