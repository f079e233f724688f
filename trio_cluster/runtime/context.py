"""What a handler knows about itself, and the call chain that guards against deadlock."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

import attrs

from ..core.hashing import ShardId

if TYPE_CHECKING:
    from .client import Client

call_chain: ContextVar[tuple[str, ...]] = ContextVar("trio_cluster_call_chain", default=())
"""Turn-based entities waiting, up the stack, on the code running now.

Set by the entity task for each message; read by ``ask`` to refuse a call
that would wait on one of them (A asks A, or A asks B asks A), which at
concurrency 1 can never be answered.
"""


@attrs.frozen
class EntityAddress:
    entity_type: str
    entity_id: str
    shard: ShardId

    def __str__(self) -> str:
        return f"{self.entity_type}/{self.entity_id}@{self.shard}"


@attrs.frozen
class EntityContext:
    """Handed to a handler class when an entity is activated.

    ``client`` sends from inside the entity: calls made through it carry
    the call chain, so a cycle back into this entity fails fast instead of
    hanging.
    """

    address: EntityAddress
    client: Client
    runner_address: str
