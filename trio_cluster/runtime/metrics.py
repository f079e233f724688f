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


@attrs.frozen
class Snapshot:
    """One reading of a runner's counters and gauges, for a metrics exporter."""

    processed: int
    defects: int
    mailbox_full: int
    activations: int
    passivations: int
    resident_entities: int
    owned_shards: int
    waiting_callers: int
