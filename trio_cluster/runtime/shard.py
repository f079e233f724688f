"""One owned shard: a lease, a nursery, and the entities living in it.

The shard's nursery owns its entity tasks, so releasing the shard is
cancelling one scope: exactly that shard's entities stop, at once when
the lease is lost, or after draining their mailboxes on a graceful stop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..core.envelope import Envelope
from ..core.retry import RetryPolicy
from ..errors import ClusterError, EntityNotAssignedToRunner, PersistenceError
from ..storage.base import Lease
from .mailbox import ActiveEntity

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("trio_cluster.shard")

REDELIVERY_PAGE = 1000
STORAGE_RECOVERY = RetryPolicy(
    base_delay=0.05, max_delay=2.0, max_attempts=2**62, max_elapsed=float(2**62)
)
"""Backoff for reads that must eventually succeed: capped, and never giving up."""
RELEASE_TIMEOUT = 5.0
"""Bound on releasing a lease: a storage that does not answer must not hold up shutdown."""


class ShardRuntime:
    __slots__ = (
        "_done_while_reading",
        "_draining",
        "_nursery",
        "_readers",
        "_scope",
        "_stopped",
        "accepting",
        "entities",
        "lease",
        "lost",
        "runner",
    )

    def __init__(self, runner: Runner, lease: Lease) -> None:
        self.runner = runner
        self.lease = lease
        self.entities: dict[str, ActiveEntity] = {}
        self.accepting = False
        self.lost = False
        self._scope = trio.CancelScope()
        self._draining = trio.Event()
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Storage reads are snapshots: a request read as unprocessed may
        # complete before the read returns. While a read is outstanding,
        # completed ids are remembered here and filtered from its result,
        # so redelivery never runs a handler twice.
        self._readers = 0
        self._done_while_reading: set[int] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.accepting = True
                    task_status.started()
                    nursery.start_soon(self._redeliver)
                    await self._draining.wait()
                    self.accepting = False
                    for entity in list(self.entities.values()):
                        entity.close()
        finally:
            self.accepting = False
            self.runner.shard_stopped(self)
            if not self.lost:
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                    try:
                        await self.runner.session.release(self.lease)
                    except ClusterError:
                        log.warning("could not release %s; it expires with the session", self.lease)
            self._stopped.set()

    def offer(self, envelope: Envelope) -> None:
        if not self.accepting:
            raise EntityNotAssignedToRunner(
                f"shard {self.lease.shard} is stopping on {self.runner.address}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        key = envelope.entity_key
        entity = self.entities.get(key)
        if entity is None:
            entity = self._activate(envelope, key)
        entity.offer(envelope)
        self.runner.touch(entity)

    def _activate(self, envelope: Envelope, key: str) -> ActiveEntity:
        runner = self.runner
        hosted = runner.hosted.get(envelope.entity_type)
        if hosted is None:
            raise EntityNotAssignedToRunner(
                f"runner {runner.address} hosts no entity type {envelope.entity_type!r}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        assert self._nursery is not None
        runner.make_room()
        implementation, options = hosted
        entity = ActiveEntity(self, implementation, options, envelope.entity_id, key)
        self.entities[key] = entity
        runner.resident[key] = entity
        runner.metrics.activations += 1
        self._nursery.start_soon(entity.run, name=f"entity {key}")
        return entity

    def passivate(self, entity: ActiveEntity) -> None:
        """Unmap an idle entity and close its mailbox; its task then ends."""
        self.forget(entity)
        entity.close()
        self.runner.metrics.passivations += 1

    def forget(self, entity: ActiveEntity) -> None:
        if self.entities.get(entity.key) is entity:
            del self.entities[entity.key]
            del self.runner.resident[entity.key]

    async def complete(self, envelope: Envelope, reply: bytes) -> None:
        """Make a reply final: stored under this shard's lease if persisted, then delivered."""
        if envelope.persisted and not await self.runner.store_reply(envelope, reply, self.lease):
            return
        if self._readers:
            self._done_while_reading.add(envelope.request_id)
        self.runner.metrics.processed += 1
        self.runner.replies.resolve(envelope.request_id, reply)

    async def read_unprocessed(
        self, *, entity: tuple[str, str] | None = None, after: int = 0, limit: int
    ) -> tuple[list[Envelope], int | None]:
        """Unprocessed requests, less any that completed while reading, and the next cursor.

        A storage outage is waited out, for as long as the shard is ours:
        these requests are acknowledged, so giving up would strand them.
        """
        self._readers += 1
        try:
            delays = STORAGE_RECOVERY.delays()
            while True:
                try:
                    found = await self.runner.storage.messages.unprocessed(
                        self.lease.shard, entity=entity, after=after, limit=limit
                    )
                    break
                except PersistenceError as error:
                    log.warning("reading %s failed, retrying: %s", self.lease.shard, error)
                    await trio.sleep(next(delays))
            cursor = found[-1].request_id if len(found) >= limit else None
            done = self._done_while_reading
            return [e for e in found if e.request_id not in done], cursor
        finally:
            self._readers -= 1
            if not self._readers:
                self._done_while_reading.clear()

    async def _redeliver(self) -> None:
        """Offer what the previous owner left unprocessed, as soon as the shard is ours."""
        cursor: int | None = 0
        while cursor is not None and self.accepting:
            page, cursor = await self.read_unprocessed(after=cursor, limit=REDELIVERY_PAGE)
            for envelope in page:
                try:
                    self.offer(envelope)
                except ClusterError as error:
                    log.debug("left %s in storage: %s", envelope.request_id, error)

    def lose(self) -> None:
        """The lease is gone: stop every entity now, without draining or releasing."""
        self.lost = True
        self.accepting = False
        self._scope.cancel()

    async def stop(self, grace: float) -> None:
        """Drain gracefully for up to ``grace`` seconds, then cancel whatever still runs."""
        self._draining.set()
        with trio.move_on_after(grace):
            await self._stopped.wait()
        self._scope.cancel()
        await self._stopped.wait()
