"""Durable timers: ``ctx.timers``, an entity scheduling messages to itself by name.

A timer is a persisted request to the entity itself, with a ``deliver_at``
and its name (in storage, and as the ``trio-cluster-timer`` header the
handler sees): it survives restarts and moves with its shard like any
persisted request, and the shard holds it in its bounded scheduled heap
until it is due. Arming a name replaces that name's timer if it is not yet
due; cancelling deletes it; both are fenced by the shard's lease.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..core import reply as replies
from ..core.envelope import MAX_DELIVER_AT_MS, Envelope, text_problem
from ..entity import Rpc
from .client import unix_ms
from .context import EntityAddress

if TYPE_CHECKING:
    from .client import Client

P = TypeVar("P")

TIMER_HEADER = "trio-cluster-timer"
"""The header naming the timer a request was armed as."""
MAX_TIMER_NAME_BYTES = 255


class TimerHost(Protocol):
    """What timers need of the entity's shard (a ShardRuntime)."""

    async def arm_timer(self, name: str, envelope: Envelope) -> None: ...

    async def cancel_timer(self, entity: tuple[str, str], name: str) -> bool: ...


class EntityTimers:
    """One entity's timers, as its handlers see them: ``ctx.timers``."""

    __slots__ = ("_address", "_client", "_host", "_max_size")

    def __init__(
        self, host: TimerHost, address: EntityAddress, client: Client, max_size: int
    ) -> None:
        self._host = host
        self._address = address
        self._client = client
        self._max_size = max_size

    async def arm(
        self,
        name: str,
        rpc: Rpc[P, Any],
        payload: P,
        *,
        at: datetime | None = None,
        after: float | None = None,
    ) -> None:
        """Send ``rpc(payload)`` to this entity at ``at`` (timezone-aware) or ``after`` seconds.

        Returns once stored: the timer then fires even if this runner dies
        (on whichever runner serves the shard by then). Arming a name whose
        timer is not yet due replaces it. The request is persisted whatever
        ``rpc`` says, with no primary key (the name is its identity).
        TypeError for an RPC of another entity or not exactly one of
        ``at``/``after``; ValueError for a name storage cannot hold.
        """
        address = self._address
        if not isinstance(rpc, Rpc) or rpc.stream or rpc.entity.name != address.entity_type:
            raise TypeError(
                f"a timer sends one of {address.entity_type}'s own RPCs, no stream (got {rpc!r})"
            )
        _check_name(name)
        if (at is None) == (after is None):
            raise TypeError("arm a timer with exactly one of at= or after=")
        if after is not None:
            if not isinstance(after, int | float) or not math.isfinite(after):
                raise TypeError(f"after must be a finite number of seconds (got {after!r})")
            due = unix_ms(datetime.now().astimezone()) + max(0, int(after * 1000))
        else:
            assert at is not None
            due = unix_ms(at)
        if due > MAX_DELIVER_AT_MS:
            raise ValueError("a timer is due by the year 9999")
        envelope = Envelope(
            request_id=self._client.generate_id(),
            entity_type=address.entity_type,
            entity_id=address.entity_id,
            shard_group=address.shard.group,
            shard_index=address.shard.index,
            rpc=rpc.name,
            payload=replies.encode_payload(payload, self._max_size),
            persisted=True,
            deliver_at_ms=due,
            headers={TIMER_HEADER: name},
        )
        await self._host.arm_timer(name, envelope)

    async def cancel(self, name: str) -> bool:
        """Delete the timer ``name`` if it is not yet due; whether there was one."""
        _check_name(name)
        address = self._address
        return await self._host.cancel_timer((address.entity_type, address.entity_id), name)


def _check_name(name: str) -> None:
    problem = text_problem("timer name", name, MAX_TIMER_NAME_BYTES)
    if problem is not None:
        raise TypeError(problem) if not isinstance(name, str) else ValueError(problem)
    if not name:
        raise ValueError("a timer needs a name")


def timer_name(envelope: Envelope) -> str | None:
    """The timer a request was armed as, or None for any other request."""
    return envelope.headers.get(TIMER_HEADER) if envelope.headers else None
