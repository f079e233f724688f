"""The cross-runner benchmarks' quick modes run to completion: how CI exercises them.

Only that each completes and prints its tables (and the SLA line) is checked;
the figures themselves depend on the machine, so nothing here is timed.
"""

from __future__ import annotations

import glob
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 400
"""Seconds before the run is declared hung (about 2 min on two CPUs, most of it waiting
for the server's statistics to settle: see benchmarks/pgstats.py)."""


def _have(binary: str) -> bool:
    return bool(shutil.which(binary) or glob.glob(f"/usr/lib/postgresql/*/bin/{binary}"))


@pytest.mark.postgres
@pytest.mark.skipif(
    not (_have("initdb") and _have("pg_ctl")), reason="PostgreSQL server binaries not found"
)
def test_quick_cluster_benchmark_completes(tmp_path: Path) -> None:
    plot = tmp_path / "latency.png"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--quick", "--plot", str(plot)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "| Measurement | Median | Min | Max | Unit | x baseline |" in out
    assert "| Target | Measured (median) | Result |" in out
    for label in ("Cross-runner ask p99, volatile", "Throughput, persisted ask", "Failover"):
        assert label in out
    assert "Seed SLA, p99 cross-runner delivery < 100 ms: " in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.postgres
@pytest.mark.skipif(
    not (_have("initdb") and _have("pg_ctl")), reason="PostgreSQL server binaries not found"
)
@pytest.mark.parametrize(
    ("module", "labels"),
    [
        (
            "benchmarks.interrupts",
            ("Interrupt latency p50, volatile ask", "Tell ack=True: calls returned"),
        ),
        ("benchmarks.projection", ("membership read with", "server CPU per NOTIFY")),
        ("benchmarks.gc_pauses", ("tracked objects per idle shard", "full collections")),
        ("benchmarks.persisted_floor", ("floor: p99", "cluster / floor, p99")),
        (
            "benchmarks.streaming",
            ("one stream, window 16", "10 streams, window 16", "sequential volatile ask"),
        ),
    ],
)
def test_a_quick_cross_runner_benchmark_completes(module: str, labels: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for label in labels:
        assert label in done.stdout
