"""Counters a runner keeps about itself.

Plain integers bumped on the hot path (an attribute increment costs
nothing measurable); exporters read a :class:`Snapshot` when they scrape.
"""

from __future__ import annotations

import attrs


@attrs.define
class Counters:
    processed: int = 0
    defects: int = 0
    mailbox_full: int = 0
    activations: int = 0
    passivations: int = 0
    refused: int = 0
    """Requests from peers refused before reaching a shard (malformed, not owned here)."""
    contained_failures: int = 0
    """Bugs of the runtime itself caught at a failure boundary (each is logged as an error)."""
    waiting_callers: int = 0


@attrs.frozen
class Snapshot:
    """One reading of a runner's counters and gauges, for a metrics exporter."""

    processed: int
    defects: int
    mailbox_full: int
    activations: int
    passivations: int
    refused: int
    contained_failures: int
    resident_entities: int
    owned_shards: int
    waiting_callers: int
