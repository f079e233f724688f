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

An ``ask`` that stops waiting (its timeout, or a cancellation from outside)
withdraws its request when ``interrupt`` says so: a volatile one through
the delivery it queued here or the link it went out on, a persisted one
through storage (see :mod:`.withdrawals`). A request that was answered is
never withdrawn, and a duplicate never withdraws its original.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
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
from ..core.reply import DROPPED
from ..core.snowflake import MACHINE_IDS, SnowflakeGenerator
from ..core.streaming import MAX_WINDOW
from ..entity import Rpc, StreamRpc
from ..errors import (
    AlreadyProcessingMessage,
    ClusterError,
    DeferredFailed,
    EntityNotAssignedToRunner,
    MalformedMessage,
    RunnerUnavailable,
    SendTimeout,
)
from ..storage.base import DeferredStorage, LeaseSession, MessageStorage, Saved, StreamStorage
from .calls import Call, call_chain
from .deferreds import parse_token
from .delivery import Delivery
from .expiry import Expiries
from .hooks import Hooks
from .replies import ReplySlot, StoredReplies
from .routing import Router
from .stored_streams import StoredChunks, StreamWatchers
from .streams import Chunks, StreamSlot
from .withdrawals import Withdrawals

if TYPE_CHECKING:
    from ..transport.link import PeerLink

log = logging.getLogger("trio_cluster.client")

P = TypeVar("P")
S = TypeVar("S")
C = TypeVar("C")

DEFAULT_WINDOW = 16
"""Chunks of a stream in flight at once unless the caller says otherwise."""


