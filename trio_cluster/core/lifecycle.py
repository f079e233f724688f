"""The lifecycles of shards, entities and links, as data: every state and transition in one place.

Like h11's ``_state.py``: each lifecycle is a table from state to the events
it accepts and the state each leads to. The runtime never assigns a state;
it fires an event, and an event the table does not allow in the current
state is a :class:`LifecycleError`, a bug in the runtime, raised at the
transition rather than discovered later as an inconsistency. Events that
can legitimately race (a lease lost while the shard drains, a second
``close``) are in the tables explicitly, as transitions to the same state.

Drawn::

    shard:   STARTING --started--> SERVING --drain--> DRAINING --drained--> RELEASED
                 |                    |                   |
                 +-------lose---------+-------lose--------+------------> LOST
                 +-------fail---------+-------fail--------+------------> FAILED

    entity:  ACTIVE --close--> CLOSING --stop--> STOPPED
                |                                   ^
                +---------------stop----------------+

    link:    HANDSHAKING --handshaken--> OPEN --close--> CLOSING --finished--> CLOSED
                  |                        |                                     ^
                  +---------close----------+-------------lost--------------------+

    singleton: STARTING --started--> RUNNING <--restart-- WAITING
                   |                  |  +-----ended-------^  |
                   |                  |                        |
                   +------stop--------+--------stop------------+--> STOPPING --stopped--> RELEASED
                   +------lose--------+--------lose------------+--------+-----lose----> LOST

A shard is RELEASED after a graceful drain (its lease handed back), LOST when
its lease went first (nothing released, nothing drained), FAILED when its own
supervision caught a bug (the lease is released so that it can be taken
again). Nothing leaves a terminal state.

A singleton holds its lease from STARTING on; its function runs while
RUNNING, and after it returned or raised the singleton is WAITING out a
backoff before it runs again. STOPPING is a graceful handoff (the function
is asked to stop, then cancelled); the lease is RELEASED only once the
function has exited, so the next holder never overlaps it. LOST: the lease
went first and the function was cancelled at once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, Generic, TypeVar

__all__ = [
    "ENTITY_LIFECYCLE",
    "LINK_LIFECYCLE",
    "SHARD_LIFECYCLE",
    "SINGLETON_LIFECYCLE",
    "EntityEvent",
    "EntityState",
    "Lifecycle",
    "LifecycleError",
    "LinkEvent",
    "LinkState",
    "ShardEvent",
    "ShardState",
    "SingletonEvent",
    "SingletonState",
    "Table",
]

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class LifecycleError(RuntimeError):
    """An event fired in a state that does not accept it: a bug in the runtime itself."""


class ShardState(enum.Enum):
    STARTING = "starting"
    """The lease is held; the shard's nursery is opening."""
    SERVING = "serving"
    """Accepting requests for its entities."""
    DRAINING = "draining"
    """Refusing new requests; mailboxes finish what they hold, then the lease is released."""
    RELEASED = "released"
    LOST = "lost"
    FAILED = "failed"


class ShardEvent(enum.Enum):
    STARTED = "started"
    DRAIN = "drain"
    DRAINED = "drained"
    LOSE = "lose"
    FAIL = "fail"


class EntityState(enum.Enum):
    ACTIVE = "active"
    """The mailbox takes requests."""
    CLOSING = "closing"
    """The mailbox is closed (passivation, a draining shard); queued requests still run."""
    STOPPED = "stopped"


class EntityEvent(enum.Enum):
    CLOSE = "close"
    STOP = "stop"


class LinkState(enum.Enum):
    HANDSHAKING = "handshaking"
    """TLS (if any) and Hello/Welcome, under the handshake deadline."""
    OPEN = "open"
    """Requests and replies flow both ways."""
    CLOSING = "closing"
    """Nothing new is queued; what is (replies, a Goodbye) is being flushed."""
    CLOSED = "closed"


class LinkEvent(enum.Enum):
    HANDSHAKEN = "handshaken"
    CLOSE = "close"
    FINISHED = "finished"
    LOST = "lost"


class SingletonState(enum.Enum):
    STARTING = "starting"
    """The lease is held; the function has not started yet."""
    RUNNING = "running"
    """The function runs."""
    WAITING = "waiting"
    """The function returned or raised: it runs again after a backoff."""
    STOPPING = "stopping"
    """A graceful handoff: the function is asked to stop, then cancelled."""
    RELEASED = "released"
    LOST = "lost"


class SingletonEvent(enum.Enum):
    STARTED = "started"
    ENDED = "ended"
    RESTART = "restart"
    STOP = "stop"
    STOPPED = "stopped"
    LOSE = "lose"


