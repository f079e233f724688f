"""A request on its way to a handler, with the one place its reply goes."""

from __future__ import annotations

import trio

from ..core.envelope import Envelope
from ..core.reply import ReplyTarget, failure
from ..core.streaming import ChunkSink
from ..errors import ClusterError


class Delivery:
    """An envelope and its reply target, carried together from the caller to the handler.

    The target travels with the request instead of being looked up by
    request id, so a reply reaches exactly the caller that sent the request,
    whatever ids other callers or peers use. So does the way to interrupt
    it: whoever holds the delivery (the local caller, the peer's link) can
    withdraw it, and no one else.
    """

    __slots__ = ("_scope", "envelope", "interrupted", "redelivered", "stream", "target")

    def __init__(
        self,
        envelope: Envelope,
        target: ReplyTarget,
        *,
        redelivered: bool = False,
        stream: ChunkSink | None = None,
    ) -> None:
        self.envelope = envelope
        self.target = target
        self.stream = stream
        """A streaming request's chunks go here (its target too, which its reply ends)."""
        self.redelivered = redelivered
        """Read back by a redelivery scan: it may have run before (see RequestInfo)."""
        self.interrupted = envelope.interrupted
        """Its caller withdrew it: skipped if not started, its handler cancelled if running."""
        self._scope: trio.CancelScope | None = None

    def interrupt(self) -> None:
        """The caller stopped waiting: cancel the handler, or skip the request when it comes up.

        Idempotent, and a no-op once the handler has returned: a reply already
        made wins.
        """
        self.interrupted = True
        if self._scope is not None:
            self._scope.cancel()

    def arm(self, scope: trio.CancelScope) -> None:
        """Its handler starts in ``scope``: :meth:`interrupt` cancels it (a Trio
        cancellation inside the handler: its ``finally`` blocks run) until :meth:`disarm`.

        The scope is the entity task's, shared by the runs of many requests,
        so the handler must disarm it, synchronously, as soon as it returns.
        """
        self._scope = scope
        if self.interrupted:
            scope.cancel()

    def disarm(self) -> None:
        """Its handler has returned: a later interrupt must not reach the scope."""
        self._scope = None

    def fail(self, error: ClusterError) -> None:
        self.target.resolve(failure(error, self.envelope.request_id))

    def fail_if_volatile(self, error: ClusterError) -> None:
        """Answer a volatile request that will not run with ``error`` now, rather than
        at its caller's timeout; a persisted one stays in storage for a later run."""
        if not self.envelope.persisted:
            self.fail(error)
