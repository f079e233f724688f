"""A runner process for the broadcast fault tests.

Run from the repository root::

    python -m tests.postgres.broadcast_app DSN PREFIX

It hosts the ``Tally`` entity of ``tests.broadcast_scenarios`` (durable state: the
notes it was sent) and answers the ``whoami`` runner message, on the PostgreSQL
storage at ``DSN`` (tables named with ``PREFIX``), listening on 127.0.0.1; prints
``ready <address> <machine_id>`` once settled and runs until SIGTERM.
"""

from __future__ import annotations

import sys

from trio_cluster import TransportConfig, open_runner
from trio_cluster.postgres.storage import open_postgres_storage
from trio_cluster.testing import TEST_CONFIG

from ..broadcast_scenarios import TALLIES, answering_whoami
from .app_common import run_app, serve_until_terminated, watching_termination


def transport(prefix: str) -> TransportConfig:
    return TransportConfig(host="127.0.0.1", cluster=prefix)


async def serve(dsn: str, prefix: str) -> None:
    async with (
        watching_termination() as terminated,
        open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
    ):
        address: list[str] = []
        async with open_runner(
            TALLIES,
            storage=storage,
            config=TEST_CONFIG,
            transport=transport(prefix),
            runner_handlers=[answering_whoami(address)],
        ) as runner:
            address.append(runner.address)
            await serve_until_terminated(runner, terminated)


def main(argv: list[str]) -> None:
    run_app("tests.postgres.broadcast_app", serve, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
