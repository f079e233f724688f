"""Which entities are resident on a runner, and when they go: the passivation policy.

Two rules, one place. An entity idle for longer than its ``max_idle_time``
is passivated by one sweeper task (a timer per entity cost a quarter of
the hot path). And the runner keeps at most ``max_resident_entities``:
activating one more first passivates the least recently used idle ones.
An entity with work in hand is never chosen, so when every resident
entity is busy the cap is exceeded rather than a message dropped, and the
next activation brings the count back down.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, KeysView
from typing import Protocol

import trio

from ..config import EntityOptions

MIN_SWEEP_INTERVAL = 0.01
MAX_SWEEP_INTERVAL = 5.0


class Resident(Protocol):
    """What the policy needs to know of an entity (an ActiveEntity, or a test's own)."""

    @property
    def key(self) -> str: ...

    @property
    def idle(self) -> bool: ...

    @property
    def options(self) -> EntityOptions: ...

    @property
    def last_active(self) -> float: ...

    @property
    def queued(self) -> int: ...

    def passivate(self) -> None: ...


class Residency:
    def __init__(self, max_resident: int) -> None:
        self._max_resident = max_resident
        # Every resident entity by its key, least recently used first.
        self._resident: OrderedDict[str, Resident] = OrderedDict()

    def __len__(self) -> int:
        return len(self._resident)

    def keys(self) -> KeysView[str]:
        return self._resident.keys()

    def queued(self) -> int:
        """Requests waiting in the mailboxes of every resident entity now."""
        return sum(resident.queued for resident in self._resident.values())

    def admit(self, entity: Resident) -> None:
        """Make room under the cap, then count ``entity`` as resident."""
        excess = len(self._resident) - self._max_resident + 1
        if excess > 0:
            idle = (resident for resident in self._resident.values() if resident.idle)
            for resident in list(itertools.islice(idle, excess)):
                resident.passivate()
        self._resident[entity.key] = entity

    def touch(self, entity: Resident) -> None:
        self._resident.move_to_end(entity.key)

    def forget(self, entity: Resident) -> None:
        """Stop counting ``entity`` (a no-op unless it is the one resident under its key)."""
        if self._resident.get(entity.key) is entity:
            del self._resident[entity.key]

    async def sweep_idle(self, options: Iterable[EntityOptions]) -> None:
        """Passivate entities idle for longer than their ``max_idle_time``.

        One sweep of the resident set replaces a timer per entity; an
        entity therefore goes between ``max_idle_time`` and a quarter of
        it more after its last message.
        """
        idle_times = [option.max_idle_time for option in options if not option.keep_alive]
        if not idle_times:
            return
        interval = min(max(min(idle_times) / 4, MIN_SWEEP_INTERVAL), MAX_SWEEP_INTERVAL)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            expired = [
                entity
                for entity in self._resident.values()
                if entity.idle
                and not entity.options.keep_alive
                and now - entity.last_active >= entity.options.max_idle_time
            ]
            for entity in expired:
                entity.passivate()
