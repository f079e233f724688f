"""Sending to entities: ``ask`` waits for the reply, ``tell`` only for acceptance.

Persisted requests are stored before anything else happens, so an
acknowledged request survives whatever comes next; the direct delivery
that follows is only the fast path, and redelivery from storage is the
guarantee.
"""

from __future__ import annotations

import contextlib
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..core import reply as replies
from ..core.envelope import Envelope, entity_key
from ..core.hashing import ShardId, shard_index
from ..entity import Rpc
from ..errors import (
    AlreadyProcessingMessage,
    EntityNotAssignedToRunner,
    RunnerUnavailable,
    SendTimeout,
)
from .context import call_chain
from .replies import wait

if TYPE_CHECKING:
    from .runner import Runner

P = TypeVar("P")
S = TypeVar("S")


class Client:
    """Sends to any entity of the cluster through one runner."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def ask(
        self,
        rpc: Rpc[P, S],
        entity_id: str,
        payload: P,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - SendTimeout is part of the contract
        deliver_at: datetime | None = None,
    ) -> S:
        """Send a request and return the handler's result, or raise its declared error.

        Raises SendTimeout when no reply comes within ``timeout`` (default
        ``ShardingConfig.send_timeout``). A persisted request stays stored
        after a timeout and is still processed; asking again with the same
        primary key returns its reply. ``deliver_at`` holds the request back
        from the handler until that (timezone-aware) time.
        """
        chain = call_chain.get()
        target = entity_key(rpc.entity.name, entity_id)
        if target in chain:
            raise AlreadyProcessingMessage(
                f"{target} is waiting, up the call chain {' -> '.join(chain)}, "
                "for this call: at concurrency 1 it could never answer (use tell, "
                "or raise the entity's concurrency)",
                entity_id=entity_id,
            )
        envelope = self._envelope(rpc, entity_id, payload, chain, deliver_at)
        limit = self._runner.config.send_timeout if timeout is None else timeout
        with trio.move_on_after(limit if limit > 0 else math.inf):
            reply = await self._send(envelope)
            return replies.decode(  # type: ignore[no-any-return]
                reply,
                rpc.success_decoder,
                rpc.errors_by_name,
                entity_id=entity_id,
                request_id=envelope.request_id,
            )
        raise SendTimeout(
            f"no reply from {target} to {rpc.name!r} within {limit} s",
            entity_id=entity_id,
            request_id=envelope.request_id,
        )

    async def tell(
        self, rpc: Rpc[P, Any], entity_id: str, payload: P, *, deliver_at: datetime | None = None
    ) -> None:
        """Send without waiting for the handler.

        Returns once the request is accepted: stored, for a persisted RPC
        (then it will be processed even if this process dies now), or
        queued in the entity's mailbox for a volatile one. With
        ``deliver_at``, the handler sees it at that time, not before; a
        persisted one is kept to that time across restarts.
        """
        envelope = self._envelope(rpc, entity_id, payload, (), deliver_at)
        if envelope.persisted:
            saved = await self._runner.storage.messages.save_request(
                envelope, self._runner.session.machine_id, announce=not self._owned_here(envelope)
            )
            if not saved.duplicate:
                self._notify(envelope)
            return
        await self._deliver(envelope)

    def _envelope(
        self,
        rpc: Rpc[P, Any],
        entity_id: str,
        payload: P,
        chain: tuple[str, ...],
        deliver_at: datetime | None,
    ) -> Envelope:
        runner = self._runner
        entity = rpc.entity
        primary_key = rpc.primary_key(payload) if rpc.primary_key is not None else None
        return Envelope(
            request_id=runner.ids.next_id(),
            entity_type=entity.name,
            entity_id=entity_id,
            shard_group=entity.shard_group,
            shard_index=shard_index(entity_id, runner.config.shards_per_group),
            rpc=rpc.name,
            payload=replies.encode_payload(payload),
            persisted=rpc.persisted,
            primary_key=primary_key,
            deliver_at_ms=None if deliver_at is None else _unix_ms(deliver_at),
            call_chain=chain,
        )

    async def _send(self, envelope: Envelope) -> bytes:
        runner = self._runner
        if not envelope.persisted:
            # A request that reached a runner no longer owning its shard
            # never ran: resend it while the shard settles on its new owner.
            delays = runner.config.send_retry.delays()
            while True:
                reply = await self._attempt(envelope)
                delay = next(delays, None) if replies.misrouted(reply) else None
                if delay is None:
                    return reply
                await trio.sleep(delay)

        messages = runner.storage.messages
        # Expect the reply before storing: another runner may process the
        # request and announce its reply before the save returns here.
        slot = runner.replies.expect(envelope.request_id)
        try:
            saved = await messages.save_request(
                envelope, runner.session.machine_id, announce=not self._owned_here(envelope)
            )
            if not saved.duplicate:
                self._notify(envelope)
                return await wait(slot)
        finally:
            runner.replies.forget(envelope.request_id, slot)
        if saved.reply is not None:
            return saved.reply
        slot = runner.replies.expect(saved.request_id)
        try:
            # The original may have completed between the save and expect();
            # its reply is then only in storage.
            stored = await messages.reply_for(saved.request_id)
            return stored if stored is not None else await wait(slot)
        finally:
            runner.replies.forget(saved.request_id, slot)

    async def _attempt(self, envelope: Envelope) -> bytes:
        runner = self._runner
        slot = runner.replies.expect(envelope.request_id)
        try:
            await self._deliver(envelope)
            return await wait(slot)
        finally:
            runner.replies.forget(envelope.request_id, slot)

    def _owned_here(self, envelope: Envelope) -> bool:
        """Whether this runner serves the request's shard, so no notice need announce it."""
        return ShardId(envelope.shard_group, envelope.shard_index) in self._runner.shards

    def _notify(self, envelope: Envelope) -> None:
        """Offer a stored request to an owner here now; otherwise the storage notice will."""
        with contextlib.suppress(EntityNotAssignedToRunner, RunnerUnavailable):
            self._runner.route(envelope)

    async def _deliver(self, envelope: Envelope) -> None:
        """Queue a volatile request, retrying while its shard has no owner here.

        Only routing failures are retried, within ``ShardingConfig.send_retry``:
        the request has then certainly not reached a handler.
        """
        runner = self._runner
        delays = runner.config.send_retry.delays()
        while True:
            try:
                owner = runner.route(envelope)
                if owner is not None:
                    assert runner.network is not None
                    await runner.network.send_request(owner, envelope)
            except (EntityNotAssignedToRunner, RunnerUnavailable):
                delay = next(delays, None)
                if delay is None:
                    raise
                await trio.sleep(delay)
            else:
                return


def _unix_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError(
            "deliver_at must be timezone-aware: a naive time names a different "
            "instant on each runner"
        )
    return int(moment.timestamp() * 1000)
