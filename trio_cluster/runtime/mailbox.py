"""One active entity: its bounded mailbox and the task that drains it.

The mailbox is a Trio memory channel of the entity's capacity. What counts
against the capacity is what waits, not what runs, so an entity at
concurrency 1 holds at most ``capacity + 1`` requests in memory.

A persisted request that finds the mailbox full is not kept in memory at
all: it is already in storage, so the entity only notes that it has a
backlog and reads it back, oldest first, when the mailbox has emptied.
Requests arriving while a backlog exists stay in storage too, so a
persisted request never overtakes an older one for the same entity.

The entity is a failure boundary. A handler's own exception is a defect,
handled by the defect policy; a failure of the runtime itself while
handling one request (a bug) answers that request with RpcClientError and
the entity goes on; a failure outside any request stops this entity alone,
its queued requests answered. Its lifecycle (ACTIVE, CLOSING, STOPPED) is
the table in :mod:`trio_cluster.core.lifecycle`.

An entity with durable state writes it from its own task only, one write at
a time: with the reply of each persisted request that changed it, and for
volatile changes as ``EntityOptions.state_save`` says (the shard's flusher
asks an idle entity to save by queueing a FLUSH marker, never writes itself).
A change that could not be committed is forgotten, and the next request
starts again from what storage holds.

An interrupted request (its caller withdrew it) is skipped if it has not
started, and its handler is cancelled if it runs: a Trio cancellation that
reaches that handler alone (see :class:`_Epoch`), so its ``finally`` blocks
run and the entity's other requests are untouched. Its answer is ``Interrupted``, and what it
changed in the durable state is rolled back, as after a defect.

A stream handler (an async generator) holds its entity for the whole
stream, like any handler: each chunk waits at its ``yield`` for room in the
caller's window, so a slow caller slows the handler instead of filling a
buffer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import msgspec
import trio

from ..core import reply as replies
from ..core.envelope import Envelope
from ..core.lifecycle import ENTITY_LIFECYCLE, EntityEvent, EntityState, Lifecycle
from ..entity import Rpc
from ..errors import (
    ClusterError,
    EntityNotAssignedToRunner,
    Interrupted,
    MailboxFull,
    MalformedMessage,
    RpcClientError,
    RunnerUnavailable,
    SerializationError,
    Suspended,
)
from ..storage.base import Lease, StateWrite
from .calls import Handling, handling
from .context import EntityAddress, EntityContext
from .deferreds import EntityDeferreds
from .delivery import Delivery
from .durable import StateKeeper, StateUnreadable
from .interrupts import ShardInterrupts
from .services import Hosted, Services
from .stored_streams import StoredChunkSink
from .timers import EntityTimers, timer_name

log = logging.getLogger("trio_cluster.entity")


class _Flush:
    """Queued in a mailbox: save what volatile requests changed, now (between requests)."""


FLUSH = _Flush()


class _Suspension:
    """What a handler's run ended in when it suspended on a deferred: no reply yet."""


SUSPENSION = _Suspension()


class _Epoch:
    """The cancel scopes an entity task runs its handlers in, until an interrupt spends them.

    Entering a Trio cancel scope per request cost a volatile request as much
    as a sixth of its runtime, so an entity task enters two once and keeps
    them for every request until an interrupt cancels one: ``interrupts``,
    which a running request's interrupt cancels (its delivery is armed with
    it while its handler runs, see :meth:`Delivery.arm`), and inside it
    ``guard``, shielded the moment that happens. The rest of the interrupted
    request (its reply, made and stored) then runs shielded from the
    cancellation, and the task leaves both scopes and enters a new epoch
    before it takes its next request, which so never sees it. The shield
    also holds off a stop of the shard for that rest of one request; the
    stop reaches the task as soon as the epoch is left.
    """

    __slots__ = ("guard", "interrupts")

    def __init__(self) -> None:
        self.interrupts = trio.CancelScope()
        self.guard = trio.CancelScope()

    @property
    def spent(self) -> bool:
        return self.interrupts.cancel_called

    def spend(self) -> None:
        self.guard.shield = True


