"""Every Prometheus metric and every snapshot field is documented in docs/operations.md.

A figure the code exposes and the reference table omits is one nobody
knows how to read; this keeps the two lists from drifting apart.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import prometheus_client as prom

from trio_cluster.prometheus import PrometheusMetrics
from trio_cluster.runtime.metrics import Snapshot

OPERATIONS = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()


def exposed_names(registry: prom.CollectorRegistry) -> set[str]:
    """Each family as it is scraped: a counter with ``_total``, anything else as named."""
    return {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }


def test_every_prometheus_metric_is_in_the_reference() -> None:
    names = exposed_names(PrometheusMetrics().registry)
    assert "trio_cluster_timers_total" in names
    assert sorted(name for name in names if f"`{name}`" not in OPERATIONS) == []


def test_every_snapshot_field_is_in_the_reference() -> None:
    fields = [field.name for field in attrs.fields(Snapshot)]
    assert sorted(name for name in fields if f"| `{name}` |" not in OPERATIONS) == []
