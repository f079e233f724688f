"""One active entity: its bounded mailbox and the task that drains it.

The mailbox is a Trio memory channel of the entity's capacity. What counts
against the capacity is what waits, not what runs, so an entity at
concurrency 1 holds at most ``capacity + 1`` requests in memory.

A persisted request that finds the mailbox full is not kept in memory at
all: it is already in storage, so the entity only notes that it has a
backlog and reads it back, oldest first, when the mailbox has emptied.
Requests arriving while a backlog exists stay in storage too, so a
persisted request never overtakes an older one for the same entity.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..config import EntityOptions
from ..core import reply as replies
from ..core.envelope import Envelope
from ..entity import Implementation
from ..errors import (
    AlreadyProcessingMessage,
    ClusterError,
    MailboxFull,
    MalformedMessage,
    RpcClientError,
    RunnerUnavailable,
)
from .context import EntityAddress, EntityContext, call_chain

if TYPE_CHECKING:
    from .shard import ShardRuntime

log = logging.getLogger("trio_cluster.entity")


class ActiveEntity:
    """A resident entity. Owned by its shard; its task runs in the shard's nursery."""

    __slots__ = (
        "_handler",
        "_limiter",
        "_receive",
        "_send",
        "address",
        "backlog",
        "backlog_stale",
        "closed",
        "context",
        "implementation",
        "in_flight",
        "key",
        "last_active",
        "options",
        "shard",
    )

    def __init__(
        self,
        shard: ShardRuntime,
        implementation: Implementation,
        options: EntityOptions,
        entity_id: str,
        key: str,
    ) -> None:
        self.shard = shard
        self.implementation = implementation
        self.options = options
        self.key = key
        self.address = EntityAddress(implementation.entity.name, entity_id, shard.lease.shard)
        self.context = EntityContext(self.address, shard.runner.client, shard.runner.address)
        self._send, self._receive = trio.open_memory_channel[Envelope](options.mailbox_capacity)
        self._limiter = trio.Semaphore(options.concurrency) if options.concurrency > 1 else None
        self._handler: Any = None
        self.last_active = trio.current_time()
        # Queued or running request ids: how duplicates are recognised and
        # why an entity with work in hand is never passivated.
        self.in_flight: dict[int, None] = {}
        self.backlog = False
        self.backlog_stale = False
        self.closed = False

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.backlog

    def offer(self, envelope: Envelope) -> None:
        """Queue a request without waiting; the caller's error says why not.

        Synchronous on purpose: between the check and the enqueue no other
        task runs, so passivation can never strand a message.
        """
        request_id = envelope.request_id
        if request_id in self.in_flight:
            if envelope.persisted:
                return
            raise AlreadyProcessingMessage(
                f"request {request_id} is already queued for {self.address}",
                entity_id=self.address.entity_id,
                request_id=request_id,
            )
        if envelope.persisted and self.backlog:
            self.backlog_stale = True
            return
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            if envelope.persisted:
                self.backlog = True
                self.backlog_stale = True
                return
            self.shard.runner.metrics.mailbox_full += 1
            raise MailboxFull(
                f"mailbox of {self.address} is full ({self.options.mailbox_capacity} waiting)",
                entity_id=self.address.entity_id,
                request_id=request_id,
            ) from None
        self.in_flight[request_id] = None

    def close(self) -> None:
        """Stop taking requests; the task finishes what is queued, then ends."""
        self.closed = True
        self._send.close()

    async def run(self) -> None:
        chain = (self.key,) if self._limiter is None else ()
        try:
            async with trio.open_nursery() as workers:
                while True:
                    if self._limiter is not None:
                        await self._limiter.acquire()
                    envelope = await self._next()
                    if envelope is None:
                        break
                    call_chain.set(envelope.call_chain + chain)
                    if self._limiter is None:
                        await self._handle(envelope)
                    else:
                        workers.start_soon(self._handle_concurrently, envelope, self._limiter)
        finally:
            self.shard.forget(self)
            self._fail_queued()

    def _fail_queued(self) -> None:
        """Volatile requests still queued when the entity stops get an answer now.

        Without it their callers would wait out their whole timeout;
        persisted ones stay in storage for the shard's next owner.
        """
        while True:
            try:
                envelope = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            del self.in_flight[envelope.request_id]
            if not envelope.persisted:
                self.shard.runner.replies.fail(
                    envelope.request_id,
                    RunnerUnavailable(
                        f"{self.address} stopped before handling the request",
                        entity_id=self.address.entity_id,
                    ),
                )

    async def _next(self) -> Envelope | None:
        """The next request, or None once the mailbox is closed.

        Idle passivation closes the mailbox from the runner's sweeper rather
        than bounding this wait with a timer: a cancel scope per message
        was a quarter of the hot path.
        """
        while self.backlog and not self._receive.statistics().current_buffer_used:
            await self._refill()
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return None

    async def _refill(self) -> None:
        """Read this entity's stored backlog into the emptied mailbox, oldest first."""
        if self.closed:
            # Stopping: the backlog stays in storage for the shard's next owner.
            self.backlog = False
            return
        self.backlog_stale = False
        found, more = await self.shard.read_backlog(
            (self.address.entity_type, self.address.entity_id),
            # Room for what may still be running, so a full page always
            # holds something new to queue.
            self.options.mailbox_capacity + self.options.concurrency,
        )
        self.backlog = False
        for envelope in found:
            self.offer(envelope)
        if self.backlog_stale or more:
            self.backlog = True

    async def _handle_concurrently(self, envelope: Envelope, limiter: trio.Semaphore) -> None:
        try:
            await self._handle(envelope)
        finally:
            limiter.release()

    async def _handle(self, envelope: Envelope) -> None:
        try:
            reply = await self._reply_to(envelope)
            await self.shard.complete(envelope, reply)
        except trio.Cancelled:
            if not envelope.persisted:
                # The shard was released under this request: tell the caller
                # now rather than at its timeout. Persisted requests stay in
                # storage for the next owner.
                self.shard.runner.replies.fail(
                    envelope.request_id,
                    RunnerUnavailable(
                        f"{self.address} stopped while processing the request",
                        entity_id=self.address.entity_id,
                    ),
                )
            raise
        finally:
            del self.in_flight[envelope.request_id]
            self.last_active = trio.current_time()

    async def _reply_to(self, envelope: Envelope) -> bytes:
        """Run the handler under the defect retry policy and encode what it said."""
        implementation = self.implementation
        rpc = implementation.entity.rpcs.get(envelope.rpc)
        if rpc is None:
            missing = MalformedMessage(f"{self.address} has no RPC {envelope.rpc!r}")
            return self._error(missing, envelope)
        try:
            payload = rpc.payload_decoder.decode(envelope.payload)
        except msgspec.MsgspecError as exc:
            return self._error(
                MalformedMessage(f"payload of {rpc!r} does not decode: {exc}"), envelope
            )
        method = implementation.methods[envelope.rpc]
        delays = self.options.defect_retry.delays()
        while True:
            try:
                if self._handler is None:
                    self._handler = implementation.handler(self.context)
                value = await method(self._handler, payload)
            except rpc.errors as declared:
                try:
                    return replies.declared_error(declared)
                except ClusterError as error:
                    return self._error(error, envelope)
            except Exception as defect:
                if isinstance(defect, ClusterError) and not defect.retryable:
                    # Suspended, a refused call cycle, a malformed call out:
                    # deterministic, so a restart could only repeat it.
                    return self._error(defect, envelope)
                # Anything else undeclared is a defect: drop the (possibly
                # corrupt) handler state and retry on a fresh instance.
                self._handler = None
                self.shard.runner.metrics.defects += 1
                delay = next(delays, None)
                log.warning(
                    "defect in %s handling %s (retry in %s s)",
                    self.address,
                    envelope.rpc,
                    delay,
                    exc_info=defect,
                )
                if delay is None:
                    return self._error(
                        RpcClientError(
                            f"{self.address} failed handling {envelope.rpc!r}: "
                            f"{type(defect).__name__}: {defect}",
                            cause_type=type(defect).__name__,
                        ),
                        envelope,
                    )
                await trio.sleep(delay)
                continue
            try:
                return replies.success(value)
            except ClusterError as error:
                return self._error(error, envelope)

    def _error(self, error: ClusterError, envelope: Envelope) -> bytes:
        error.entity_id = self.address.entity_id
        error.request_id = envelope.request_id
        return replies.cluster_error(error)
