"""Helpers the benchmark scripts share: summaries, tables, reports, the command line.

``local``, ``storage`` and ``cluster`` measure different things but report
them the same way: nearest-rank percentiles of sorted nanosecond samples,
a Markdown table of median/min/max per measurement with cost multiples
against the same repeat's baseline, a JSON report with the environment,
and the same ``--quick``/``--repeats``/``--json`` options. Keeping these
here means a change to how a figure is summarised or shown is made once,
and the three reports stay comparable. Only what is identical in all its
users lives here; what differs between scripts (the measuring loops, the
number formats, the metrics themselves) stays in each script.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

clock = time.perf_counter_ns
"""The benchmarks' clock: monotonic, in integer nanoseconds."""

Values = dict[str, list[float]]
"""Each metric's key to its per-repeat values, in repeat order."""


def percentile(sorted_samples: list[int], q: float) -> int:
    """Nearest-rank percentile of already sorted samples.

    Nearest rank returns a sample that was actually measured, never an
    interpolation between two, so a p99 is a real request's time.
    """
    rank = max(1, math.ceil(q * len(sorted_samples)))
    return sorted_samples[rank - 1]


def log(message: str) -> None:
    """Progress on stderr, flushed at once, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


async def concurrently(per_sender: Callable[[int], Awaitable[None]], senders: int) -> int:
    """Run ``per_sender(i)`` for each of ``senders`` tasks; the elapsed nanoseconds.

    Garbage is collected first, so none left over from setting up is
    collected inside the timed run; the collector stays on.
    """
    gc.collect()
    start = clock()
    async with trio.open_nursery() as nursery:
        for i in range(senders):
            nursery.start_soon(per_sender, i)
    return clock() - start


# -- cost multiples -------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One reported measurement, and the baseline its cost multiple is taken against."""

    key: str
    label: str
    unit: str
    rate: bool = False
    """True when higher is better (a rate); its cost multiple is then baseline / value."""
    baseline: str | None = None


def multiples_against(values: Values, key: str, base: str, *, rate: bool) -> list[float]:
    """Per-repeat cost multiples of ``key`` against the same repeat's ``base``.

    Paired per repeat, so a repeat run while the machine was busy is set
    against a baseline measured under the same load. Higher means costlier:
    value / base for a time or a size, base / value for a rate.
    """
    pairs = zip(values[key], values[base], strict=False)
    if rate:
        return [b / v for v, b in pairs if v > 0]
    return [v / b for v, b in pairs if b > 0]


def cost_multiples(metric: Metric, values: Values) -> list[float]:
    """Per-repeat cost multiples of ``metric`` against its baseline; none without one."""
    if metric.baseline is None:
        return []
    return multiples_against(values, metric.key, metric.baseline, rate=metric.rate)


# -- the Markdown table ---------------------------------------------------------------

MEASUREMENT_COLUMNS = ("Measurement", "Median", "Min", "Max", "Unit")
"""The first columns of every measurement table; each script adds its ratio columns."""


def markdown_table(
    columns: Sequence[str], right_aligned: Sequence[bool], rows: Iterable[Sequence[str]]
) -> str:
    """A Markdown table: the header, its alignment line, then one line per row."""
    lines = [
        markdown_row(columns),
        "|" + "".join("---:|" if right else "---|" for right in right_aligned),
    ]
    lines.extend(markdown_row(row) for row in rows)
    return "\n".join(lines)


def markdown_row(cells: Sequence[str]) -> str:
    """One Markdown table line."""
    return "| " + " | ".join(cells) + " |"


MEASUREMENT_ALIGNMENT = (False, True, True, True, False)
"""Label and unit left, the figures right."""


def measurement_cells(
    label: str, unit: str, series: list[float], fmt: Callable[[float], str]
) -> list[str]:
    """The label, median, min, max and unit cells of one measurement's row."""
    return [label, fmt(statistics.median(series)), fmt(min(series)), fmt(max(series)), unit]


# -- the JSON report ------------------------------------------------------------------


def series_summary(label: str, unit: str, series: list[float]) -> dict[str, Any]:
    """The fields every script's JSON report gives each metric, every value included."""
    return {
        "label": label,
        "unit": unit,
        "median": statistics.median(series),
        "min": min(series),
        "max": max(series),
        "values": series,
    }


def cost_summary(metric: Metric, values: Values) -> dict[str, Any]:
    """A metric's JSON entry with its baseline and cost multiples (``local``, ``cluster``)."""
    multiples = cost_multiples(metric, values)
    return series_summary(metric.label, metric.unit, values[metric.key]) | {
        "baseline": metric.baseline,
        "cost_multiple_median": statistics.median(multiples) if multiples else None,
        "cost_multiples": multiples,
    }


def utc_now() -> str:
    """When the report was made, UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions of ``packages``, ``?`` for one not installed."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "?"
    return versions


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path``, making its directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


# -- the command line -----------------------------------------------------------------


def bench_parser(
    prog: str,
    description: str,
    *,
    repeats_help: str = "repeats per measurement (default 5, 3)",
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: --quick, --repeats, --json."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="smaller runs, 3 repeats")
    parser.add_argument("--repeats", type=int, help=repeats_help)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    return parser


def repeats_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The number of repeats asked for: 5, 3 with --quick, or --repeats (at least 1)."""
    repeats: int = (3 if args.quick else 5) if args.repeats is None else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    return repeats
