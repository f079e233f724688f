"""The status view's renderings of a :class:`ClusterStatus`: aligned text and JSON.

Pure functions of the snapshot, so what an operator reads is exactly what
was read, and tests need no cluster. Ages are measured against the
snapshot's own ``read_at`` (the storage's clock), never this machine's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import msgspec

from .storage.status import ClusterStatus, GroupStatus, ShardStatus

__all__ = ["render_json", "render_text"]

_NONE = "-"


def render_json(status: ClusterStatus) -> str:
    """One line of JSON: the snapshot's fields, with the header's ``totals`` first."""
    document = {"totals": status.totals(), **msgspec.structs.asdict(status)}
    return msgspec.json.encode(document).decode()


def render_text(status: ClusterStatus, *, per_shard: bool = False) -> str:
    """A header line, the runners table, each group's shard map and the backlog.

    A group's shards are listed by owner as index ranges (``0-3,7``), which
    stays short for hundreds of shards; ``per_shard`` adds one row per
    shard with its lease epoch.
    """
    totals = status.totals()
    lines = [
        f"runners {totals.runners_alive}/{totals.runners} alive, shards"
        f" {totals.shards_owned}/{totals.shards} owned, backlog {totals.backlog}"
        f" (at {_time(status.read_at)})",
        "",
    ]
    addresses = {runner.machine_id: runner.address for runner in status.runners}
    lines += _table(
        ("MACHINE", "ADDRESS", "ALIVE", "WEIGHT", "GROUPS", "SINCE", "HEARTBEAT"),
        [
            (
                str(runner.machine_id),
                runner.address,
                "yes" if runner.alive else "no",
                f"{runner.weight:g}",
                ",".join(runner.groups) or _NONE,
                _NONE if runner.registered_at is None else _time(runner.registered_at),
                _NONE
                if runner.heartbeat_at is None
                else f"{_age((status.read_at - runner.heartbeat_at).total_seconds())} ago",
            )
            for runner in status.runners
        ],
    )
    for group in status.groups:
        lines += ["", *_group(group, addresses, per_shard=per_shard)]
    backlog = [
        (f"{group.name}/{shard.index}", shard)
        for group in status.groups
        for shard in group.shards
        if shard.backlog
    ]
    if backlog:
        lines += [""]
        lines += _table(
            ("BACKLOG", "REQUESTS", "OLDEST", "OWNER"),
            [
                (name, str(shard.backlog), _age(shard.oldest_age), _machine(shard.owner))
                for name, shard in backlog
            ],
        )
    return "\n".join(lines)


def _group(group: GroupStatus, addresses: dict[int, str], *, per_shard: bool) -> list[str]:
    owned = sum(shard.owner is not None for shard in group.shards)
    lines = [f"group {group.name}: {owned}/{len(group.shards)} shards owned"]
    by_owner: dict[int | None, list[int]] = {}
    for shard in group.shards:
        by_owner.setdefault(shard.owner, []).append(shard.index)
    owners = sorted(by_owner, key=lambda owner: (owner is None, owner or 0))
    lines += _table(
        ("OWNER", "SHARDS", "INDICES"),
        [
            (
                "unowned" if owner is None else f"{owner} {addresses.get(owner, '(unregistered)')}",
                str(len(by_owner[owner])),
                _ranges(by_owner[owner]),
            )
            for owner in owners
        ],
    )
    if per_shard:
        lines += _table(
            ("SHARD", "OWNER", "EPOCH", "BACKLOG", "OLDEST"),
            [_shard_row(shard) for shard in group.shards],
        )
    return lines


def _shard_row(shard: ShardStatus) -> tuple[str, ...]:
    return (
        str(shard.index),
        _machine(shard.owner),
        _NONE if shard.epoch is None else str(shard.epoch),
        str(shard.backlog),
        _age(shard.oldest_age),
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, headers first."""
    grid = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[column]) for row in grid) for column in range(len(headers))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in grid
    ]


def _ranges(indices: Sequence[int]) -> str:
    """Sorted indices as runs: ``[0, 1, 2, 5]`` is ``0-2,5``."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _machine(machine_id: int | None) -> str:
    return _NONE if machine_id is None else str(machine_id)


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float | None) -> str:
    """A duration in its two largest units: ``4.2s``, ``12m05s``, ``3h07m``, ``2d03h``."""
    if seconds is None:
        return _NONE
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
