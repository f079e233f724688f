"""One runner process of the demo cluster: ``python -m trio_cluster.demo.node DSN``.

It hosts the bank on PostgreSQL, listens for peers on 127.0.0.1, prints
``ready <address> <machine id>`` once it serves, and hands its shards
off when it gets SIGTERM (or SIGINT). With ``--client`` it hosts nothing
and only sends: a client process.
"""

from __future__ import annotations

import argparse

import trio

from trio_cluster import ShardingConfig, TransportConfig, open_runner, wait_for_termination
from trio_cluster.postgres.storage import open_postgres_storage

from .bank import ACCOUNTS


async def run_node(dsn: str, *, prefix: str, port: int, shards: int, client: bool) -> None:
    config = ShardingConfig(shards_per_group=shards)
    implementations = () if client else (ACCOUNTS,)
    async with (
        open_postgres_storage(dsn, prefix=prefix) as storage,
        open_runner(
            *implementations,
            storage=storage,
            config=config,
            transport=TransportConfig(port=port, cluster=prefix),
        ) as runner,
    ):
        print(f"ready {runner.address} {runner.machine_id}", flush=True)
        signum = await wait_for_termination()
        print(f"stopping on signal {signum}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dsn")
    parser.add_argument("--prefix", default="demo_")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--client", action="store_true")
    args = parser.parse_args()
    trio.run(
        lambda: run_node(
            args.dsn, prefix=args.prefix, port=args.port, shards=args.shards, client=args.client
        )
    )


if __name__ == "__main__":
    main()
