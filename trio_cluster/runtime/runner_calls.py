"""Runner messages: a request to one runner, handled by a function of that runner.

A runner message travels as an ordinary volatile request frame whose shard
group is the reserved ``RUNNER_GROUP`` and whose entity id is the target
runner's address; the router hands it here instead of to a shard, so it
needs no lease and no assignment, and reaches exactly the runner dialled.
Replies use the one reply encoding, so declared errors come back as
themselves and ``ClusterError``s as their class.

This is a failure boundary: a handler that raises an undeclared exception
answers its caller with ``RpcClientError`` and the runner goes on; at most
``MAX_RUNNER_CALLS`` handlers run at once here, more are refused with
``MailboxFull``, so a peer cannot grow the runner without bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import msgspec
import trio

from ..broadcast import RunnerHandler
from ..config import ShardingConfig
from ..core import reply as replies
from ..core.envelope import Envelope
from ..core.reply import ReplyTarget
from ..core.reserved import RUNNER_GROUP
from ..entity import Entity, Rpc
from ..errors import (
    ClusterError,
    MailboxFull,
    MalformedMessage,
    RpcClientError,
    RunnerUnavailable,
    SendTimeout,
)
from .hooks import Hooks
from .replies import ReplySlot
from .residency import Residency
from .routing import Router

log = logging.getLogger("trio_cluster.runner_calls")

P = TypeVar("P")
S = TypeVar("S")

MAX_RUNNER_CALLS = 64
"""Runner messages handled at once on one runner; more are refused with MailboxFull."""
RESIDENT_PAGE = 1000
"""Ids per answer of the resident listing (a few tens of KiB: well within a frame)."""


class ResidentPage(msgspec.Struct, frozen=True):
    """Which entities of ``entity_type`` are resident here: ids after ``after``, in order."""

    entity_type: str
    after: str = ""
    limit: int = RESIDENT_PAGE


CLUSTER = Entity("__cluster")
"""The runtime's own runner messages (a name no user runner handler may take)."""
resident_ids = CLUSTER.rpc("resident", ResidentPage, list[str])


@attrs.frozen
class _Handler:
    rpc: Rpc[Any, Any]
    function: Callable[[Any], Awaitable[Any]]


