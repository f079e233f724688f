"""Where a request goes: into a shard owned here, or to the runner that owns it.

The routing table (the assignment and the shards served here) is written by
the shard keeper alone and read here. Requests from peers come in here too,
and are checked before they reach a shard: a peer is outside input, so
what it sends is validated (its shard against its entity id, its sizes,
that it is volatile: persisted requests travel through storage, never in a
frame), and anything refused is answered on the peer's own link. A request the
peer sent with ``ack`` (an acknowledged ``tell``) is answered as soon as
it is queued; whatever its handler returns is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from ..config import ShardingConfig
from ..core.envelope import Envelope, envelope_problem
from ..core.hashing import ShardId
from ..core.reply import DROPPED, ReplyTarget, failure, success
from ..core.reserved import RUNNER_GROUP
from ..errors import ClusterError, EntityNotAssignedToRunner, MailboxFull, MalformedMessage
from .delivery import Delivery
from .hooks import Hooks

if TYPE_CHECKING:
    from ..transport.link import LinkReply
    from ..transport.network import Network


ACCEPTED = success(None)
"""The reply to an acknowledged tell that was queued."""


class ServedShard(Protocol):
    """What routing needs of a shard served here (a ShardRuntime)."""

    def offer(self, delivery: Delivery) -> None: ...


class Router:
    def __init__(
        self,
        address: str,
        config: ShardingConfig,
        hooks: Hooks,
        shards: Mapping[ShardId, ServedShard],
    ) -> None:
        self.address = address
        self._config = config
        self._hooks = hooks
        self.assignment: dict[ShardId, str] = {}
        """Every shard's owner, as this runner computes it from the live runners."""
        self._shards = shards
        """The shards this runner holds a lease on now (the keeper's, read here)."""
        self.network: Network | None = None
        self.on_runner_request: Callable[[Envelope, ReplyTarget], None] | None = None
        """Where runner messages go (requests for this runner itself, not a shard)."""

    def route(self, delivery: Delivery) -> str | None:
        """Queue a request whose shard is owned here; otherwise name the owner to send it to
        (over ``network``: without one, no owner elsewhere can be reached)."""
        envelope = delivery.envelope
        shard_id = ShardId(envelope.shard_group, envelope.shard_index)
        shard = self._shards.get(shard_id)
        if shard is not None:
            shard.offer(delivery)
            return None
        owner = self.assignment.get(shard_id)
        if owner is None or owner == self.address or self.network is None:
            raise EntityNotAssignedToRunner(
                f"shard {shard_id} is not owned by {self.address}",
                entity_id=envelope.entity_id,
                request_id=envelope.request_id,
            )
        return owner

    def serves(self, shard_id: ShardId) -> bool:
        return shard_id in self._shards

    def on_remote_request(self, reply: LinkReply, envelope: Envelope) -> None:
        """A peer sent a request for a shard it believes is ours: queue it or refuse it."""
        problem = envelope_problem(envelope, self._config.shards_per_group)
        if problem is None and envelope.persisted:
            problem = "persisted requests travel through storage, never in a request frame"
        try:
            if problem is not None:
                raise MalformedMessage(problem, entity_id=envelope.entity_id)
            if envelope.shard_group == RUNNER_GROUP and self.on_runner_request is not None:
                self.on_runner_request(envelope, reply)  # answers, or refuses, on its own
                return
            shard = self._shards.get(ShardId(envelope.shard_group, envelope.shard_index))
            if shard is None:
                raise EntityNotAssignedToRunner(
                    f"shard {envelope.shard_group}/{envelope.shard_index} "
                    f"is not owned by {self.address}",
                    entity_id=envelope.entity_id,
                )
            if reply.ack:
                shard.offer(Delivery(envelope, DROPPED))
                reply.resolve(ACCEPTED)
                return
            delivery = Delivery(envelope, reply, stream=reply.sink())
            shard.offer(delivery)
            reply.delivery = delivery
        except ClusterError as error:
            if not isinstance(error, MailboxFull):  # the mailbox reports its own refusals
                self._hooks.request_refused(envelope.entity_type, envelope.rpc, error.reason)
            reply.resolve(failure(error, envelope.request_id))