class Client:
    """Sends to any entity of the cluster through one runner."""

    def __init__(
        self,
        *,
        config: ShardingConfig,
        router: Router,
        messages: MessageStorage,
        deferreds: DeferredStorage,
        stored_replies: StoredReplies,
        streams: StreamStorage,
        watchers: StreamWatchers,
        session: LeaseSession,
        hooks: Hooks,
        withdrawals: Withdrawals,
        expiries: Expiries,
    ) -> None:
        self._config = config
        self._expiries = expiries
        self._router = router
        self._messages = messages
        self._deferreds = deferreds
        self._stored_replies = stored_replies
        self._streams = streams
        self._watchers = watchers
        self._withdrawals = withdrawals
        self._session = session
        self._hooks = hooks
        self._machine = session.machine_id
        self._ids = SnowflakeGenerator(self._machine % MACHINE_IDS)

    def generate_id(self) -> int:
        """A Snowflake id unique in the cluster: request ids are minted with it too.

        The machine id is read each time: a runner that lost its registration
        and came back under another id must not keep minting with the old one.
        """
        machine = self._session.machine_id
        if machine != self._machine:
            self._machine = machine
            self._ids = SnowflakeGenerator(machine % MACHINE_IDS)
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
        interrupt: bool | None = None,
        primary_key: str | None = None,
    ) -> S:
        """Send a request and return the handler's result, or raise its declared error.

        Raises SendTimeout when no reply comes within ``timeout`` (default
        ``ShardingConfig.send_timeout``). ``interrupt`` says what happens to
        the request when this call stops waiting (the timeout, or a
        cancellation): withdraw it, cancelling its handler (True, the
        default for a volatile RPC), or leave it running (False, the
        default for a persisted one, which is then still processed, and
        asking again with the same primary key returns its reply). An RPC
        declared ``interruptible=False`` is never withdrawn. ``deliver_at``
        holds the request back from the handler until that (timezone-aware)
        time. ``headers`` reach the handler as ``ctx.request.headers``. ``primary_key`` (persisted
        RPCs only) is used in place of the one the RPC derives from the payload.
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
        _refuse_cycle(envelope, chain)
        limit = self._config.send_timeout if timeout is None else timeout
        deadline = _deadline(limit)
        withdraw = rpc.interruptible and (not rpc.persisted if interrupt is None else interrupt)
        call = self._sending(envelope, "ask")
        envelope = call.envelope
        outcome = "cancelled"
        try:
            reply = await self._reply(envelope, withdraw, deadline)
            if reply is None:
                raise _timed_out(envelope, rpc.name, limit)
            result = replies.decode(
                reply,
                rpc.success_decoder,
                rpc.errors_by_name,
                entity_id=entity_id,
                request_id=envelope.request_id,
            )
        except ClusterError as error:
            outcome = error.reason
            raise
        except rpc.errors:
            outcome = "error"
            raise
        else:
            outcome = "success"
            return result  # type: ignore[no-any-return]
        finally:
            self._hooks.request_finished(call, outcome)

    async def _reply(self, envelope: Envelope, withdraw: bool, deadline: float) -> bytes | None:
        """The reply to an ask, or None once ``deadline`` passed."""
        if not envelope.persisted:
            # No cancel scope: the expiries keep the deadline (see .expiry).
            return await self._send_volatile(envelope, withdraw, deadline)
        with trio.move_on_at(deadline):
            return await self._send_stored(envelope, withdraw)
        return None

    @contextlib.asynccontextmanager
    async def stream(
        self,
        rpc: StreamRpc[P, C],
        entity_id: str,
        payload: P,
        *,
        window: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - SendTimeout is part of the contract
        headers: Mapping[str, str] | None = None,
        primary_key: str | None = None,
    ) -> AsyncIterator[AsyncIterator[C]]:
        """Send a streaming request; iterate the chunks its handler yields.

        ``async with client.stream(rpc, id, payload) as chunks:`` enters
        once the handler sent its first chunk (or ended, or was refused:
        the first iteration raises that, as ``ask`` would), and
        ``async for chunk in chunks`` takes them. At most ``window`` chunks
        are in flight: the handler suspends at its ``yield`` until this
        caller has consumed enough of them. Leaving the block before the
        end (a break, an exception, a cancellation) interrupts the handler.
        The end raises the declared error or ClusterError the handler ended
        in, after every chunk it sent. ``timeout`` (default
        ``ShardingConfig.send_timeout``) bounds each wait, for the start and
        for every chunk: SendTimeout. ``window`` defaults to 16 chunks.

        A persisted stream (declared ``persisted=True``, with its window) is
        stored, not sent: the block is entered once it is stored, and a
        caller asking again with the same primary key resumes after the last
        chunk acknowledged. Leaving its block early withdraws nothing: the
        handler waits at its ``yield`` for a caller to resume it.
        """
        if not isinstance(rpc, StreamRpc):
            raise TypeError(f"stream takes a StreamRpc (got {rpc!r})")
        if rpc.rpc.persisted:
            if window is not None:
                raise TypeError(f"{rpc!r} is persisted: its window is declared with it")
        elif window is None:
            window = DEFAULT_WINDOW
        elif not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise TypeError(f"window must be an int in 1..{MAX_WINDOW} (got {window!r})")
        chain = call_chain.get()
        envelope = self._envelope(
            rpc.rpc,
            entity_id,
            payload,
            chain=chain,
            deliver_at=None,
            headers=headers,
            stream=True,
            primary_key=primary_key,
        )
        _refuse_cycle(envelope, chain)
        limit = self._config.send_timeout if timeout is None else timeout
        call = self._sending(envelope, "stream")
        envelope = call.envelope
        if window is None:
            async with self._stored_stream(call, rpc.rpc, limit) as stored:
                yield stored
            return
        try:
            opened = await self._open_stream(envelope, window, limit)
        except ClusterError as error:
            self._hooks.request_finished(call, error.reason)
            raise
        except BaseException:
            self._hooks.request_finished(call, "cancelled")
            raise
        slot, delivery, link = opened
        chunks = Chunks(slot, rpc.rpc, envelope, limit)
        try:
            yield chunks
        finally:
            _withdraw(delivery, link, interrupt=not slot.answered)
            self._hooks.request_finished(call, chunks.outcome)

    @contextlib.asynccontextmanager
    async def _stored_stream(
        self, call: Call, rpc: Rpc[Any, C], limit: float
    ) -> AsyncIterator[StoredChunks[C]]:
        """Store a persisted stream's request, then read its chunks from storage.

        A duplicate (its primary key stored already) reads the original's,
        from the first chunk its callers did not acknowledge.
        """
        envelope = call.envelope
        waiting = self._stored_replies
        # Expect the reply before storing: the whole stream may end before the save returns.
        reply = waiting.expect(envelope.request_id)
        request_id = envelope.request_id
        outcome = "cancelled"
        try:
            try:
                saved = await self._save(envelope)
                start = 0
                if saved.duplicate:
                    waiting.forget(request_id, reply)
                    request_id = saved.request_id
                    reply = waiting.expect(request_id)
                    start = await self._streams.acked(request_id)
                    final = saved.reply or await self._messages.watch_reply(request_id)
                    if final is not None:
                        reply.resolve(final)
                else:
                    self._offer_here(envelope)
            except ClusterError as error:
                outcome = error.reason
                raise
            watch = self._watchers.caller(request_id, rpc.window)
            try:
                chunks = StoredChunks(
                    storage=self._streams,
                    watch=watch,
                    reply=reply,
                    rpc=rpc,
                    envelope=envelope,
                    request_id=request_id,
                    start=start,
                    timeout=limit,
                    origin=self._session.machine_id,
                )
                try:
                    yield chunks
                finally:
                    outcome = chunks.outcome
            finally:
                self._watchers.forget(request_id, watch)
        finally:
            waiting.forget(request_id, reply)
            self._hooks.request_finished(call, outcome)

    async def _open_stream(
        self, envelope: Envelope, window: int, limit: float
    ) -> tuple[StreamSlot, Delivery, PeerLink | None]:
        """Send a streaming request until it starts, within ``limit`` seconds: a
        misrouted one (refused before any chunk by a runner no longer owning its
        shard) is resent, as ``ask`` does."""
        with trio.move_on_after(limit if limit > 0 else math.inf):
            return await self._start_stream(envelope, window)
        raise SendTimeout(
            f"{envelope.entity_key} did not start {envelope.rpc!r} within {limit} s",
            entity_id=envelope.entity_id,
            request_id=envelope.request_id,
        )

    async def _start_stream(
        self, envelope: Envelope, window: int
    ) -> tuple[StreamSlot, Delivery, PeerLink | None]:
        delays = self._config.send_retry.delays()
        while True:
            slot = StreamSlot(window)
            delivery = Delivery(envelope, slot, stream=slot)
            link = await self._deliver(delivery, stream=slot)
            try:
                await slot.wait_ready()
            except BaseException:
                _withdraw(delivery, link, interrupt=True)
                raise
            final = slot.final
            delay = None
            if final is not None and replies.misrouted(final):
                delay = next(delays, None)
            if delay is None:
                return slot, delivery, link
            await trio.sleep(delay)

    async def tell(
        self,
        rpc: Rpc[P, Any],
        entity_id: str,
        payload: P,
        *,
        deliver_at: datetime | None = None,
        headers: Mapping[str, str] | None = None,
        ack: bool = True,
        primary_key: str | None = None,
    ) -> None:
        """Send without waiting for the handler.

        Returns once the request is accepted: stored, for a persisted RPC
        (then it will be processed even if this process dies now), or
        queued in the entity's mailbox (or its shard's timers) for a
        volatile one, wherever its owner runs, with the owner's refusal
        raised as for ``ask`` (MailboxFull; a moved shard is resent to its
        new owner under ``send_retry``). The owner on another runner says
        so in a reply; SendTimeout when none comes within ``send_timeout``.
        ``ack=False`` does not wait for that reply: a volatile request to
        another runner is then sent once it is queued on the link, and a
        refusal is dropped unheard. With ``deliver_at``, the handler sees it
        at that time, not before; a persisted one is kept to that time
        across restarts. ``primary_key``
        (persisted RPCs only) deduplicates this request by that key instead
        of the RPC's own ``primary_key`` function: what a schedule uses to
        tell once per instant.
        """
        envelope = self._envelope(
            rpc, entity_id, payload, chain=(), deliver_at=deliver_at, headers=headers
        )
        if primary_key is not None:
            envelope = _keyed(envelope, rpc, primary_key)
        call = self._sending(envelope, "tell")
        envelope = call.envelope
        outcome = "cancelled"
        try:
            if envelope.persisted:
                saved = await self._save(envelope)
                if not saved.duplicate:
                    self._offer_here(envelope)
            elif ack:
                await self._acknowledged(envelope)
            else:
                await self._deliver(Delivery(envelope, DROPPED))
            outcome = "success"
        except ClusterError as error:
            outcome = error.reason
            raise
        finally:
            self._hooks.request_finished(call, outcome)

    async def complete_deferred(self, token: str, value: object) -> None:
        """Complete the deferred ``token`` names with ``value``, from any runner.

        Returns once stored: the suspended request then runs again on its
        entity (now, or once its shard is served again) and finds ``value``
        (msgpack-encodable; decoded as the type the handler asks for).
        Raises DeferredAlreadyCompleted when it was completed or failed before
        (the first outcome stands), MalformedMessage for a token that names no
        stored request, SerializationError for a value that cannot be encoded.
        """
        result = replies.success(value, self._config.max_message_size)
        await self._complete(token, result, failed=False)

    async def fail_deferred(self, token: str, message: str) -> None:
        """Fail the deferred ``token`` names: the handler's ``ctx.deferred`` raises
        DeferredFailed with ``message``. Refused as ``complete_deferred`` is."""
        if not isinstance(message, str):
            raise TypeError(f"fail_deferred takes a message str (got {message!r})")
        await self._complete(token, replies.cluster_error(DeferredFailed(message)), failed=True)

    async def _complete(self, token: str, result: bytes, *, failed: bool) -> None:
        request_id, name = parse_token(token)
        await self._deferreds.complete_deferred(request_id, name, result)
        self._hooks.deferred_completed(request_id, name, failed)

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
        stream: bool = False,
    ) -> Envelope:
        """Check what the caller gave and build the request, before anything is sent."""
        if not isinstance(rpc, Rpc):
            raise TypeError(f"ask and tell take an Rpc (got {rpc!r})")
        if rpc.stream != stream:
            raise TypeError(f"{rpc!r} is {'' if rpc.stream else 'not '}a stream: use Client.stream")
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
            deliver_at_ms=None if deliver_at is None else unix_ms(deliver_at),
            headers=carried,
            call_chain=chain,
        )

    async def _send_volatile(
        self, envelope: Envelope, withdraw: bool, deadline: float
    ) -> bytes | None:
        """The reply, or None once ``deadline`` passed.

        A request that reached a runner no longer owning its shard never
        ran: it is resent while the shard settles on its new owner.
        """
        delays = self._config.send_retry.delays()
        try:
            while True:
                reply = await self._attempt(envelope, withdraw, deadline)
                if reply is None or not replies.misrouted(reply):
                    return reply
                delay = next(delays, None)
                if delay is None:
                    return reply
                await _pause(delay, deadline)
        except _Expired:
            return None

    async def _send_stored(self, envelope: Envelope, withdraw: bool) -> bytes:
        waiting = self._stored_replies
        # Expect the reply before storing: another runner may process the
        # request and announce its reply before the save returns here.
        slot = waiting.expect(envelope.request_id)
        ours = True  # until storage says it is a duplicate: then the original is not ours
        try:
            saved = await self._save(envelope)
            ours = not saved.duplicate
            if ours:
                self._offer_here(envelope)
                return await slot.wait()
        finally:
            waiting.forget(envelope.request_id, slot)
            if withdraw and ours and not slot.answered:
                self._withdrawals.withdraw(envelope)
        if saved.reply is not None:
            return saved.reply
        slot = waiting.expect(saved.request_id)
        try:
            # The original may have completed between the save and expect();
            # its reply is then only in storage. Its notice would go to the
            # original's caller alone: this runner asks to hear it too.
            stored = await self._messages.watch_reply(saved.request_id)
            return stored if stored is not None else await slot.wait()
        finally:
            waiting.forget(saved.request_id, slot)

    async def _attempt(self, envelope: Envelope, withdraw: bool, deadline: float) -> bytes | None:
        slot = ReplySlot()
        delivery = Delivery(envelope, slot)
        link = await self._deliver(delivery, deadline=deadline)
        try:
            return await self._expiries.wait(slot, deadline)
        finally:
            _withdraw(delivery, link, interrupt=withdraw and not slot.answered)

    async def _acknowledged(self, envelope: Envelope) -> None:
        """A volatile tell, returning once its owner queued it; its refusal raised."""
        limit = self._config.send_timeout
        deadline = _deadline(limit)
        delays = self._config.send_retry.delays()
        try:
            while True:
                slot = ReplySlot()
                link = await self._deliver(Delivery(envelope, slot), ack=True, deadline=deadline)
                if link is None:
                    return  # queued here: a refusal was raised already
                try:
                    reply = await self._acknowledgement(slot, deadline)
                finally:
                    link.withdraw(envelope.request_id)
                refused = replies.refusal(
                    reply, entity_id=envelope.entity_id, request_id=envelope.request_id
                )
                if refused is None:
                    return
                delay = next(delays, None) if replies.misrouted(reply) else None
                if delay is None:
                    raise refused
                await _pause(delay, deadline)
        except _Expired:
            raise SendTimeout(
                f"{envelope.entity_key} did not acknowledge {envelope.rpc!r} within {limit} s",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            ) from None

    async def _acknowledgement(self, slot: ReplySlot, deadline: float) -> bytes:
        reply = await self._expiries.wait(slot, deadline)
        if reply is None:
            raise _Expired
        return reply

    def _serves(self, envelope: Envelope) -> bool:
        """Whether this runner serves the request's shard, so no notice need announce it."""
        return self._router.serves(ShardId(envelope.shard_group, envelope.shard_index))

    def _offer_here(self, envelope: Envelope) -> None:
        """Offer a stored request to an owner here now; otherwise the storage notice will."""
        with contextlib.suppress(EntityNotAssignedToRunner, RunnerUnavailable):
            self._router.route(Delivery(envelope, self._stored_replies.target(envelope.request_id)))

    async def _deliver(
        self,
        delivery: Delivery,
        *,
        ack: bool = False,
        stream: StreamSlot | None = None,
        deadline: float = math.inf,
    ) -> PeerLink | None:
        """Queue a volatile request, retrying while its shard has no owner here.

        Returns the link it went out on (None when queued here). Only routing
        failures are retried, within ``ShardingConfig.send_retry``: the
        request has then certainly not reached a handler. With ``ack``, the
        owner on another runner replies as soon as it queued the request;
        with ``stream`` (the delivery's own target), it streams its chunks.
        A caller that keeps no cancel scope of its own passes its
        ``deadline``: the waits here (a retry, dialling the owner) end at it,
        with ``_Expired``.
        """
        router = self._router
        envelope, target = delivery.envelope, delivery.target
        delays = self._config.send_retry.delays()
        while True:
            try:
                owner = router.route(delivery)
                if owner is None:
                    return None
                network = router.network
                assert network is not None  # route names an owner only with one
                if stream is not None:
                    return await network.send_stream(owner, envelope, stream)
                if deadline == math.inf or network.connected(owner):
                    return await network.send_request(owner, envelope, target, ack=ack)
                with trio.move_on_at(deadline):
                    return await network.send_request(owner, envelope, target, ack=ack)
                raise _Expired
            except (EntityNotAssignedToRunner, RunnerUnavailable):
                delay = next(delays, None)
                if delay is None:
                    raise
                await _pause(delay, deadline)


