"""What the target program, its tests and its attackers agree on.

The ``Target`` entity protocol (the attacker builds its Requests from these
names by hand), the cluster's name and secret (an attacker that "holds the
secret" is a cluster member gone bad), the tunable limits passed on the
target's command line, the ``ready`` line, and the control commands a test
sends on the target's stdin to drive its legitimate traffic.

Every control command and result is a msgspec Struct sent as one JSON line,
so the test side decodes exactly the type it expects and a malformed line is
an error, not a silently missing field.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

import msgspec

from trio_cluster import Entity, EntityOptions, RetryPolicy, ShardingConfig
from trio_cluster.core.hashing import shard_index

CLUSTER: Final = "hostile"
SECRET: Final = b"hostile-test-secret"
"""The shared secret in the ``secret`` and ``tls`` modes; the attackers know it too."""
SHARDS: Final = 8
"""Shards of the ``default`` group; the owner runner holds all of them."""

Mode: TypeAlias = Literal["plain", "secret", "tls"]
MODES: Final[tuple[Mode, ...]] = ("plain", "secret", "tls")


class Slow(msgspec.Struct, frozen=True):
    """Wait until ``gate`` is released, then answer ``value``."""

    gate: str
    value: str


Target = Entity("Target")
echo = Target.rpc("echo", str, str)
"""Volatile echo: the legitimate traffic, and the cheapest request an attacker can send."""
sized = Target.rpc("sized", int, bytes)
"""Answers ``pattern(n)``: replies of a requested size (up to and past the frame limit)."""
slow = Target.rpc("slow", Slow, str)
"""Holds a request in flight until its gate is released (reply forging, mailbox filling)."""
release = Target.rpc("release", str, type(None))
"""Opens a gate: an attacker can end its own slow requests without the control channel."""
ticks = Target.stream("ticks", int, int)
"""A stream of 0, 1, 2, ... (``n`` of them; -1: until its caller leaves)."""


MAX_SIZED: Final = 32 * 2**20
"""The largest reply ``sized`` makes (it clamps): past the frame limit, not past all reason."""


def pattern(size: int) -> bytes:
    """The bytes ``sized`` answers: not all one value, so a shifted or cut copy is noticed."""
    unit = b"0123456789abcdef"
    return (unit * (size // len(unit) + 1))[:size]


def shard_of(entity_id: str) -> int:
    """The shard index a correct Request for ``entity_id`` carries."""
    return shard_index(entity_id, SHARDS)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The target's tunables, smaller than the defaults so that tests reach them quickly."""

    ping_interval: float = 1.0
    """The library's default: shorter makes liveness fail on a loaded two-core machine."""
    handshake_timeout: float = 1.0
    """Half the default, so the tests waiting for it wait less."""
    max_unsent: int = 4 * 2**20
    """Small, so a never-reading peer is cut off after a few MB rather than 64 MiB."""
    max_inbound_connections: int = 128
    max_handshakes: int = 32
    """Small enough for a few hundred connections to go past both limits."""
    max_frame_size: int = 2 * 2**20
    """Small, so that ``max_unsent`` can be small too and still hold two whole frames."""
    max_scheduled_per_shard: int = 200
    mailbox_capacity: int = 16
    """Small, so a test fills a mailbox with a handful of requests."""
    max_idle_time: float = 1.0
    """Short, so idle entities (once, a second copy of one) are passivated during a test."""
    send_timeout: float = 10.0


TRANSPORT_LIMITS: Final = (
    "handshake_timeout",
    "max_unsent",
    "max_inbound_connections",
    "max_handshakes",
    "max_frame_size",
)
"""Limits that belong to ``TransportConfig``."""


def sharding_config(limits: Limits) -> ShardingConfig:
    """The owner's and caller's sharding config."""
    return ShardingConfig(
        shards_per_group=SHARDS,
        send_timeout=limits.send_timeout,
        entity_termination_timeout=1.0,
        send_retry=RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=40, max_elapsed=2.0),
        entity_defaults=EntityOptions(
            mailbox_capacity=limits.mailbox_capacity, max_idle_time=limits.max_idle_time
        ),
        max_scheduled_per_shard=limits.max_scheduled_per_shard,
        # What a runner accepts must fit the frame limit of the links it must cross.
        max_message_size=limits.max_frame_size - 64 * 1024,
    )


class Ready(msgspec.Struct, frozen=True):
    """The target's first stdout line, after ``ready ``: where and what to attack."""

    pid: int
    mode: Mode
    owner: str
    """Address (host:port) of the runner hosting ``Target``: it owns every shard."""
    caller: str
    """Address of the client-only runner sending the legitimate traffic to ``owner``."""
    owner_machine: int
    caller_machine: int


# -- control commands, one JSON line each on the target's stdin ----------------------


class Probe(msgspec.Struct, frozen=True, tag_field="op", tag="probe"):
    """Legitimate traffic: ``count`` echo asks over a few entities, then one sized ask.

    Every ask goes from the caller runner to the owner runner over their socket;
    a wrong or missing answer is listed in the result's ``errors``.
    """

    tag: str
    count: int = 12
    size: int = 64 * 1024
    senders: int = 4
    timeout: float = 10.0


class StartSlow(msgspec.Struct, frozen=True, tag_field="op", tag="slow"):
    """Start a slow ask from the caller; report once the owner's handler holds it."""

    tag: str
    entity_id: str
    gate: str
    value: str
    timeout: float = 10.0


class Release(msgspec.Struct, frozen=True, tag_field="op", tag="release"):
    tag: str
    gate: str


class Big(msgspec.Struct, frozen=True, tag_field="op", tag="big"):
    """One legitimate ask for a reply of ``size`` bytes; the result names any error."""

    tag: str
    size: int
    timeout: float = 10.0


Command: TypeAlias = Probe | StartSlow | Release | Big


# -- what the target answers, one JSON line each on its stdout -----------------------


class ProbeResult(msgspec.Struct, frozen=True):
    tag: str
    errors: list[str]
    latencies_ns: list[int]


class SlowInFlight(msgspec.Struct, frozen=True):
    """The slow ask's handler is running on the owner: its id is in flight on both runners."""

    tag: str
    request_id: int | None
    """None when the library offers no way to see the id (see target.RecordingIds)."""
    sent_after_ms: int
    """Wall clock, in Unix ms, just before the ask was made: where a guesser starts."""


class SlowDone(msgspec.Struct, frozen=True):
    tag: str
    result: str | None
    error: str | None


class Ack(msgspec.Struct, frozen=True):
    tag: str


class BigResult(msgspec.Struct, frozen=True):
    tag: str
    length: int | None
    correct: bool
    error: str | None
    """The class name of the error the ask raised, if any."""
