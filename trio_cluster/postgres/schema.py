"""Versioned, idempotent migrations, applied on start under an advisory lock.

Every table name carries the cluster's prefix, so two clusters can share a
database. Advisory-lock namespaces are numbered by one table shared by all
prefixes: a (prefix, shard group) pair gets a number no other pair has,
so lock keys never collide between clusters or groups (the original's keys
collided across shard groups).
"""

from __future__ import annotations

import re

from ..pgdriver.connection import Connection

PREFIX_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,30}")
NAMESPACES_TABLE = "trio_cluster_lock_namespaces"
MIGRATION_LOCK = 0x7472_696F  # "trio": serialises concurrent migrations


def check_prefix(prefix: str) -> str:
    """The prefix is spliced into SQL, so it must be a plain identifier."""
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(f"table prefix must match {PREFIX_PATTERN.pattern} (got {prefix!r})")
    return prefix


MIGRATIONS: tuple[str, ...] = (
    # 1: runners, shard epochs (the fencing tokens) and messages.
    """
    CREATE TABLE {p}runners (
        machine_id int PRIMARY KEY,
        address text NOT NULL,
        lock_pid int NOT NULL,
        registered_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE {p}shards (
        shard_group text NOT NULL,
        shard_index int NOT NULL,
        epoch bigint NOT NULL,
        machine_id int NOT NULL,
        acquired_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (shard_group, shard_index)
    );
    CREATE TABLE {p}messages (
        request_id bigint PRIMARY KEY,
        shard_group text NOT NULL,
        shard_index int NOT NULL,
        entity_type text NOT NULL,
        entity_id text NOT NULL,
        rpc text NOT NULL,
        payload bytea NOT NULL,
        primary_key text,
        dedup_key text UNIQUE,
        deliver_at_ms bigint,
        meta bytea NOT NULL,
        processed boolean NOT NULL DEFAULT false,
        reply bytea,
        stored_at timestamptz NOT NULL DEFAULT now(),
        replied_at timestamptz
    );
    CREATE INDEX {p}messages_unprocessed
        ON {p}messages (shard_group, shard_index, request_id) WHERE NOT processed;
    CREATE INDEX {p}messages_unprocessed_entity
        ON {p}messages (shard_group, shard_index, entity_type, entity_id, request_id)
        WHERE NOT processed;
    """,
    # 2: what assignment needs to know of each runner.
    """
    ALTER TABLE {p}runners ADD COLUMN weight float8 NOT NULL DEFAULT 1;
    ALTER TABLE {p}runners ADD COLUMN groups text NOT NULL DEFAULT 'default';
    """,
    # 3: entity state, one row per entity that has any.
    """
    CREATE TABLE {p}states (
        entity_type text NOT NULL,
        entity_id text NOT NULL,
        shard_group text NOT NULL,
        shard_index int NOT NULL,
        data bytea NOT NULL,
        version bigint NOT NULL DEFAULT 1,
        saved_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (entity_type, entity_id)
    );
    """,
    # 4: what retention deletes, per shard, oldest reply first.
    """
    CREATE INDEX {p}messages_processed
        ON {p}messages (shard_group, shard_index, replied_at) WHERE processed;
    """,
    # 5: requests their callers withdrew (a flag: no table rewrite, no new index).
    """
    ALTER TABLE {p}messages ADD COLUMN interrupted boolean NOT NULL DEFAULT false;
    """,
    # 6: entity timers (a request's timer name) and the deferreds suspended requests wait on.
    """
    ALTER TABLE {p}messages ADD COLUMN timer text;
    CREATE INDEX {p}messages_timers
        ON {p}messages (entity_type, entity_id, timer) WHERE timer IS NOT NULL AND NOT processed;
    CREATE TABLE {p}deferreds (
        request_id bigint NOT NULL REFERENCES {p}messages (request_id) ON DELETE CASCADE,
        name text NOT NULL,
        result bytea,
        completed_at timestamptz,
        PRIMARY KEY (request_id, name)
    );
    """,
    # 7: where each schedule stands: its last settled instant, and the epoch that wrote it.
    """
    CREATE TABLE {p}schedules (
        name text PRIMARY KEY,
        fired_ms bigint NOT NULL,
        epoch bigint NOT NULL,
        fired_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 8: persisted streams: each one's chunks, and how far its caller consumed them.
    """
    CREATE TABLE {p}stream_chunks (
        request_id bigint NOT NULL REFERENCES {p}messages (request_id) ON DELETE CASCADE,
        seq bigint NOT NULL,
        chunk bytea NOT NULL,
        PRIMARY KEY (request_id, seq)
    );
    CREATE TABLE {p}stream_acks (
        request_id bigint PRIMARY KEY REFERENCES {p}messages (request_id) ON DELETE CASCADE,
        acked bigint NOT NULL
    );
    """,
    # 9: where a request's reply is announced: its caller's channel (``reply_to``, the
    # storing runner's machine id), or every runner's once a duplicate waits on it too
    # (``watched``). Rows of earlier versions have neither: announced to every runner.
    """
    ALTER TABLE {p}messages ADD COLUMN reply_to int,
        ADD COLUMN watched boolean NOT NULL DEFAULT false;
    """,
)


async def migrate(conn: Connection, prefix: str) -> int:
    """Bring the schema for ``prefix`` up to date; return the version now in force."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1::int8)", [MIGRATION_LOCK])
        await conn.execute_script(
            f"""
            CREATE TABLE IF NOT EXISTS {NAMESPACES_TABLE} (
                id serial PRIMARY KEY,
                name text NOT NULL UNIQUE
            );
            CREATE TABLE IF NOT EXISTS {prefix}schema_version (version int NOT NULL);
            """
        )
        current = await conn.fetchval(f"SELECT max(version) FROM {prefix}schema_version")
        version = int(current or 0)
        for number, script in enumerate(MIGRATIONS, start=1):
            if number > version:
                await conn.execute_script(script.format(p=prefix))
                await conn.execute(
                    f"INSERT INTO {prefix}schema_version (version) VALUES ($1)", [number]
                )
                version = number
        return version


async def lock_namespace(conn: Connection, name: str) -> int:
    """The number of an advisory-lock namespace, created on first use."""
    await conn.execute(
        f"INSERT INTO {NAMESPACES_TABLE} (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        [name],
    )
    number = await conn.fetchval(f"SELECT id FROM {NAMESPACES_TABLE} WHERE name = $1", [name])
    return int(number)