class _Expired(Exception):
    """A caller's deadline passed while it kept no cancel scope (see ``_deliver``)."""


def _timed_out(envelope: Envelope, rpc: str, limit: float) -> SendTimeout:
    return SendTimeout(
        f"no reply from {envelope.entity_key} to {rpc!r} within {limit} s",
        entity_id=envelope.entity_id,
        request_id=envelope.request_id,
    )


def _deadline(limit: float) -> float:
    """When a wait of ``limit`` seconds from now ends (``limit <= 0``: never)."""
    return trio.current_time() + limit if limit > 0 else math.inf


async def _pause(delay: float, deadline: float) -> None:
    """Sleep ``delay`` before a retry; ``_Expired`` if ``deadline`` comes first."""
    if trio.current_time() + delay >= deadline:
        await trio.sleep_until(deadline)
        raise _Expired
    await trio.sleep(delay)


def _withdraw(delivery: Delivery, link: PeerLink | None, *, interrupt: bool) -> None:
    """The caller stopped waiting for a volatile request: forget it on its link (and
    interrupt its handler there), or interrupt it here, where it was queued."""
    if link is not None:
        link.withdraw(delivery.envelope.request_id, interrupt=interrupt)
    elif interrupt:
        delivery.interrupt()


def _refuse_cycle(envelope: Envelope, chain: tuple[str, ...]) -> None:
    """A call to an entity waiting up this call's chain could never be answered."""
    if not chain:
        return  # not called from a handler: the common case, with no key to build
    target = envelope.entity_key
    if target in chain:
        raise AlreadyProcessingMessage(
            f"{target} is waiting, up the call chain {' -> '.join(chain)}, "
            "for this call: at concurrency 1 it could never answer (use tell, "
            "or raise the entity's concurrency)",
            entity_id=envelope.entity_id,
            request_id=envelope.request_id,
        )


def _keyed(envelope: Envelope, rpc: Rpc[P, Any], primary_key: str) -> Envelope:
    """The request deduplicated by ``primary_key``, checked like a computed key."""
    if not rpc.persisted:
        raise TypeError(f"{rpc!r} is volatile: only a persisted request can have a primary key")
    problem = text_problem("primary key", primary_key, MAX_PRIMARY_KEY_BYTES)
    if problem is not None:
        if not isinstance(primary_key, str):
            raise TypeError(problem)
        raise MalformedMessage(f"{rpc!r}: {problem}", entity_id=envelope.entity_id)
    return msgspec.structs.replace(envelope, primary_key=primary_key)


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


def unix_ms(moment: datetime) -> int:
    if not isinstance(moment, datetime):
        raise TypeError(f"deliver_at must be a datetime (got {moment!r})")
    if moment.tzinfo is None:
        raise TypeError(
            "deliver_at must be timezone-aware: a naive time names a different "
            "instant on each runner"
        )
    # A time before 1970 is as past as any: due now.
    return max(0, int(moment.timestamp() * 1000))
