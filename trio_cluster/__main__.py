"""The operator's command line: ``python -m trio_cluster status --dsn DSN``.

``status`` prints the status view of the cluster whose tables carry
``--prefix`` (see docs/operations.md, "Status view"): once, or with
``--watch`` every few seconds until Ctrl-C; as text, or with ``--json`` as
one JSON document per reading. It only reads (plain SELECTs on one
connection of its own, no lock, no migration), so it is safe against a
live cluster. It exits 0, or 2 with a one-line error when the database
cannot be reached or holds no such cluster: a command run by operators
and scripts answers with a reason, not a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import trio

from .errors import PersistenceError
from .status_view import render_json, render_text

TIMEOUT_S = 10.0
"""Bound on connecting and on each reading: an unreachable server is an error, not a hang."""
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class StatusFailed(Exception):
    """Why no status could be read; printed as the command's one-line error."""


class OutputClosed(Exception):
    """Whoever read the output stopped reading (``| head``): not a database error."""


def _show(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise OutputClosed from None


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number (got {text!r})")
        return value

    return parse


def _prefix(text: str) -> str:
    from .postgres.schema import check_prefix  # noqa: PLC0415 - needs the postgres extra

    try:
        return check_prefix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m trio_cluster", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="runners, shard owners and persisted backlog")
    status.add_argument("--dsn", required=True, help="the cluster's PostgreSQL database")
    status.add_argument("--prefix", type=_prefix, default="trio_cluster_", help="table prefix")
    status.add_argument(
        "--watch",
        nargs="?",
        type=_positive(float),
        const=2.0,
        metavar="SECONDS",
        help="read again every SECONDS (default 2) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="one JSON document per reading")
    status.add_argument(
        "--shards-per-group",
        type=_positive(int),
        metavar="N",
        help="the cluster's layout, to list shards never leased as unowned too",
    )
    status.add_argument(
        "--shards", action="store_true", help="text: one row per shard, with its lease epoch"
    )
    return top


async def status(args: argparse.Namespace) -> None:
    """Read and print the status, once or every ``args.watch`` seconds, on one connection."""
    from .pgdriver import PgError, open_connection  # noqa: PLC0415 - needs the postgres extra
    from .postgres.status import read_status  # noqa: PLC0415

    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    # Connecting and each reading are bounded; the waits between readings are not.
    bound = trio.CancelScope(deadline=trio.current_time() + TIMEOUT_S)
    try:
        with bound:
            async with open_connection(args.dsn, application_name="trio_cluster status") as conn:
                while True:
                    bound.deadline = trio.current_time() + TIMEOUT_S
                    snapshot = await read_status(
                        conn, args.prefix, shards_per_group=args.shards_per_group
                    )
                    bound.deadline = math.inf
                    if args.json:
                        text = render_json(snapshot)
                    else:
                        text = render_text(snapshot, per_shard=args.shards)
                    _show(CLEAR_SCREEN + text if clear else text)
                    if args.watch is None:
                        return
                    await trio.sleep(args.watch)
                    if not args.json and not clear:
                        _show("")
    except (PgError, OSError, ValueError) as error:
        raise StatusFailed(f"cannot read the database: {error}".splitlines()[0]) from None
    except PersistenceError as error:
        raise StatusFailed(str(error)) from None
    if bound.cancelled_caught:
        raise StatusFailed(f"the database did not answer within {TIMEOUT_S:g} s")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        trio.run(status, args)
    except KeyboardInterrupt:
        return 0
    except OutputClosed:
        # Python would complain once more, flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except StatusFailed as error:
        print(f"trio_cluster status: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
