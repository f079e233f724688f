"""What users import: the curated names, and no optional dependency pulled in unasked."""

from __future__ import annotations

import subprocess
import sys

import trio_cluster
import trio_cluster.postgres


def test_every_exported_name_exists() -> None:
    for module in (trio_cluster, trio_cluster.postgres):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], module.__name__


def test_the_error_tuple_narrows_to_every_reason() -> None:
    assert {cls.reason for cls in trio_cluster.CLUSTER_ERRORS} == set(
        trio_cluster.errors.Reason.__args__  # type: ignore[attr-defined]
    )
    assert all(issubclass(cls, trio_cluster.ClusterError) for cls in trio_cluster.CLUSTER_ERRORS)


def test_importing_the_package_and_running_a_runner_imports_no_extra() -> None:
    script = """
import sys, trio, msgspec
import trio_cluster
from trio_cluster import Entity, open_runner

class Ping(msgspec.Struct):
    pass

Probe = Entity("Probe")
ping = Probe.rpc("ping", Ping, int)

class Handler:
    def __init__(self, ctx):
        pass

    @ping.handler
    async def ping(self, _):
        return 1

async def main():
    async with open_runner(Probe.implement(Handler)) as runner:
        assert await runner.ask(ping, "p", Ping()) == 1

trio.run(main)
extras = ("psycopg", "h11", "prometheus_client", "opentelemetry", "cronsim")
print(sorted(name for name in sys.modules if name.split(".")[0] in extras))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
