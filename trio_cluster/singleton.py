"""Singletons: a named task that runs on exactly one runner of the cluster.

Declare one with :class:`Singleton` and give it to ``open_runner(...,
singletons=[...])`` on every runner that may run it. Each singleton is a
lease, taken like a shard's (see :mod:`trio_cluster.core.reserved`), so it
inherits the shards' guarantees: one holder at a time while the database
is reachable, a higher epoch at each new holder, failover when the holder
dies, a graceful handoff when it leaves, and its function cancelled the
moment the holder learns its lease is lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from .core.retry import RetryPolicy
from .core.validation import number
from .entity import _check_name

if TYPE_CHECKING:
    from .runtime.client import Client

__all__ = ["SINGLETON_RESTART", "Singleton", "SingletonContext"]

SINGLETON_RESTART = RetryPolicy(
    base_delay=0.1, max_delay=10.0, max_attempts=2**62, max_elapsed=2.0**62
)
"""Backoff before a singleton's function runs again after it returned or raised."""
RESTART_RESET_AFTER = 60.0
"""A run that lasted this long starts the backoff afresh: it was not a crash loop."""


def _valid_name(_instance: object, _attribute: object, value: str) -> None:
    _check_name("singleton", value)


@attrs.frozen
class Singleton:
    """A named long-running task: ``function(ctx)`` runs on one runner of the cluster.

    ``function`` is meant to run for as long as its lease lasts. When it
    returns or raises, it runs again on the same runner after a backoff
    (``restart``); an exception is logged, never the runner's end. On a
    graceful handoff ``ctx.stopping`` becomes true and the function has
    ``grace`` seconds to return before it is cancelled; when the lease is
    lost it is cancelled at once. Cancellation is delivered like any Trio
    cancellation: clean up in ``finally``, and keep shielded cleanup short,
    because the next holder waits for it.
    """

    name: str = attrs.field(validator=_valid_name)
    function: Callable[[SingletonContext], Awaitable[None]]
    grace: float = attrs.field(default=0.0, validator=number(minimum=0))
    restart: RetryPolicy = SINGLETON_RESTART


class SingletonContext:
    """What a singleton's function is given, one per run.

    ``epoch`` is the lease's fencing token: it grows with each new holder,
    so a write made under it can be refused by storage once a newer holder
    exists (compare it in the same statement, as replies are fenced).
    """

    __slots__ = ("_stopping", "attempt", "client", "epoch", "name", "runner_address")

    def __init__(
        self,
        *,
        name: str,
        client: Client,
        runner_address: str,
        epoch: int,
        attempt: int,
        stopping: trio.Event,
    ) -> None:
        self.name = name
        self.client = client
        """The runner's client: ``ask`` and ``tell`` to any entity."""
        self.runner_address = runner_address
        self.epoch = epoch
        self.attempt = attempt
        """1 for the first run under this lease, then 2, 3 after each restart."""
        self._stopping = stopping

    @property
    def stopping(self) -> bool:
        """Whether a graceful handoff began: return within the singleton's grace."""
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        """Wait until a graceful handoff begins."""
        await self._stopping.wait()

    def __repr__(self) -> str:
        return f"<SingletonContext {self.name} epoch {self.epoch} attempt {self.attempt}>"