def _only_cancelled(error: BaseException) -> bool:
    """Whether ``error`` is a Trio cancellation, alone or grouped (from a nursery)."""
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return False


class EntityHost(Protocol):
    """What an entity needs of the shard it lives in (a ShardRuntime, or a test's own)."""

    @property
    def services(self) -> Services: ...

    @property
    def lease(self) -> Lease: ...

    @property
    def draining(self) -> bool: ...

    @property
    def interrupts(self) -> ShardInterrupts: ...

    async def read_backlog(
        self, entity: tuple[str, str], limit: int
    ) -> tuple[list[Envelope], bool]: ...

    async def complete(
        self, delivery: Delivery, reply: bytes, state: StateWrite | None = None
    ) -> bool: ...

    async def load_state(self, entity_type: str, entity_id: str) -> bytes | None: ...

    async def save_state(self, state: StateWrite) -> bool: ...

    async def suspend(self, delivery: Delivery, name: str) -> bool | None: ...

    async def deferred_result(self, request_id: int, name: str) -> bytes | None: ...

    async def arm_timer(self, name: str, envelope: Envelope) -> None: ...

    async def cancel_timer(self, entity: tuple[str, str], name: str) -> bool: ...

    def forget(self, entity: ActiveEntity) -> None: ...

    def passivate(self, entity: ActiveEntity) -> None: ...


