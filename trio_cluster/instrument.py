"""One hook for what a runner does: subclass :class:`Instrument` and override what you need.

The idea is Trio's ``Instrument`` and httpcore's trace hook. Give instances
to ``open_runner(instruments=...)``; the runner calls their methods,
synchronously, in the task where the event happens, and only the methods
an instrument overrides. The counters behind ``Runner.snapshot()`` are one
instrument; the Prometheus metrics (``trio_cluster.prometheus``) and the
OpenTelemetry tracing (``trio_cluster.tracing``) extras are two more.

An instrument that raises is logged and removed from its runner (as Trio
does with its instruments): a bug in observability never fails a message.

Where each event happens, so that an instrument may keep per-task context
(a current span, say) between a pair of events:

- ``request_sent`` and ``request_finished`` bracket one ``ask``, ``tell``
  or ``stream`` (from sending to leaving its block) in the caller's task.
  ``request_sent`` may add to ``call.headers``: they travel with the
  request, through storage when it is persisted, and reach the handler
  (trace context goes this way).
- ``handling_started`` and ``handling_finished`` bracket one delivery of
  one request in the task that runs its handler, the storing of its reply
  included.
- ``storage_written`` follows each storage write made for a request (the
  request itself, in the caller's task; its reply or an entity's state, in
  the entity's task), so it falls between the brackets of its request.

Outcomes (``request_finished``, ``handling_finished``) are strings from a
small, closed set, fit for a metric label: ``"success"``; ``"error"`` (the
RPC's declared error); a :class:`~trio_cluster.ClusterError` reason such
as ``"MailboxFull"`` or ``"SendTimeout"``; ``"cancelled"`` (the caller was
cancelled, or the entity stopped before answering); and, for handling
only, ``"unstored"`` (a persisted reply the storage refused or could not
take: the request stays unprocessed and runs again) and ``"suspended"``
(the handler suspended the request on a deferred: stored, no reply yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.hashing import ShardId

if TYPE_CHECKING:
    from .runtime.calls import Call, Handling
    from .runtime.context import EntityAddress
    from .runtime.runner import Runner

__all__ = ["Call", "Handling", "Instrument", "Outcome"]

Outcome = str
"""``"success"``, ``"error"``, a ClusterError reason, ``"cancelled"`` or ``"unstored"``."""


class Instrument:
    """Base class of instruments: every method does nothing until overridden."""

    def runner_opened(self, runner: Runner) -> None:
        """The runner serves (its ``open_runner`` block begins): an instrument that
        samples gauges (mailbox depth, backlog) may keep it. Reported once."""

    # -- sending, in the caller's task ----------------------------------------------

    def request_sent(self, call: Call) -> None:
        """An ask or tell is about to be sent (stored first, if persisted)."""

    def request_finished(self, call: Call, outcome: Outcome) -> None:
        """The ask has its answer, or the tell was accepted, or the call failed."""

    # -- handling, in the task that runs the handler -------------------------------------

    def handling_started(self, handling: Handling) -> None:
        """A request leaves the mailbox for its handler."""

    def handling_finished(self, handling: Handling, outcome: Outcome) -> None:
        """The request's reply is final (stored, for a persisted request) or given up."""

    def defect(self, handling: Handling, error: Exception) -> None:
        """The handler raised an undeclared exception: the entity restarts, or gives up."""

    def request_refused(self, entity_type: str, rpc: str, reason: str) -> None:
        """A request was turned away before reaching a handler (``reason`` is a
        ClusterError reason: a full mailbox, a shard not owned here, a malformed
        request from a peer)."""

    # -- storage ------------------------------------------------------------------------

    def storage_written(self, operation: str, seconds: float, outcome: Outcome) -> None:
        """A write for a request ended: ``operation`` is ``"request"``, ``"reply"``,
        ``"state"``, ``"suspension"`` or ``"interrupt"`` (a withdrawn persisted request
        marked); ``outcome`` is ``"success"`` or the reason it failed."""

    # -- timers and deferreds -----------------------------------------------------------

    def timer_changed(self, address: EntityAddress, name: str, how: str) -> None:
        """The entity's timer ``name`` was ``"armed"`` (stored; re-arming included),
        ``"cancelled"`` (deleted before it was due) or ``"fired"`` (its request leaves
        the mailbox for the handler: once per delivery). Armed and cancelled are
        reported in the task of the handler that did it."""

    def deferred_completed(self, request_id: int, name: str, failed: bool) -> None:
        """This runner's client completed (``failed``: failed) deferred ``name`` of
        request ``request_id``, in the completer's task. A suspension is a handling
        outcome, ``"suspended"``."""

    # -- lifecycles ---------------------------------------------------------------------

    def entity_activated(self, address: EntityAddress) -> None:
        """An entity became resident here (its handler is built at its first request)."""

    def entity_passivated(self, address: EntityAddress) -> None:
        """A resident entity was let go: idle for its ``max_idle_time``, over the cap,
        stopped with its shard, or failed. Each activation is followed by one."""

    def shard_acquired(self, shard: ShardId, epoch: int) -> None:
        """This runner took the shard's lease and serves it from now on."""

    def shard_stopped(self, shard: ShardId, how: str) -> None:
        """This runner stopped serving the shard: ``how`` is ``"released"`` (handed off),
        ``"lost"`` (its lease was lost) or ``"failed"`` (a bug; it is taken again)."""

    def runner_joined(self, address: str) -> None:
        """A runner appeared among the live runners (each is reported at the first look)."""

    def runner_left(self, address: str) -> None:
        """A runner left the live runners: it unregistered, or its lock session ended."""

    # -- services -----------------------------------------------------------------------

    def singleton_started(self, name: str, epoch: int) -> None:
        """This runner took the singleton's lease (under ``epoch``) and runs its function."""

    def singleton_stopped(self, name: str, how: str) -> None:
        """This runner stopped running the singleton: ``how`` is ``"released"`` (handed
        off, its function exited) or ``"lost"`` (its lease was lost: cancelled at once)."""

    def singleton_failed(self, name: str, error: BaseException) -> None:
        """The singleton's function raised: it is logged and runs again after a backoff."""

    def schedule_fired(self, name: str, instant: int, late: float) -> None:
        """The schedule recorded its firing of ``instant`` (Unix ms) here, ``late`` seconds
        after it fell due (its jitter included)."""

    def schedule_skipped(self, name: str) -> None:
        """The missed-run policy passed over missed instants of the schedule."""

    def schedule_failed(self, name: str, error: BaseException) -> None:
        """A firing failed: a scheduled function raised (the next instant comes as planned),
        or telling the entity did (the schedule's singleton retries after a backoff)."""

    def contained_failure(self, where: str, error: BaseException) -> None:
        """A bug of the runtime was caught at a failure boundary (and logged) and the
        runner went on: ``where`` names the boundary."""


EVENTS: tuple[str, ...] = tuple(
    name for name, value in vars(Instrument).items() if callable(value) and name[0] != "_"
)
"""The names of every event, in declaration order."""
