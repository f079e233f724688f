"""The request record that storage keeps and the transport carries.

One shape for both, so a persisted message is stored and sent without
conversion, and a redelivered message is byte-for-byte what the caller sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import msgspec

MAX_DEDUP_KEY_LENGTH = 255
"""Longer keys are stored as their SHA-256, so any index can hold them."""
MAX_ENTITY_ID_BYTES = 1024
"""UTF-8 bytes; PostgreSQL indexes entity ids, and a btree entry must fit a third of a page."""
MAX_PRIMARY_KEY_BYTES = 4096
"""UTF-8 bytes of a primary key (the dedup key hashes long ones; the key itself is kept)."""
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8192
"""UTF-8 bytes of all header names and values of one request together."""
MAX_CALL_CHAIN = 64
"""Entities waiting up one call chain; a longer chain is a runaway recursion."""
MAX_DELIVER_AT_MS = 253_402_300_799_999
"""The last millisecond of the year 9999: the last ``datetime`` can name."""


class Envelope(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One request to one entity.

    ``call_chain`` lists the turn-based (concurrency 1) entities that are
    waiting on this request, so that a call cycle is refused instead of
    deadlocking, even when the cycle crosses runners. ``deliver_at_ms`` is a
    Unix time in milliseconds before which the handler must not see it.
    ``interrupted`` is set by storage alone, on a persisted request whose
    caller withdrew it: read back, it is answered ``Interrupted`` without
    running (a sender never sets it; a peer that does only withdraws its own
    request).
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
    interrupted: bool = False

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


def text_problem(what: str, text: object, max_bytes: int) -> str | None:
    """Why ``text`` cannot name anything in storage or on the wire, or None when it can.

    PostgreSQL text refuses NUL, UTF-8 refuses lone surrogates, and an index
    refuses an entry that is too long: each would otherwise surface late, as
    a storage or encoding error, or as a retryable error that never succeeds.
    """
    if type(text) is str and text.isascii():
        # The common case, without encoding: an ASCII string is its own UTF-8.
        size = len(text)
    elif not isinstance(text, str):
        return f"{what} must be a str (got {type(text).__name__})"
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            return f"{what} is not valid Unicode (a lone surrogate)"
    if "\x00" in text:
        return f"{what} contains a NUL character"
    if size > max_bytes:
        return f"{what} is {size} UTF-8 bytes, over the limit of {max_bytes}"
    return None


def headers_problem(headers: Mapping[str, str]) -> str | None:
    """Why a request's headers are refused (too many, too large, not text), or None."""
    if len(headers) > MAX_HEADERS:
        return f"{len(headers)} headers, over the limit of {MAX_HEADERS}"
    total = 0
    for name, value in headers.items():
        for part, text in (("header name", name), (f"header {name!r}", value)):
            problem = text_problem(part, text, MAX_HEADER_BYTES)
            if problem is not None:
                return problem
            total += len(text.encode("utf-8"))
    if total > MAX_HEADER_BYTES:
        return f"headers are {total} UTF-8 bytes, over the limit of {MAX_HEADER_BYTES}"
    return None


def envelope_problem(envelope: Envelope, shards_per_group: int) -> str | None:
    """Why a request that came from outside this process is refused, or None.

    Whatever a peer sends is checked here before it reaches a shard, so that
    an oversized or unstorable request is refused rather than stored or
    echoed back. (Its shard is checked against its entity id where it
    matters, when the shard activates the entity: a request addressed to
    the wrong shard would otherwise activate a second copy of its entity.)
    """
    if not 0 <= envelope.shard_index < shards_per_group:
        return f"shard index {envelope.shard_index} is not in 0..{shards_per_group - 1}"
    problem = text_problem("entity id", envelope.entity_id, MAX_ENTITY_ID_BYTES)
    if problem is None and envelope.headers:
        problem = headers_problem(envelope.headers)
    if problem is None and envelope.primary_key is not None:
        problem = text_problem("primary key", envelope.primary_key, MAX_PRIMARY_KEY_BYTES)
    if problem is not None:
        return problem
    if len(envelope.call_chain) > MAX_CALL_CHAIN:
        return f"call chain of {len(envelope.call_chain)}, over the limit of {MAX_CALL_CHAIN}"
    due = envelope.deliver_at_ms
    if due is not None and not 0 <= due <= MAX_DELIVER_AT_MS:
        return f"deliver_at_ms {due} is not a time between 1970 and the year 9999"
    return None
