"""A PostgreSQL server of the fault suite's own.

Schedules stop and start their server, so they never share the session
server of ``tests/postgres`` (nor an external one named by
``TRIO_CLUSTER_TEST_DSN``, which must not be restarted).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trio_cluster.pgdriver.server import ThrowawayPostgres


@pytest.fixture(scope="module")
def fault_pg() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as server:
        yield server
