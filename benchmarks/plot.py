"""The latency-distribution plot of the cross-runner benchmark.

A complementary CDF on log axes shows the whole distribution at once,
the tail above all, which is where a p99 target is met or missed; the raw
loopback baseline drawn beside it is the floor the runtime is judged by.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def write_latency_plot(distributions: Mapping[str, list[int]], path: Path) -> bool:
    """Write the plot of ``{label: sorted nanosecond samples}``; False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: the benchmark runs without it

        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        return False
    figure, axes = pyplot.subplots(figsize=(8, 5))
    for label, samples in distributions.items():
        if not samples:
            continue
        count = len(samples)
        micros = [sample / 1e3 for sample in samples]
        above = [1 - index / count for index in range(count)]
        axes.step(micros, above, where="post", label=f"{label} (n={count:,})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("round trip (µs)")
    axes.set_ylabel("fraction of requests slower")
    axes.set_title("trio_cluster cross-runner ask latency (last repeat)")
    axes.axhline(0.01, color="grey", linewidth=0.5, linestyle=":")
    axes.text(axes.get_xlim()[0], 0.011, " p99", color="grey", fontsize=8)
    axes.grid(True, which="both", linewidth=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    pyplot.close(figure)
    return True
