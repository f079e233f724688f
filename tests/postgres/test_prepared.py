"""Prepared statements (``prepare=True``) against a real server: the same results as
the unnamed path, prepared once per connection, bounded, and re-prepared when the
server lost or invalidated the plan."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster.pgdriver import Connection, Param, PgError, open_connection
from trio_cluster.pgdriver.server import ThrowawayPostgres
from trio_cluster.pgdriver.statements import DEFAULT_CAPACITY

from .conftest import ExternalPostgres


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[Connection]:
    async with open_connection(pg_dsn) as connection:
        yield connection


@pytest.fixture
async def table(conn: Connection) -> AsyncIterator[str]:
    name = f"p_{uuid.uuid4().hex[:12]}"
    await conn.execute(f"CREATE TABLE {name} (id int8 PRIMARY KEY, note text, data bytea)")
    yield name
    if not conn.closed:
        await conn.execute(f"DROP TABLE {name}")


async def prepared_names(conn: Connection) -> list[str]:
    return [row[0] for row in await conn.fetch("SELECT name FROM pg_prepared_statements")]


async def both_ways(conn: Connection, sql: str, params: Sequence[Param]) -> list[Any]:
    """The unnamed path's rows, after checking that two prepared runs return them too."""
    unnamed = await conn.fetch(sql, params)
    assert await conn.fetch(sql, params, prepare=True) == unnamed  # prepares
    assert await conn.fetch(sql, params, prepare=True) == unnamed  # reuses
    return unnamed


CASES: list[tuple[str, list[Param]]] = [
    ("SELECT 1", []),
    ("SELECT $1", [None]),
    ("SELECT $1, $2, $3", [2**31 - 1, 2**31, 2**70]),
    ("SELECT $1::int8 * $2", [2**40, 3]),
    ("SELECT $1, $2, $3", [1.5, True, "héllo ✓"]),
    ("SELECT $1::bytea, $2", [b"\x00\xff", bytes(range(256))]),
    ("SELECT $1, $2", [datetime(2024, 2, 29, 12, tzinfo=UTC), Decimal("1.000000001")]),
    ("SELECT $1::jsonb, $2::uuid::text", ['{"a": 1}', "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("SELECT g FROM generate_series(1, $1) AS g", [5]),
    ("SELECT g FROM generate_series(1, $1) AS g WHERE false", [5]),
]


@pytest.mark.parametrize(("sql", "params"), CASES, ids=[sql for sql, _ in CASES])
async def test_results_are_those_of_the_unnamed_path(
    conn: Connection, sql: str, params: list[Param]
) -> None:
    await both_ways(conn, sql, params)


PARAMS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=False),
    st.text().filter(lambda text: "\x00" not in text),
    st.binary(max_size=64),
)


@given(st.lists(PARAMS, max_size=6))
def test_any_parameters_give_the_unnamed_paths_rows(
    pg_server: ThrowawayPostgres | ExternalPostgres, params: list[Param]
) -> None:
    """Parameter types vary per call (int4, int8, numeric; NULL): each signature is its own
    prepared statement, so a value the unnamed path accepts is never refused."""
    columns = ", ".join(f"${n}" for n in range(1, len(params) + 1)) or "1"

    async def check() -> None:
        async with open_connection(pg_server.dsn) as conn:
            await both_ways(conn, f"SELECT {columns}", params)
            widened = [2**62 if isinstance(p, int) and not isinstance(p, bool) else p
                       for p in params]  # fmt: skip
            await both_ways(conn, f"SELECT {columns}", widened)

    trio.run(check)


async def test_dml_row_counts_match(conn: Connection, table: str) -> None:
    insert = f"INSERT INTO {table} (id, note, data) VALUES ($1, $2, $3)"
    assert await conn.execute(insert, [1, "a", b"x"], prepare=True) == 1
    assert await conn.execute(insert, [2, None, None], prepare=True) == 1
    update = f"UPDATE {table} SET note = $1 WHERE id <= $2"
    assert await conn.execute(update, ["b", 2], prepare=True) == 2
    rows = await both_ways(conn, f"SELECT id, note, data FROM {table} ORDER BY id", [])
    assert rows == [(1, "b", b"x"), (2, "b", None)]


async def test_a_statement_is_prepared_once_per_connection(conn: Connection) -> None:
    for n in range(5):
        assert await conn.fetchval("SELECT $1::int + 1", [n], prepare=True) == n + 1
    assert len(await prepared_names(conn)) == 1
    await conn.fetchval("SELECT $1::int + 1", [1])  # the unnamed path prepares nothing
    assert len(await prepared_names(conn)) == 1


async def test_the_cache_is_bounded_and_frees_what_it_evicts(conn: Connection) -> None:
    for n in range(DEFAULT_CAPACITY + 10):
        assert await conn.fetchval(f"SELECT {n}", prepare=True) == n
    assert len(await prepared_names(conn)) <= DEFAULT_CAPACITY + 1
    # The first statements were evicted: running one again prepares it afresh.
    assert await conn.fetchval("SELECT 0", prepare=True) == 0
    assert len(await prepared_names(conn)) <= DEFAULT_CAPACITY + 1


async def test_a_plan_the_server_dropped_is_prepared_again(conn: Connection) -> None:
    assert await conn.fetchval("SELECT $1::text", ["a"], prepare=True) == "a"
    await conn.execute("DEALLOCATE ALL")  # as a pooler or an operator might
    assert await conn.fetchval("SELECT $1::text", ["b"], prepare=True) == "b"
    assert len(await prepared_names(conn)) == 1


async def test_a_plan_invalidated_by_a_schema_change_is_prepared_again(
    conn: Connection, table: str
) -> None:
    await conn.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'a')")
    select = f"SELECT * FROM {table}"
    assert await conn.fetch(select, prepare=True) == [(1, "a", None)]
    await conn.execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7")
    assert await conn.fetch(select, prepare=True) == [(1, "a", None, 7)]
    assert len(await prepared_names(conn)) == 1  # the stale one was deallocated


async def test_inside_a_transaction_an_invalidated_plan_fails_it_once(
    conn: Connection, table: str
) -> None:
    select = f"SELECT * FROM {table}"
    await conn.fetch(select, prepare=True)
    await conn.execute(f"ALTER TABLE {table} ADD COLUMN extra int")
    with pytest.raises(PgError) as caught:
        async with conn.transaction():
            await conn.fetch(select, prepare=True)
    assert caught.value.sqlstate == "0A000"
    assert await conn.fetch(select, prepare=True) == []
    assert len(await prepared_names(conn)) == 1


async def test_an_invalid_statement_fails_as_unnamed_and_is_not_kept(conn: Connection) -> None:
    with pytest.raises(PgError) as unnamed:
        await conn.fetch("SELEC 1")
    with pytest.raises(PgError) as prepared:
        await conn.fetch("SELEC 1", prepare=True)
    assert prepared.value.sqlstate == unnamed.value.sqlstate == "42601"
    assert await prepared_names(conn) == []
    assert await conn.fetchval("SELECT 2", prepare=True) == 2


async def test_prepared_statements_work_inside_transactions(conn: Connection, table: str) -> None:
    insert = f"INSERT INTO {table} (id) VALUES ($1)"
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await conn.execute(insert, [1], prepare=True)
            raise RuntimeError("roll back")
    async with conn.transaction():
        await conn.execute(insert, [2], prepare=True)  # prepared still, though rolled back
    assert await conn.fetch(f"SELECT id FROM {table}", prepare=True) == [(2,)]
