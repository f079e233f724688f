"""One singleton held here: its lease, and its function run under supervision.

The runtime is the singleton's failure boundary: the function returning or
raising is logged and followed by a restart after a backoff, for as long
as the lease is held; nothing it does ends the runner. Its lifecycle
(STARTING, RUNNING, WAITING, STOPPING, then RELEASED or LOST) is the table
in :mod:`trio_cluster.core.lifecycle`.

The order that makes "never two at once" hold: on a graceful stop the
lease is released only after the function has exited (its ``finally``
blocks included), so the next holder cannot start before; on a lost lease
the function's scope is cancelled synchronously, in the callback that
reports the loss, before this runner does anything else.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..core.lifecycle import SINGLETON_LIFECYCLE, Lifecycle, SingletonEvent, SingletonState
from ..errors import ClusterError
from ..singleton import RESTART_RESET_AFTER, Singleton, SingletonContext
from ..storage.base import Lease
from .client import Client
from .hooks import Hooks

log = logging.getLogger("trio_cluster.singleton")

RELEASE_TIMEOUT = 5.0
"""Bound on releasing the lease: a storage that does not answer must not hold up shutdown."""


@attrs.frozen
class SingletonServices:
    """What a singleton runs with: the runner's client, address, hooks and lease release."""

    address: str
    client: Client
    hooks: Hooks
    release: Callable[[Lease], Awaitable[None]]


class SingletonRuntime:
    def __init__(
        self,
        singleton: Singleton,
        services: SingletonServices,
        lease: Lease,
        on_stopped: Callable[[SingletonRuntime], None],
    ) -> None:
        self.singleton = singleton
        self.services = services
        self.lease = lease
        self._on_stopped = on_stopped
        self._life = Lifecycle(
            f"singleton {singleton.name}", SINGLETON_LIFECYCLE, SingletonState.STARTING
        )
        self._scope = trio.CancelScope()
        self._stopping = trio.Event()
        self._stopped = trio.Event()

    def __repr__(self) -> str:
        return (
            f"<singleton {self.singleton.name} epoch {self.lease.epoch}: {self._life.state.value}>"
        )

    @property
    def state(self) -> SingletonState:
        return self._life.state

    @property
    def accepting(self) -> bool:
        """Held and not on its way out (what the keeper's readiness counts)."""
        return self._life.state in (
            SingletonState.STARTING,
            SingletonState.RUNNING,
            SingletonState.WAITING,
        )

    # -- lifecycle --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the function (again and again) until stopped or lost; never raises but for
        cancellation from outside."""
        name, hooks = self.singleton.name, self.services.hooks
        hooks.singleton_started(name, self.lease.epoch)
        try:
            with self._scope:
                task_status.started()
                if self._life.state is SingletonState.STARTING:
                    self._life.fire(SingletonEvent.STARTED)
                    await self._supervise()
        except* Exception as bug:  # the supervision itself failed: a bug of ours
            log.exception("%s failed; releasing it to be taken again", self, exc_info=bug)
            hooks.contained_failure("singleton", bug)
        finally:
            lost = self._life.state is SingletonState.LOST
            self._on_stopped(self)
            if not lost:
                # The function has exited: only now may another runner start it.
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                    try:
                        await self.services.release(self.lease)
                    except (ClusterError, OSError) as error:
                        log.warning("could not release %s, left to expire: %s", self, error)
                self._life.fire(SingletonEvent.STOP)  # stopped from outside, all at once
                if self._life.state is SingletonState.STOPPING:
                    self._life.fire(SingletonEvent.STOPPED)
            hooks.singleton_stopped(name, self._life.state.value)
            self._stopped.set()

    async def _supervise(self) -> None:
        """The failure boundary: run, and after a return or an exception wait, then run again."""
        singleton, hooks = self.singleton, self.services.hooks
        delays = singleton.restart.delays()
        attempt = 0
        while True:
            attempt += 1
            ctx = SingletonContext(
                name=singleton.name,
                client=self.services.client,
                runner_address=self.services.address,
                epoch=self.lease.epoch,
                attempt=attempt,
                stopping=self._stopping,
            )
            began = trio.current_time()
            try:
                await singleton.function(ctx)
            except* Exception as failure:
                if self._life.state is SingletonState.RUNNING:
                    log.exception(
                        "singleton %s raised; running it again after a backoff",
                        singleton.name,
                        exc_info=failure,
                    )
                    hooks.singleton_failed(singleton.name, failure)
            else:
                if self._life.state is SingletonState.RUNNING:
                    log.info("singleton %s returned; running it again after a backoff", ctx.name)
            if self._life.state is not SingletonState.RUNNING:
                return  # asked to stop: its return is its answer
            if trio.current_time() - began >= RESTART_RESET_AFTER:
                delays = singleton.restart.delays()
            if self._life.fire(SingletonEvent.ENDED) is not SingletonState.WAITING:
                return
            with trio.move_on_after(next(delays)):
                await self._stopping.wait()
            if not self._life.allows(SingletonEvent.RESTART):
                return  # stopped or lost while waiting
            self._life.fire(SingletonEvent.RESTART)

    def lose(self) -> None:
        """The lease is gone: cancel the function now, release nothing."""
        self._life.fire(SingletonEvent.LOSE)
        self._scope.cancel()
        self._on_stopped(self)

    async def stop(self, grace: float | None = None) -> None:
        """Hand off: ask the function to stop, cancel it after its grace, release the lease
        once it has exited. ``grace`` caps the singleton's own."""
        self._life.fire(SingletonEvent.STOP)
        self._stopping.set()
        allowed = self.singleton.grace if grace is None else min(grace, self.singleton.grace)
        with trio.move_on_after(allowed):
            await self._stopped.wait()
        self._scope.cancel()
        await self._stopped.wait()
