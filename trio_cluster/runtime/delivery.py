"""A request on its way to a handler, with the one place its reply goes."""

from __future__ import annotations

from ..core.envelope import Envelope
from ..core.reply import ReplyTarget, failure
from ..errors import ClusterError


class Delivery:
    """An envelope and its reply target, carried together from the caller to the handler.

    The target travels with the request instead of being looked up by
    request id, so a reply reaches exactly the caller that sent the request,
    whatever ids other callers or peers use.
    """

    __slots__ = ("envelope", "redelivered", "target")

    def __init__(
        self, envelope: Envelope, target: ReplyTarget, *, redelivered: bool = False
    ) -> None:
        self.envelope = envelope
        self.target = target
        self.redelivered = redelivered
        """Read back by a redelivery scan: it may have run before (see RequestInfo)."""

    def fail(self, error: ClusterError) -> None:
        self.target.resolve(failure(error, self.envelope.request_id))

    def fail_if_volatile(self, error: ClusterError) -> None:
        """Answer a volatile request that will not run with ``error`` now, rather than
        at its caller's timeout; a persisted one stays in storage for a later run."""
        if not self.envelope.persisted:
            self.fail(error)