class ActiveEntity:
    """A resident entity. Owned by its shard; its task runs in the shard's nursery."""

    __slots__ = (
        "_busy",
        "_flush_queued",
        "_handler",
        "_keeper",
        "_last_saved",
        "_life",
        "_limiter",
        "_persisted",
        "_receive",
        "_send",
        "_withdrawn",
        "address",
        "backlog",
        "backlog_stale",
        "context",
        "implementation",
        "key",
        "last_active",
        "options",
        "shard",
    )

    def __init__(self, shard: EntityHost, hosted: Hosted, entity_id: str, key: str) -> None:
        self.shard = shard
        services = shard.services
        self.implementation = hosted.implementation
        self.options = options = hosted.options
        self.key = key
        self.address = EntityAddress(self.implementation.entity.name, entity_id, shard.lease.shard)
        self.context = EntityContext(
            self.address,
            services.client,
            services.address,
            EntityTimers(shard, self.address, services.client, services.config.max_message_size),
            deferreds=EntityDeferreds(shard, shard.lease.shard),
            is_draining=lambda: shard.draining,
        )
        self._send, self._receive = trio.open_memory_channel[Delivery | _Flush](
            options.mailbox_capacity
        )
        self._limiter = trio.Semaphore(options.concurrency) if options.concurrency > 1 else None
        self._life = Lifecycle(f"entity {key}", ENTITY_LIFECYCLE, EntityState.ACTIVE)
        self._handler: Any = None
        self.last_active = trio.current_time()
        # Requests queued or running: why an entity with work in hand is never
        # passivated. Persisted ones are also known by id, because storage may
        # offer the same request twice (a notice and a scan).
        self._busy = 0
        self._persisted: set[int] = set()
        # Persisted requests queued here that storage no longer has (cancelled timers).
        self._withdrawn: set[int] = set()
        self.backlog = False
        self.backlog_stale = False
        codec = self.implementation.state
        self._keeper = (
            None
            if codec is None
            else StateKeeper(codec, self.address.entity_type, entity_id, options.max_state_size)
        )
        self._last_saved = self.last_active
        self._flush_queued = False

    @property
    def state(self) -> EntityState:
        return self._life.state

    @property
    def idle(self) -> bool:
        return not self._busy and not self.backlog

    @property
    def queued(self) -> int:
        """Requests waiting in the mailbox now (not the one being handled)."""
        return self._receive.statistics().current_buffer_used

    def offer(self, delivery: Delivery) -> None:
        """Queue a request without waiting; the caller's error says why not.

        Synchronous on purpose: between the check and the enqueue no other
        task runs, so passivation can never strand a message.
        """
        envelope = delivery.envelope
        if envelope.persisted:
            if envelope.request_id in self._persisted:
                return
            if self.backlog:
                self.backlog_stale = True
                return
        try:
            self._send.send_nowait(delivery)
        except trio.WouldBlock:
            if envelope.persisted:
                self.backlog = True
                self.backlog_stale = True
                return
            self.shard.services.hooks.request_refused(
                envelope.entity_type, envelope.rpc, MailboxFull.reason
            )
            raise MailboxFull(
                f"mailbox of {self.address} is full ({self.options.mailbox_capacity} waiting)",
                entity_id=self.address.entity_id,
                request_id=envelope.request_id,
            ) from None
        except trio.ClosedResourceError:
            if envelope.persisted:
                return  # stays in storage for the shard's next owner
            raise EntityNotAssignedToRunner(
                f"{self.address} is stopping", entity_id=self.address.entity_id
            ) from None
        self._busy += 1
        if envelope.persisted:
            self._persisted.add(envelope.request_id)

    def withdraw(self, request_id: int) -> None:
        """Skip a queued persisted request storage deleted (a timer cancelled or replaced)."""
        if request_id in self._persisted:
            self._withdrawn.add(request_id)

    def passivate(self) -> None:
        """Leave the shard now and finish what is queued: idle passivation, or the cap."""
        self.shard.passivate(self)

    def nudge(self) -> None:
        """Ask an idle entity to save what volatile requests changed (the shard's flusher)."""
        keeper = self._keeper
        if keeper is None or self._flush_queued or not self.idle or not keeper.dirty:
            return
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(FLUSH)
            self._flush_queued = True

    def close(self) -> None:
        """Stop taking requests; the task finishes what is queued, then ends."""
        self._life.fire(EntityEvent.CLOSE)
        self._send.close()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as workers:
                while await self._serve_epoch(workers):
                    pass
            await self._retire()
        except* Exception as bug:
            log.exception(
                "entity %s failed outside any request; stopping it", self.address, exc_info=bug
            )
            self.shard.services.hooks.contained_failure("entity", bug)
        finally:
            self._life.fire(EntityEvent.STOP)
            self.shard.forget(self)
            self._fail_queued()

    async def _serve_epoch(self, workers: trio.Nursery) -> bool:
        """Take requests in one epoch (see :class:`_Epoch`): True when an interrupt
        spent it, so the next ones need a new one; False once the mailbox closed."""
        chain = (self.key,) if self._limiter is None else ()
        epoch = _Epoch()
        with epoch.interrupts, epoch.guard:
            while not epoch.spent:
                if self._limiter is not None:
                    await self._limiter.acquire()
                delivery = await self._next()
                if delivery is None:
                    return False
                if isinstance(delivery, _Flush):
                    # Only entities at concurrency 1 have state, and so flushes.
                    self._flush_queued = False
                    await self._save_changes()
                elif self._limiter is None:
                    await self._handle(delivery, chain, epoch)
                else:
                    workers.start_soon(self._handle_concurrently, delivery, self._limiter)
        return True

    def _fail_queued(self) -> None:
        """Volatile requests still queued when the entity stops get an answer now.

        Without it their callers would wait out their whole timeout;
        persisted ones stay in storage for the shard's next owner.
        """
        self._send.close()
        while True:
            try:
                delivery = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if isinstance(delivery, _Flush):
                continue
            self._done(delivery.envelope)
            delivery.fail_if_volatile(
                RunnerUnavailable(
                    f"{self.address} stopped before handling the request",
                    entity_id=self.address.entity_id,
                )
            )

    def _done(self, envelope: Envelope) -> None:
        self._busy -= 1
        if envelope.persisted:
            self._persisted.discard(envelope.request_id)
            self._withdrawn.discard(envelope.request_id)

    async def _next(self) -> Delivery | _Flush | None:
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
        if self._life.state is not EntityState.ACTIVE:
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
        stored = self.shard.services.stored_replies
        for envelope in found:
            self.offer(Delivery(envelope, stored.target(envelope.request_id)))
        if self.backlog_stale or more:
            self.backlog = True

    async def _handle_concurrently(self, delivery: Delivery, limiter: trio.Semaphore) -> None:
        """One request in a worker task of its own, in an epoch of its own."""
        epoch = _Epoch()
        try:
            with epoch.interrupts, epoch.guard:
                await self._handle(delivery, (), epoch)
        finally:
            limiter.release()

    async def _handle(self, delivery: Delivery, chain: tuple[str, ...], epoch: _Epoch) -> None:
        """Handle one request in the calling task: the entity's own, or a worker's.

        No handler run starts (here, nor a rerun after a suspension or a
        defect) before the shard's lease is surely still held: a runner
        resuming from a freeze waits for its lock connection's next answer (or
        the loss that stops this entity), rather than running a queued
        request beside the shard's new owner.
        """
        await self.shard.services.confirmed(self.address.shard)
        envelope = delivery.envelope
        if envelope.request_id in self._withdrawn:
            self._done(envelope)
            return
        hooks = self.shard.services.hooks
        current = handling(
            envelope, delivery.redelivered, chain, self.address, self.shard.services.address
        )
        timer = timer_name(envelope)
        if timer is not None:
            hooks.timer_changed(self.address, timer, "fired")
        hooks.handling_started(current)
        outcome = "cancelled"
        try:
            reply = await self._interruptibly(delivery, current, epoch)
            while reply is SUSPENSION:
                assert current.suspended_on is not None
                # A suspended run leaves no effect on the state: it runs again, whole.
                self._forget_state()
                parked = await self.shard.suspend(delivery, current.suspended_on)
                if parked is not False:
                    outcome = "unstored" if parked is None else "suspended"
                    return
                # Completed meanwhile: run again now, with its outcome there to read.
                await self.shard.services.confirmed(self.address.shard)
                reply = await self._interruptibly(delivery, current, epoch)
            assert isinstance(reply, bytes)
            outcome = "unstored"
            final = await self._finish(delivery, reply)
            if final is not None:
                outcome = replies.outcome(final)
        except StateUnreadable as error:
            # The entity cannot run at all: a typed error for volatile callers now;
            # persisted requests stay in storage, for when the state is readable.
            outcome = error.reason
            log.exception("%s: %s", self.address, error.message)
            delivery.fail_if_volatile(error)
            self.passivate()
        except Exception as bug:
            # Not the handler's (its exceptions are defects or declared errors,
            # answered in _reply_to): the runtime failed on this request.
            log.exception(
                "internal error handling %s for %s", envelope.rpc, self.address, exc_info=bug
            )
            hooks.contained_failure("request", bug)
            # A target takes its first reply only, so this cannot answer twice.
            failed = RpcClientError(
                f"{self.address} could not handle {envelope.rpc!r}: internal error",
                cause_type=type(bug).__name__,
                entity_id=self.address.entity_id,
            )
            outcome = failed.reason
            delivery.fail_if_volatile(failed)
        finally:
            if outcome == "cancelled":
                # The shard was released under this request. Tell a volatile
                # caller now rather than at its timeout; a persisted request
                # stays in storage for the next owner.
                delivery.fail_if_volatile(
                    RunnerUnavailable(
                        f"{self.address} stopped while processing the request",
                        entity_id=self.address.entity_id,
                    )
                )
            self._done(envelope)
            self.last_active = trio.current_time()
            hooks.handling_finished(current, outcome)

    async def _interruptibly(
        self, delivery: Delivery, current: Handling, epoch: _Epoch
    ) -> bytes | _Suspension:
        """The reply, unless the caller withdrew the request first (see the module doc).

        Only the handler's run is interruptible: once it has returned, its
        reply is made and sent whatever interrupt comes next. An interrupt
        that came after the handler's last checkpoint spends the epoch all
        the same (its scope is cancelled), so what follows runs shielded.
        """
        envelope = delivery.envelope
        rpc = self.implementation.entity.rpcs.get(envelope.rpc)
        if rpc is not None and not rpc.interruptible:
            return await self._reply_to(delivery, current)
        interrupts = self.shard.interrupts if envelope.persisted else None
        starting = not delivery.interrupted if interrupts is None else interrupts.starting(delivery)
        # A spent epoch means this request was interrupted in an earlier run of it.
        if not starting or epoch.spent:
            return self._interrupted(envelope, "before its handler started")
        delivery.arm(epoch.interrupts)
        try:
            return await self._reply_to(delivery, current)
        except BaseException as stopped:
            if not (epoch.spent and _only_cancelled(stopped)):
                raise
            # The interrupt's cancellation, caught here rather than by its
            # scope, so the request is answered; a stop of the shard that
            # came with it reaches the task once it leaves the epoch.
        finally:
            delivery.disarm()
            if epoch.spent:
                epoch.spend()
            if interrupts is not None:
                interrupts.finished(delivery)
        if self._keeper is not None:
            self._forget_state()
        return self._interrupted(envelope, "while its handler ran")

    def _interrupted(self, envelope: Envelope, when: str) -> bytes:
        interrupted = Interrupted(
            f"{envelope.rpc!r} for {self.address} was withdrawn by its caller {when}"
        )
        return self._error(interrupted, envelope)

    async def _finish(self, delivery: Delivery, reply: bytes) -> bytes | None:
        """Make the reply final, with what the request changed in the entity's state.

        Returns the reply its caller got, or None when a persisted one could
        not be stored (the request stays unprocessed, to run again).
        """
        envelope = delivery.envelope
        keeper = self._keeper
        change = None
        if keeper is not None:
            try:
                change = keeper.change()
            except SerializationError as refusal:
                # The request's effect on the state is refused with it.
                self._forget_state()
                reply = self._error(refusal, envelope)
        if envelope.persisted:
            write = None if change is None else change[0]
            stored = await self.shard.complete(delivery, reply, write)
            if change is not None:
                self._committed(stored, change[1])
            return reply if stored else None
        if change is not None and self.options.state_save == "request":
            if not await self.shard.save_state(change[0]):
                self._forget_state()
                rolled_back = RunnerUnavailable(
                    f"{self.address} could not store its state: the request's effect "
                    "was rolled back",
                    entity_id=self.address.entity_id,
                )
                reply = self._error(rolled_back, envelope)
                delivery.target.resolve(reply)
                return reply
            self._committed(True, change[1])
        await self.shard.complete(delivery, reply)
        if (
            change is not None
            and self.options.state_save == "interval"
            and trio.current_time() - self._last_saved >= self.options.state_save_interval
        ):
            await self._save_changes()
        return reply

    def _committed(self, stored: bool, encoded: bytes) -> None:
        if stored:
            assert self._keeper is not None
            self._keeper.committed(encoded)
            self._last_saved = trio.current_time()
        else:
            self._forget_state()

    def _forget_state(self) -> None:
        """Roll back to the committed state: a new handler, from storage, next time."""
        self._handler = None
        if self._keeper is not None:
            self._keeper.forget()

    async def _save_changes(self) -> None:
        """Store what volatile requests changed, if anything (between requests, never during)."""
        keeper = self._keeper
        if keeper is None:
            return
        try:
            change = keeper.change()
        except SerializationError as error:
            log.exception("%s: %s; its unsaved changes are dropped", self.address, error.message)
            self._forget_state()
            return
        if change is not None and await self.shard.save_state(change[0]):
            self._committed(True, change[1])

    async def _retire(self) -> None:
        """Leaving gracefully (passivation, a handoff): the hook, then what is unsaved."""
        if self._handler is None:
            return
        with trio.move_on_after(self.options.hook_timeout) as bound:
            hook = self.implementation.on_passivate
            if hook is not None:
                try:
                    await hook(self._handler)
                except Exception:
                    log.exception("on_passivate of %s failed", self.address)
            await self._save_changes()
        if bound.cancelled_caught:
            log.warning("%s took over %s s to passivate", self.address, self.options.hook_timeout)

    async def _build_handler(self) -> Any:
        """A handler instance from the committed state, activated (its hook run)."""
        implementation = self.implementation
        keeper = self._keeper
        if keeper is None:
            handler = implementation.handler(self.context)
        else:
            data = await self.shard.load_state(self.address.entity_type, self.address.entity_id)
            handler = implementation.handler(self.context, keeper.load(data))
        hook = implementation.on_activate
        if hook is not None:
            with trio.fail_after(self.options.hook_timeout):
                await hook(handler)
        return handler

    async def _reply_to(self, delivery: Delivery, current: Handling) -> bytes | _Suspension:
        """Run the handler under the defect retry policy and encode what it said
        (SUSPENSION when it suspended on a deferred, see ``ctx.deferred``).

        A stream handler's chunks go to its delivery's stream as it yields
        them; its reply ends the stream. A defect in it is not retried: the
        chunks it sent would be sent again.
        """
        envelope = delivery.envelope
        implementation = self.implementation
        max_size = self.shard.services.config.max_message_size
        rpc = implementation.entity.rpcs.get(envelope.rpc)
        if rpc is None:
            missing = MalformedMessage(f"{self.address} has no RPC {envelope.rpc!r}")
            return self._error(missing, envelope)
        sink = delivery.stream
        # A persisted stream comes from storage, never with a sink: its chunks go there too.
        if (rpc.stream and not envelope.persisted) != (sink is not None):
            shape = "a stream, sent as a request" if rpc.stream else "no stream, sent as one"
            return self._error(MalformedMessage(f"{rpc!r} is {shape}"), envelope)
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
                    self._handler = await self._build_handler()
                current.suspended_on = None
                if not rpc.stream:
                    value = await method(self._handler, payload)
                elif sink is not None:
                    await _pump(method(self._handler, payload), sink.send_chunk, max_size)
                    value = None
                else:
                    await self._pump_stored(method(self._handler, payload), rpc, current)
                    value = None
            except StateUnreadable:
                raise
            except rpc.errors as declared:
                try:
                    return replies.declared_error(declared, max_size)
                except ClusterError as error:
                    return self._error(error, envelope)
            except Suspended as suspended:
                if current.suspended_on is not None and envelope.persisted:
                    return SUSPENSION
                # Raised by the handler itself: its request's final reply.
                return self._error(suspended, envelope)
            except Exception as defect:
                if isinstance(defect, ClusterError) and not defect.retryable:
                    # Suspended, a refused call cycle, a malformed call out:
                    # deterministic, so a restart could only repeat it.
                    return self._error(defect, envelope)
                if sink is not None and isinstance(defect, RunnerUnavailable):
                    # From the sink: the stream's caller is gone (its link closed),
                    # no defect of the handler's. From a call the handler made: a
                    # stream is never run again anyway. Either way it ends here.
                    return self._error(defect, envelope)
                # Anything else undeclared is a defect: drop the (possibly
                # corrupt) handler state and retry on a fresh instance.
                self._forget_state()
                self.shard.services.hooks.defect(current, defect)
                delay = None if rpc.stream else next(delays, None)
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
                # A retry is a new run: gated like the first (a freeze may have ended it).
                await self.shard.services.confirmed(self.address.shard)
                current.attempt += 1
                continue
            try:
                return replies.success(value, max_size)
            except ClusterError as error:
                return self._error(error, envelope)

    async def _pump_stored(
        self, chunks: AsyncGenerator[object, None], rpc: Rpc[Any, Any], current: Handling
    ) -> None:
        """Store each chunk a persisted stream's handler yields, from the stored ack on
        (the handler was given it as ``resume_from``), a window at most past it."""
        request_id = current.request_id
        services = self.shard.services
        watch = services.watchers.owner(request_id, rpc.window)
        try:
            sink = StoredChunkSink(
                services.streams,
                watch,
                self.shard.lease,
                request_id,
                await services.streams.acked(request_id),
            )
            current.resume_from = sink.seq
            await _pump(chunks, sink.send_chunk, services.config.max_message_size)
        finally:
            services.watchers.forget(request_id, watch)

    def _error(self, error: ClusterError, envelope: Envelope) -> bytes:
        error.entity_id = self.address.entity_id
        return replies.failure(error, envelope.request_id)


async def _pump(
    chunks: AsyncGenerator[object, None],
    send: Callable[[bytes], Awaitable[None]],
    max_size: int,
) -> None:
    """Send each chunk a stream handler yields, waiting at its ``yield`` for credit.

    Closed on every way out, so an interrupt (a cancellation while it waits)
    reaches the generator at its ``yield``, where its ``finally`` blocks run.
    """
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            await send(replies.encode_payload(chunk, max_size))