class RunnerCalls:
    """Sends runner messages to runners, and handles those addressed to this one."""

    def __init__(
        self,
        *,
        address: str,
        config: ShardingConfig,
        router: Router,
        hooks: Hooks,
        residency: Residency,
        generate_id: Callable[[], int],
        handlers: Iterable[tuple[Rpc[Any, Any], Callable[[Any], Awaitable[Any]]]],
    ) -> None:
        self._address = address
        self._config = config
        self._router = router
        self._hooks = hooks
        self._residency = residency
        self._generate_id = generate_id
        self._handlers = {
            (rpc.entity.name, rpc.name): _Handler(rpc, function)
            for rpc, function in [(resident_ids, self._resident), *handlers]
        }
        self._nursery: trio.Nursery | None = None
        self._running = 0

    def start(self, nursery: trio.Nursery) -> None:
        """Handle runner messages from now on, in ``nursery`` (the runner's)."""
        self._nursery = nursery

    # -- receiving ----------------------------------------------------------------------

    def on_request(self, envelope: Envelope, target: ReplyTarget) -> None:
        """A runner message for this runner (from a peer, or from here): run its handler."""
        handler = self._handlers.get((envelope.entity_type, envelope.rpc))
        try:
            if handler is None:
                raise MalformedMessage(
                    f"no runner handler for {envelope.entity_type}.{envelope.rpc} here",
                    entity_id=envelope.entity_id,
                )
            if self._nursery is None or self._running >= MAX_RUNNER_CALLS:
                raise MailboxFull(
                    f"{self._address} is handling {MAX_RUNNER_CALLS} runner messages already",
                    entity_id=envelope.entity_id,
                )
        except ClusterError as error:
            self._hooks.request_refused(envelope.entity_type, envelope.rpc, error.reason)
            target.resolve(replies.failure(error, envelope.request_id))
            return
        self._running += 1
        self._nursery.start_soon(self._handle, handler, envelope, target)

    async def _handle(self, handler: _Handler, envelope: Envelope, target: ReplyTarget) -> None:
        try:
            reply = await self._run(handler, envelope)
        finally:
            self._running -= 1
        target.resolve(reply)

    async def _run(self, handler: _Handler, envelope: Envelope) -> bytes:
        rpc, request_id, limit = handler.rpc, envelope.request_id, self._config.max_message_size
        try:
            try:
                payload = rpc.payload_decoder.decode(envelope.payload)
            except msgspec.MsgspecError as error:
                raise MalformedMessage(f"{rpc!r}: {error}", entity_id=envelope.entity_id) from None
            try:
                value = await handler.function(payload)
            except rpc.errors as declared:
                return replies.declared_error(declared, limit)
            except ClusterError:
                raise
            except Exception as defect:
                log.exception("runner handler of %r raised", rpc)
                raise RpcClientError(
                    f"the runner handler of {rpc!r} on {self._address} raised {defect!r}",
                    cause_type=type(defect).__name__,
                ) from defect
            return replies.success(value, limit)
        except ClusterError as error:
            return replies.failure(error, request_id)

    async def _resident(self, page: ResidentPage) -> list[str]:
        """The built-in runner message: ids of the entities of a type resident here."""
        prefix = page.entity_type + "/"
        resident = self._residency.keys()
        ids = sorted(
            key[len(prefix) :]
            for key in resident
            if key.startswith(prefix) and key[len(prefix) :] > page.after
        )
        return ids[: max(0, min(page.limit, RESIDENT_PAGE))]

    # -- sending ------------------------------------------------------------------------

    async def ask(
        self,
        address: str,
        rpc: Rpc[P, S],
        payload: P,
        *,
        timeout: float,  # noqa: ASYNC109 - SendTimeout is part of the contract
    ) -> S:
        """Send a runner message to the runner at ``address`` and return its answer."""
        envelope = Envelope(
            request_id=self._generate_id(),
            entity_type=rpc.entity.name,
            entity_id=address,
            shard_group=RUNNER_GROUP,
            shard_index=0,
            rpc=rpc.name,
            payload=replies.encode_payload(payload, self._config.max_message_size),
        )
        with trio.move_on_after(timeout if timeout > 0 else math.inf):
            reply = await self._send(address, envelope)
            return replies.decode(  # type: ignore[no-any-return]
                reply,
                rpc.success_decoder,
                rpc.errors_by_name,
                entity_id=address,
                request_id=envelope.request_id,
            )
        raise SendTimeout(
            f"no answer from runner {address} to {rpc!r} within {timeout} s",
            entity_id=address,
            request_id=envelope.request_id,
        )

    async def _send(self, address: str, envelope: Envelope) -> bytes:
        slot = ReplySlot()
        if address == self._address:
            self.on_request(envelope, slot)
            return await slot.wait()
        network = self._router.network
        if network is None:
            raise RunnerUnavailable(
                f"{self._address} has no transport: it cannot reach runner {address}",
                entity_id=address,
            )
        link = await network.send_request(address, envelope, slot)
        try:
            return await slot.wait()
        finally:
            link.withdraw(envelope.request_id)


def runner_handlers(
    handlers: Sequence[object],
) -> list[tuple[Rpc[Any, Any], Callable[[Any], Awaitable[Any]]]]:
    """The ``runner_handlers`` given to ``open_runner``, checked."""
    checked: dict[Rpc[Any, Any], Callable[[Any], Awaitable[Any]]] = {}
    for handler in handlers:
        if not isinstance(handler, RunnerHandler):
            raise TypeError(f"runner_handlers must be RunnerHandler instances (got {handler!r})")
        if handler.rpc in checked:
            raise ValueError(f"runner message {handler.rpc!r} has two handlers")
        checked[handler.rpc] = handler.function
    return list(checked.items())
