"""The narrow context that shards and entities run in: the runner's services they use.

Like Trio's run context, it is small, frozen and built once: a shard or an
entity can be built and tested with a context of its own making, and no
leaf depends on the runner object or on a module above it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from ..config import EntityOptions, ShardingConfig
from ..core.hashing import ShardId
from ..entity import Implementation
from ..storage.base import (
    DeferredStorage,
    Lease,
    MessageStorage,
    StateStorage,
    StreamStorage,
    TimerStorage,
)
from .hooks import Hooks
from .replies import StoredReplies
from .residency import Residency
from .stored_streams import StreamWatchers

if TYPE_CHECKING:
    from .client import Client


@attrs.frozen
class Hosted:
    """An entity type this runner hosts, with the options it runs under."""

    implementation: Implementation
    options: EntityOptions


@attrs.frozen
class Services:
    address: str
    config: ShardingConfig
    messages: MessageStorage
    states: StateStorage
    timers: TimerStorage
    deferreds: DeferredStorage
    stored_replies: StoredReplies
    streams: StreamStorage
    watchers: StreamWatchers
    """The persisted streams handled here, woken by their ack notices."""
    hooks: Hooks
    residency: Residency
    hosted: Mapping[str, Hosted]
    client: Client
    """What entities send with (their EntityContext's client)."""
    release: Callable[[Lease], Awaitable[None]]
    """Give a lease back (the storage session's release)."""
    confirmed: Callable[[ShardId], Awaitable[None]]
    """Wait until a shard's lease is surely still held, or lost (the session's
    ``confirmed``): what every handler's start waits on."""
    base_context: contextvars.Context
    """What entity tasks start from: the context of the task that opened the runner,
    so that no handler runs with the context variables of a caller."""