Table = Mapping[S, Mapping[E, S]]

_Sh, _Se = ShardState, ShardEvent
SHARD_LIFECYCLE: Final[Table[ShardState, ShardEvent]] = {
    _Sh.STARTING: {
        _Se.STARTED: _Sh.SERVING,
        _Se.DRAIN: _Sh.DRAINING,
        _Se.LOSE: _Sh.LOST,
        _Se.FAIL: _Sh.FAILED,
    },
    _Sh.SERVING: {_Se.DRAIN: _Sh.DRAINING, _Se.LOSE: _Sh.LOST, _Se.FAIL: _Sh.FAILED},
    _Sh.DRAINING: {
        _Se.DRAIN: _Sh.DRAINING,
        _Se.DRAINED: _Sh.RELEASED,
        _Se.LOSE: _Sh.LOST,
        _Se.FAIL: _Sh.FAILED,
    },
    # Races with an end that already happened change nothing.
    _Sh.RELEASED: {_Se.DRAIN: _Sh.RELEASED, _Se.LOSE: _Sh.RELEASED},
    _Sh.LOST: {_Se.DRAIN: _Sh.LOST, _Se.LOSE: _Sh.LOST, _Se.FAIL: _Sh.LOST},
    _Sh.FAILED: {_Se.DRAIN: _Sh.FAILED, _Se.LOSE: _Sh.FAILED},
}

_En, _Ee = EntityState, EntityEvent
ENTITY_LIFECYCLE: Final[Table[EntityState, EntityEvent]] = {
    _En.ACTIVE: {_Ee.CLOSE: _En.CLOSING, _Ee.STOP: _En.STOPPED},
    _En.CLOSING: {_Ee.CLOSE: _En.CLOSING, _Ee.STOP: _En.STOPPED},
    _En.STOPPED: {_Ee.CLOSE: _En.STOPPED},
}

_Li, _Le = LinkState, LinkEvent
LINK_LIFECYCLE: Final[Table[LinkState, LinkEvent]] = {
    _Li.HANDSHAKING: {_Le.HANDSHAKEN: _Li.OPEN, _Le.CLOSE: _Li.CLOSING, _Le.LOST: _Li.CLOSED},
    _Li.OPEN: {_Le.CLOSE: _Li.CLOSING, _Le.LOST: _Li.CLOSED},
    _Li.CLOSING: {_Le.CLOSE: _Li.CLOSING, _Le.FINISHED: _Li.CLOSED, _Le.LOST: _Li.CLOSED},
    _Li.CLOSED: {_Le.CLOSE: _Li.CLOSED, _Le.FINISHED: _Li.CLOSED, _Le.LOST: _Li.CLOSED},
}


_Si, _Sv = SingletonState, SingletonEvent
SINGLETON_LIFECYCLE: Final[Table[SingletonState, SingletonEvent]] = {
    _Si.STARTING: {_Sv.STARTED: _Si.RUNNING, _Sv.STOP: _Si.STOPPING, _Sv.LOSE: _Si.LOST},
    _Si.RUNNING: {_Sv.ENDED: _Si.WAITING, _Sv.STOP: _Si.STOPPING, _Sv.LOSE: _Si.LOST},
    _Si.WAITING: {_Sv.RESTART: _Si.RUNNING, _Sv.STOP: _Si.STOPPING, _Sv.LOSE: _Si.LOST},
    _Si.STOPPING: {_Sv.STOP: _Si.STOPPING, _Sv.STOPPED: _Si.RELEASED, _Sv.LOSE: _Si.LOST},
    # Races with an end that already happened change nothing.
    _Si.RELEASED: {_Sv.STOP: _Si.RELEASED, _Sv.LOSE: _Si.RELEASED},
    _Si.LOST: {_Sv.STOP: _Si.LOST, _Sv.LOSE: _Si.LOST},
}


class Lifecycle(Generic[S, E]):
    """The current state of one shard, entity or link, moved only by :meth:`fire`."""

    __slots__ = ("_name", "_table", "state")

    def __init__(self, name: str, table: Table[S, E], initial: S) -> None:
        self._name = name
        self._table = table
        self.state = initial

    def fire(self, event: E) -> S:
        """Apply ``event``; return the new state. LifecycleError if the table forbids it."""
        try:
            self.state = self._table[self.state][event]
        except KeyError:
            raise LifecycleError(
                f"{self._name}: event {event.value!r} is not allowed in state {self.state.value!r}"
            ) from None
        return self.state

    def allows(self, event: E) -> bool:
        return event in self._table[self.state]

    def __repr__(self) -> str:
        return f"<{self._name}: {self.state.value}>"
