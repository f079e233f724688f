"""The counters a runner keeps about itself: an instrument like any other.

Plain integers bumped by the events they count (an attribute increment
costs nothing measurable); ``Runner.snapshot()`` reads them, with the
gauges the runner knows directly, into a :class:`Snapshot`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import attrs

from ..core.hashing import ShardId
from ..instrument import Instrument, Outcome
from .calls import Call, Handling
from .context import EntityAddress

_NOT_ERRORS = frozenset({"success", "error", "cancelled"})
_NOT_ANSWERED = frozenset({"cancelled", "unstored", "suspended"})


class Counters(Instrument):
    def __init__(self) -> None:
        self.processed = 0
        self.defects = 0
        self.mailbox_full = 0
        self.activations = 0
        self.passivations = 0
        self.refused = 0
        """Requests from peers refused before reaching a shard (malformed, not owned here)."""
        self.contained_failures = 0
        """Bugs of the runtime itself caught at a failure boundary (each is logged as an error)."""
        self.waiting_callers = 0
        self.redelivered = 0
        self.lease_losses = 0
        self.errors: Counter[str] = Counter()
        """ClusterErrors raised to callers on this runner, by reason."""
        self.live_runners: set[str] = set()
        self.singletons_running = 0
        self.singleton_failures = 0
        self.timers: Counter[str] = Counter()
        """Timer events by how: armed, fired, cancelled."""
        self.deferreds_suspended = 0
        self.deferreds_completed = 0
        self.deferreds_failed = 0
        self.schedule_firings = 0
        self.schedule_skips = 0
        self.schedule_failures = 0

    def request_sent(self, call: Call) -> None:
        if call.kind == "ask":
            self.waiting_callers += 1

    def request_finished(self, call: Call, outcome: Outcome) -> None:
        if call.kind == "ask":
            self.waiting_callers -= 1
        if outcome not in _NOT_ERRORS:
            self.errors[outcome] += 1

    def handling_started(self, handling: Handling) -> None:
        if handling.redelivered:
            self.redelivered += 1

    def handling_finished(self, handling: Handling, outcome: Outcome) -> None:
        if outcome not in _NOT_ANSWERED:
            self.processed += 1
        elif outcome == "suspended":
            self.deferreds_suspended += 1

    def timer_changed(self, address: EntityAddress, name: str, how: str) -> None:
        self.timers[how] += 1

    def deferred_completed(self, request_id: int, name: str, failed: bool) -> None:
        if failed:
            self.deferreds_failed += 1
        else:
            self.deferreds_completed += 1

    def defect(self, handling: Handling, error: Exception) -> None:
        self.defects += 1

    def request_refused(self, entity_type: str, rpc: str, reason: str) -> None:
        if reason == "MailboxFull":
            self.mailbox_full += 1
        else:
            self.refused += 1

    def entity_activated(self, address: EntityAddress) -> None:
        self.activations += 1

    def entity_passivated(self, address: EntityAddress) -> None:
        self.passivations += 1

    def shard_stopped(self, shard: ShardId, how: str) -> None:
        if how == "lost":
            self.lease_losses += 1

    def runner_joined(self, address: str) -> None:
        self.live_runners.add(address)

    def runner_left(self, address: str) -> None:
        self.live_runners.discard(address)

    def singleton_started(self, name: str, epoch: int) -> None:
        self.singletons_running += 1

    def singleton_stopped(self, name: str, how: str) -> None:
        self.singletons_running -= 1

    def singleton_failed(self, name: str, error: BaseException) -> None:
        self.singleton_failures += 1

    def schedule_fired(self, name: str, instant: int, late: float) -> None:
        self.schedule_firings += 1

    def schedule_skipped(self, name: str) -> None:
        self.schedule_skips += 1

    def schedule_failed(self, name: str, error: BaseException) -> None:
        self.schedule_failures += 1

    def contained_failure(self, where: str, error: BaseException) -> None:
        self.contained_failures += 1


@attrs.frozen
class Snapshot:
    """One reading of a runner's counters and gauges, for a metrics exporter or a test."""

    processed: int
    """Requests whose reply was made final here."""
    defects: int
    """Undeclared exceptions raised by handlers (each retry counts)."""
    mailbox_full: int
    """Volatile requests refused because the entity's mailbox was full."""
    activations: int
    passivations: int
    refused: int
    """Requests from peers refused before reaching a shard (malformed, not owned here)."""
    contained_failures: int
    """Bugs of the runtime caught at a failure boundary (each is logged as an error)."""
    resident_entities: int
    owned_shards: int
    waiting_callers: int
    """Asks made on this runner that are waiting for their reply now."""
    redelivered: int
    """Persisted requests handled after being read back by a redelivery scan."""
    lease_losses: int
    """Shards this runner stopped serving because their lease was lost."""
    errors: Mapping[str, int]
    """ClusterErrors raised to callers on this runner, by reason."""
    live_runners: int
    """Runners alive in the cluster, as this runner last saw the membership."""
    singletons_running: int = 0
    """Singletons whose lease this runner holds now (their function running or restarting)."""
    singleton_failures: int = 0
    """Times a singleton's function raised here (each is logged, then it runs again)."""
    timers_armed: int = 0
    """Entity timers stored by handlers here (re-arming a name counts again)."""
    timers_fired: int = 0
    """Timer requests delivered to their handler here (once per delivery)."""
    timers_cancelled: int = 0
    """Timers deleted before they were due, by handlers here."""
    deferreds_suspended: int = 0
    """Runs of persisted requests that ended suspended on a deferred here."""
    deferreds_completed: int = 0
    """Deferreds completed with a value through this runner's client."""
    deferreds_failed: int = 0
    """Deferreds failed (``fail_deferred``) through this runner's client."""
    schedules_running: int = 0
    """Schedules driven by this runner now (their singleton's lease held here)."""
    schedule_firings: int = 0
    """Scheduled instants whose firing was recorded here."""
    schedule_skips: int = 0
    """Times the missed-run policy passed over missed instants here."""
    schedule_failures: int = 0
    """Firings that failed here: a scheduled function raised, or telling the entity did."""
