"""The status view: its model, its renderings, and ``read_status`` on the memory storage.

The PostgreSQL side runs the same scenario (tests/postgres/test_status.py)
and the command line against real runner processes
(tests/postgres/test_status_processes.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from trio_cluster import MemoryStorage, ShardId
from trio_cluster.__main__ import parser
from trio_cluster.status_view import render_json, render_text
from trio_cluster.storage.status import (
    ClusterStatus,
    GroupStatus,
    RunnerStatus,
    ShardStatus,
    Totals,
    shard_map,
)

from .status_scenario import check_read_status

READ_AT = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def runner(machine_id: int, address: str, *, alive: bool = True) -> RunnerStatus:
    return RunnerStatus(
        machine_id=machine_id,
        address=address,
        alive=alive,
        weight=1.0 if machine_id else 2.5,
        groups=("default",),
        registered_at=READ_AT - timedelta(minutes=5),
        heartbeat_at=READ_AT - timedelta(seconds=0.4 + 90 * (not alive)),
    )


def shard(
    index: int, owner: int | None, epoch: int | None, backlog: int = 0, age: float | None = None
) -> ShardStatus:
    return ShardStatus(index=index, owner=owner, epoch=epoch, backlog=backlog, oldest_age=age)


STATUS = ClusterStatus(
    read_at=READ_AT,
    shards_per_group=6,
    runners=(
        runner(0, "10.0.0.1:7000"),
        runner(1, "10.0.0.2:7000"),
        runner(2, "10.0.0.3:7000", alive=False),
    ),
    groups=(
        GroupStatus(
            name="default",
            shards=(
                shard(0, 0, 3),
                shard(1, 0, 3),
                shard(2, 1, 2, backlog=4, age=75.0),
                shard(3, 0, 5),
                shard(4, None, 7),
                shard(5, 1, 1),
            ),
        ),
        GroupStatus(
            name="parked",
            shards=tuple(
                shard(i, None, None, backlog=i % 2, age=3.25 if i % 2 else None) for i in range(6)
            ),
        ),
    ),
)


def test_the_text_view_aligns_runners_shard_ranges_and_backlog() -> None:
    assert render_text(STATUS) == "\n".join(
        [
            "runners 2/3 alive, shards 5/12 owned, backlog 7 (at 2025-03-01 12:00:00Z)",
            "",
            "MACHINE  ADDRESS        ALIVE  WEIGHT  GROUPS   SINCE                 HEARTBEAT",
            "0        10.0.0.1:7000  yes    2.5     default  2025-03-01 11:55:00Z  0.4s ago",
            "1        10.0.0.2:7000  yes    1       default  2025-03-01 11:55:00Z  0.4s ago",
            "2        10.0.0.3:7000  no     1       default  2025-03-01 11:55:00Z  1m30s ago",
            "",
            "group default: 5/6 shards owned",
            "OWNER            SHARDS  INDICES",
            "0 10.0.0.1:7000  3       0-1,3",
            "1 10.0.0.2:7000  2       2,5",
            "unowned          1       4",
            "",
            "group parked: 0/6 shards owned",
            "OWNER    SHARDS  INDICES",
            "unowned  6       0-5",
            "",
            "BACKLOG    REQUESTS  OLDEST  OWNER",
            "default/2  4         1m15s   1",
            "parked/1   1         3.2s    -",
            "parked/3   1         3.2s    -",
            "parked/5   1         3.2s    -",
        ]
    )


def test_the_text_view_per_shard_adds_each_shards_epoch() -> None:
    text = render_text(STATUS, per_shard=True)
    assert (
        "\n".join(
            [
                "SHARD  OWNER  EPOCH  BACKLOG  OLDEST",
                "0      0      3      0        -",
                "1      0      3      0        -",
                "2      1      2      4        1m15s",
                "3      0      5      0        -",
                "4      -      7      0        -",
                "5      1      1      0        -",
            ]
        )
        in text
    )


def test_the_json_view_is_the_snapshot_with_its_totals() -> None:
    text = render_json(STATUS)
    assert "\n" not in text
    document = msgspec.json.decode(text)
    assert document["totals"] == msgspec.to_builtins(
        Totals(runners_alive=2, runners=3, shards_owned=5, shards=12, backlog=7)
    )
    assert document["read_at"] == "2025-03-01T12:00:00Z"
    assert document["groups"][0]["shards"][2] == {
        "index": 2,
        "owner": 1,
        "epoch": 2,
        "backlog": 4,
        "oldest_age": 75.0,
    }
    # Unknown fields (the totals) are ignored: the document decodes back to the snapshot.
    assert msgspec.json.decode(text, type=ClusterStatus) == STATUS


def test_the_shard_map_lists_every_index_only_given_the_layout() -> None:
    def listed(groups: list[str], shards_per_group: int | None) -> tuple[GroupStatus, ...]:
        return shard_map(
            groups=groups,
            shards_per_group=shards_per_group,
            owners={ShardId("default", 1): 7},
            epochs={ShardId("default", 1): 2, ShardId("old", 0): 4},
            backlog={ShardId("idle", 2): (3, 1.5)},
        )

    assert [(g.name, [s.index for s in g.shards]) for g in listed(["default"], None)] == [
        ("default", [1]),
        ("idle", [2]),
        ("old", [0]),
    ]
    full = listed(["extra"], 3)
    assert [(g.name, len(g.shards)) for g in full] == [
        ("default", 3),
        ("extra", 3),
        ("idle", 3),
        ("old", 3),
    ]
    assert full[0].shards[1] == shard(1, 7, 2)
    assert full[2].shards[2] == shard(2, None, None, backlog=3, age=1.5)


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--dsn", "x", "--watch", "0"],
        ["status", "--dsn", "x", "--prefix", "Bad-Prefix"],
        ["status", "--dsn", "x", "--shards-per-group", "1.5"],
    ],
)
def test_the_command_line_refuses_bad_arguments(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_command_line_defaults() -> None:
    args = parser().parse_args(["status", "--dsn", "x", "--watch"])
    assert (args.prefix, args.watch, args.json, args.shards_per_group) == (
        "trio_cluster_",
        2.0,
        False,
        None,
    )


async def test_read_status_on_memory() -> None:
    await check_read_status(MemoryStorage())
