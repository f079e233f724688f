"""The cluster demo: ``python -m trio_cluster.demo [--seconds 15]``.

On a fresh machine it starts a throwaway PostgreSQL server, three runner
processes hosting the bank (``trio_cluster.demo.node``) and a client in
this process (a runner hosting nothing, on the same storage and
transport), then sends traffic: persisted, idempotent deposits and
volatile balance reads, printing once a second the request rate, live
p50/p99 latency, errors and the shard map as the client sees it. A few
seconds in it SIGKILLs one runner and shows its shards being taken over;
at the end it stops the rest gracefully (SIGTERM) and deletes the server.

Without PostgreSQL's server binaries (``initdb``, ``pg_ctl``) or the
``postgres`` extra it runs the embedded in-memory demo instead.

Ctrl-C at any moment leaves nothing running: the runners are killed and
the server stopped on the way out, and a runner also dies with this
process if it is killed outright (Linux).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import pwd
import shutil

import trio

from . import embedded


def say(message: str) -> None:
    print(message, flush=True)


def server_unavailable() -> str | None:
    """Why the PostgreSQL demo cannot run here, or None when it can."""
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install 'trio-cluster[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as"
    for binary in ("initdb", "pg_ctl"):
        if shutil.which(binary) is None and not glob.glob(f"/usr/lib/postgresql/*/bin/{binary}"):
            return f"{binary} is not on PATH nor in /usr/lib/postgresql/*/bin"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trio_cluster.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="traffic duration")
    parser.add_argument("--kill-after", type=float, help="seconds of traffic before the kill")
    parser.add_argument("--senders", type=int, default=8, help="concurrent customers")
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--shards", type=int, default=100)
    args = parser.parse_args(argv)
    if args.kill_after is None:
        args.kill_after = max(1.0, math.floor(args.seconds / 3))

    reason = server_unavailable()
    if reason is not None:
        say(f"cannot start PostgreSQL: {reason}.")
        say("running the embedded demo instead: one runner, in-memory storage\n")
        trio.run(embedded.main)
        return

    # Imported here: it needs the postgres extra, which the fallback above does without.
    from .orchestrate import run_demo  # noqa: PLC0415

    run_demo(args)


if __name__ == "__main__":
    main()
