"""Replies as bytes: one encoding for storage, the wire and the local path.

A reply is ``[kind, body]`` in msgpack. Encoding every reply, even a local
one, means a reply that cannot cross a process boundary fails in tests on
one runner rather than in production on two, and a stored reply replays
exactly what the first caller saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any, Protocol

import msgspec

from ..errors import (
    ERROR_TYPES,
    ClusterError,
    EntityNotAssignedToRunner,
    RpcClientError,
    SerializationError,
    Suspended,
)


class ReplyTarget(Protocol):
    """Where the reply to one request goes: a caller's slot, a peer's link, the
    waiters of a stored request. Resolving never raises, and a second reply
    to the same target is ignored."""

    def resolve(self, reply: bytes) -> None: ...


class _Dropped:
    """The reply target of a request nobody waits for (a tell)."""

    __slots__ = ()

    def resolve(self, reply: bytes) -> None:
        pass


DROPPED: ReplyTarget = _Dropped()


class ReplyKind(IntEnum):
    SUCCESS = 0
    DECLARED_ERROR = 1
    CLUSTER_ERROR = 2


class _Reply(msgspec.Struct, array_like=True, frozen=True):
    kind: ReplyKind
    body: msgspec.Raw


class _DeclaredError(msgspec.Struct, array_like=True, frozen=True):
    name: str
    args: list[Any]


class _ClusterError(msgspec.Struct, array_like=True, frozen=True):
    reason: str
    message: str
    detail: str = ""


_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(_Reply)
_declared_decoder = msgspec.msgpack.Decoder(_DeclaredError)
_cluster_decoder = msgspec.msgpack.Decoder(_ClusterError)


_UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)
"""What msgspec raises for a value msgpack cannot carry: an unsupported type, a
string that is not Unicode (UnicodeEncodeError is a ValueError), an int beyond
64 bits, a container that contains itself."""


def encode_payload(value: object, max_size: int | None = None) -> bytes:
    """Encode a payload or success value; SerializationError says which value failed.

    ``max_size`` refuses what no runner could carry on to another (the
    message size limit), here rather than when a frame would not fit.
    """
    try:
        encoded = _encoder.encode(value)
    except _UNENCODABLE as exc:
        raise SerializationError(f"cannot encode {type(value).__name__}: {exc}") from exc
    if max_size is not None and len(encoded) > max_size:
        raise SerializationError(
            f"{type(value).__name__} encodes to {len(encoded)} bytes,"
            f" over the message size limit of {max_size}"
        )
    return encoded


def success(value: object, max_size: int | None = None) -> bytes:
    body = encode_payload(value, max_size)
    return _encoder.encode(_Reply(ReplyKind.SUCCESS, msgspec.Raw(body)))


def declared_error(error: Exception, max_size: int | None = None) -> bytes:
    body = encode_payload(_DeclaredError(type(error).__name__, list(error.args)), max_size)
    return _encoder.encode(_Reply(ReplyKind.DECLARED_ERROR, msgspec.Raw(body)))


def cluster_error(error: ClusterError) -> bytes:
    detail = ""
    if isinstance(error, Suspended):
        detail = error.resume_token
    elif isinstance(error, RpcClientError):
        detail = error.cause_type
    body = _encoder.encode(_ClusterError(error.reason, error.message, detail))
    return _encoder.encode(_Reply(ReplyKind.CLUSTER_ERROR, msgspec.Raw(body)))


def failure(error: ClusterError, request_id: int) -> bytes:
    """The reply saying ``error`` happened to request ``request_id``."""
    error.request_id = request_id
    return cluster_error(error)


_CLUSTER_ERROR_HEAD = bytes([0x92, ReplyKind.CLUSTER_ERROR])


def misrouted(reply: bytes) -> bool:
    """Whether the reply says the request reached a runner that does not own its shard.

    Such a request never reached a handler, so the sender may resend it.
    The prefix check keeps the common case (a success) to one comparison.
    """
    if not reply.startswith(_CLUSTER_ERROR_HEAD):
        return False
    try:
        error = _cluster_decoder.decode(_reply_decoder.decode(reply).body)
    except msgspec.MsgspecError:
        return False
    return error.reason == EntityNotAssignedToRunner.reason


_SUCCESS_HEAD = bytes([0x92, ReplyKind.SUCCESS])


def refusal(
    reply: bytes, *, entity_id: str | None = None, request_id: int | None = None
) -> ClusterError | None:
    """The cluster error a reply carries, or None for a success or a declared error.

    What an acknowledged tell's sender reads: anything but a cluster error
    says the request was queued (an older owner answers after the handler).
    """
    if reply.startswith(_SUCCESS_HEAD):
        return None
    try:
        outer = _reply_decoder.decode(reply)
        if outer.kind is not ReplyKind.CLUSTER_ERROR:
            return None
        data = _cluster_decoder.decode(outer.body)
    except msgspec.MsgspecError as exc:
        return SerializationError(
            f"cannot decode reply: {exc}", entity_id=entity_id, request_id=request_id
        )
    return _rebuild_cluster_error(data, entity_id, request_id)


def outcome(reply: bytes) -> str:
    """What a reply says, as an instrument's outcome: ``"success"``, ``"error"`` (a
    declared error) or the reason of a cluster error. A success is one comparison."""
    if reply.startswith(_SUCCESS_HEAD):
        return "success"
    try:
        outer = _reply_decoder.decode(reply)
        if outer.kind is ReplyKind.CLUSTER_ERROR:
            return _cluster_decoder.decode(outer.body).reason
    except msgspec.MsgspecError:
        return SerializationError.reason
    return "success" if outer.kind is ReplyKind.SUCCESS else "error"


def decode(
    reply: bytes,
    success_decoder: msgspec.msgpack.Decoder[Any],
    errors_by_name: Mapping[str, type[Exception]],
    *,
    entity_id: str | None = None,
    request_id: int | None = None,
) -> Any:
    """Return the success value, or raise the declared or cluster error the reply holds.

    A reply that does not decode (a handler's success type changed between
    deploys, say) raises SerializationError rather than a raw msgspec error.
    """
    try:
        outer = _reply_decoder.decode(reply)
        if outer.kind is ReplyKind.SUCCESS:
            return success_decoder.decode(outer.body)
        if outer.kind is ReplyKind.DECLARED_ERROR:
            declared = _declared_decoder.decode(outer.body)
            error_type = errors_by_name.get(declared.name)
            if error_type is None:
                raise SerializationError(
                    f"reply holds undeclared error {declared.name!r}",
                    entity_id=entity_id,
                    request_id=request_id,
                )
            try:
                failure: Exception = error_type(*declared.args)
            except Exception as exc:
                raise SerializationError(
                    f"cannot rebuild {declared.name}{tuple(declared.args)!r}: {exc}",
                    entity_id=entity_id,
                    request_id=request_id,
                ) from exc
        else:
            failure = _rebuild_cluster_error(
                _cluster_decoder.decode(outer.body), entity_id, request_id
            )
    except msgspec.MsgspecError as exc:
        raise SerializationError(
            f"cannot decode reply: {exc}", entity_id=entity_id, request_id=request_id
        ) from exc
    raise failure


def _rebuild_cluster_error(
    data: _ClusterError, entity_id: str | None, request_id: int | None
) -> ClusterError:
    error_type = ERROR_TYPES.get(data.reason)
    if error_type is Suspended:
        return Suspended(
            data.message, resume_token=data.detail, entity_id=entity_id, request_id=request_id
        )
    if error_type is RpcClientError or error_type is None:
        return RpcClientError(
            data.message, cause_type=data.detail, entity_id=entity_id, request_id=request_id
        )
    return error_type(data.message, entity_id=entity_id, request_id=request_id)
