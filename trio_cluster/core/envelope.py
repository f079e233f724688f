"""The request record that storage keeps and the transport carries.

One shape for both, so a persisted message is stored and sent without
conversion, and a redelivered message is byte-for-byte what the caller sent.
"""

from __future__ import annotations

import hashlib

import msgspec

MAX_DEDUP_KEY_LENGTH = 255
"""Longer keys are stored as their SHA-256, so any index can hold them."""


class Envelope(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One request to one entity.

    ``call_chain`` lists the turn-based (concurrency 1) entities that are
    waiting on this request, so that a call cycle is refused instead of
    deadlocking, even when the cycle crosses runners. ``deliver_at_ms`` is a
    Unix time in milliseconds before which the handler must not see it.
    """

    request_id: int
    entity_type: str
    entity_id: str
    shard_group: str
    shard_index: int
    rpc: str
    payload: bytes
    persisted: bool = False
    primary_key: str | None = None
    deliver_at_ms: int | None = None
    headers: dict[str, str] = {}
    call_chain: tuple[str, ...] = ()

    @property
    def entity_key(self) -> str:
        return entity_key(self.entity_type, self.entity_id)

    @property
    def dedup_key(self) -> str | None:
        if self.primary_key is None:
            return None
        return dedup_key(self.entity_type, self.entity_id, self.rpc, self.primary_key)


def entity_key(entity_type: str, entity_id: str) -> str:
    """The name one entity goes by in call chains, logs and storage."""
    return f"{entity_type}/{entity_id}"


def dedup_key(entity_type: str, entity_id: str, rpc: str, primary_key: str) -> str:
    """The unique key of an idempotent request.

    It names the entity and the RPC as well as the caller's key, so two RPCs
    (or two entities) may use the same primary key without colliding.
    """
    key = f"{entity_type}/{entity_id}/{rpc}/{primary_key}"
    if len(key) > MAX_DEDUP_KEY_LENGTH:
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key
