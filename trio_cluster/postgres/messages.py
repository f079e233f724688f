"""Persisted requests and their replies in PostgreSQL, announced by NOTIFY.

Work is claimed through shard ownership alone: a runner reads the
unprocessed requests of shards whose lease it holds, and nothing is ever
claimed row by row (no ``SELECT ... FOR UPDATE`` polling, no claim window
that can strand a request). Completing a request is fenced: the reply is
written only while the shard's epoch is still the writer's, checked under
a share lock on the shard row so that a new owner's epoch bump and a stale
owner's reply are strictly ordered.

Requests and replies are written by group commit (see ``writer``): what
concurrent callers queue goes to the server in one statement per batch, one
transaction and one WAL flush for all, with one ``pg_notify`` per batch (and
channel) announcing every row of it. A reply's notice goes to its caller's
channel alone (see ``_ANNOUNCED_TO``): no other runner wakes for it. Notices
carry what their receiver needs: a reply notice the reply itself, so a caller on
another runner reads nothing back; a stored request's notice the request and its
transaction's id, so the shard's owner reads nothing back unless a read of the
shard may already have returned it (the fence, see ``carried``). Either falls
back to the id alone, and a read, when too large for a notice. Rows travel as one JSON array per
batch (``json_to_recordset``), so one prepared statement serves every batch
size. A batch of one, what a lone caller writes whenever traffic is light, goes
out as its own statement with typed parameters instead: the JSON costs more
than the write itself at that size (about 0.1 ms of the request's write and
0.15 ms of the reply's, on both ends, measured), and a sequential persisted
ask is two such writes in a row.

Every statement here runs once or more per persisted message, so each is
prepared on its connection (``prepare=True``): the server plans it once per
connection instead of once per call.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import msgspec

from ..core.envelope import Envelope
from ..core.hashing import ShardId
from ..errors import ClusterError, EntityNotAssignedToRunner, PersistenceError
from ..pgdriver.codec import Param
from ..pgdriver.pool import Pool
from ..storage.base import (
    InterruptStored,
    Lease,
    MembershipChanged,
    Notice,
    Replied,
    Saved,
    StateWrite,
    Stored,
)
from .batching import fits, pack_notes
from .boundary import translated
from .carried import Carried, CarriedRequests
from .interrupts import mark_interrupted
from .snapshots import Snapshot, parse
from .streams import parse_acked, parse_chunk
from .writer import GroupWriter

log = logging.getLogger("trio_cluster.postgres.messages")

_COLUMNS = (
    "request_id, shard_group, shard_index, entity_type, entity_id, rpc, payload,"
    " primary_key, deliver_at_ms, meta"
)
_READ = f"{_COLUMNS}, interrupted"
"""What a read returns: the stored request and whether its caller withdrew it."""
_SNAPSHOT = (
    "SELECT snap.taken, m.* FROM (SELECT pg_current_snapshot()::text AS taken) AS snap"
    " LEFT JOIN LATERAL ({}) AS m ON true ORDER BY m.request_id"
)
"""A read of requests with its snapshot (see ``carried``): one row, all null but the
snapshot, when no request matches, so an empty read is recorded too."""


class _Meta(msgspec.Struct, array_like=True):
    headers: dict[str, str] = {}
    call_chain: tuple[str, ...] = ()


_encode_meta = msgspec.msgpack.Encoder().encode
_decode_meta = msgspec.msgpack.Decoder(_Meta).decode


def _envelope(row: tuple[Any, ...]) -> Envelope:
    """Rebuild a stored request. Its payload stays bytes: the entity decodes it,
    so an undecodable payload fails that request alone, with MalformedMessage."""
    try:
        meta = _decode_meta(row[9])
    except msgspec.MsgspecError:
        log.warning("request %s has unreadable headers; delivering without them", row[0])
        meta = _Meta()
    return Envelope(
        request_id=int(row[0]),
        shard_group=row[1],
        shard_index=int(row[2]),
        entity_type=row[3],
        entity_id=row[4],
        rpc=row[5],
        payload=row[6],
        persisted=True,
        primary_key=row[7],
        deliver_at_ms=None if row[8] is None else int(row[8]),
        headers=meta.headers,
        call_chain=meta.call_chain,
        interrupted=bool(row[10]),
    )


class _RequestRow(msgspec.Struct):
    """A request as its batch sends it (bytes travel as base64 in the JSON)."""

    i: int
    request_id: int
    shard_group: str
    shard_index: int
    entity_type: str
    entity_id: str
    rpc: str
    payload: bytes
    primary_key: str | None
    deliver_at_ms: int | None
    meta: bytes
    dedup_key: str | None
    reply_to: int
    note: str | None
    grp: int


class _ReplyRow(msgspec.Struct):
    i: int
    request_id: int
    reply: bytes
    shard_group: str
    shard_index: int
    epoch: int
    has_state: bool
    entity_type: str | None
    entity_id: str | None
    state: bytes | None
    note: str | None
    grp: int


class _PageRow(msgspec.Struct):
    k: int
    g: str
    i: int


class _FirstPage(NamedTuple):
    shard: ShardId
    limit: int


_encode_json = msgspec.json.Encoder().encode
_encode_note = msgspec.msgpack.Encoder().encode


class _RequestNote(msgspec.Struct, array_like=True):
    """What a stored request's note carries beyond its id: what ``_envelope`` rebuilds."""

    entity_type: str
    entity_id: str
    rpc: str
    payload: bytes
    primary_key: str | None
    deliver_at_ms: int | None
    meta: bytes


class _StoredNote(msgspec.Struct, array_like=True):
    origin: int
    group: str
    index: int
    request_id: int
    request: _RequestNote | None = None


_decode_stored = msgspec.msgpack.Decoder(_StoredNote).decode
_decode_replied = msgspec.msgpack.Decoder(tuple[int, int, bytes | None]).decode

_CARRIED = "C:"
_REPLIED = "R:"
"""Batch notices: the prefix, then notes separated by commas, each the base64 of a
msgpack array: ``[origin, group, index, request_id, request or absent]`` for a
stored request (absent: too large to carry), ``[origin, request_id, reply or
nil]`` for a reply (nil: too large to carry). A stored request's batch notice
has its inserting transaction's id after the prefix, then a colon:
``C:<xid>:<notes>``. Earlier versions sent ``S:<notes>``, ids only."""
_CARRIED_HEADER = len(_CARRIED) + len(str(2**64)) + 1
"""The longest prefix of a ``C:`` payload: an xid8 has at most 20 digits."""

_ANNOUNCED_TO = (
    "CASE WHEN m.watched OR m.reply_to IS NULL THEN {everyone}"
    " ELSE {callers} || m.reply_to::text END AS channel"
)
"""The channel a reply is announced on, from its request's row: the caller's own
(``reply_to``), so that no other runner wakes for it, unless a duplicate's caller
waits on it too (``watched``, see ``watch_reply``) or an earlier version stored the
request (no ``reply_to``): then every runner's. A batch answering more callers than
``_CALLERS_PER_BATCH`` is announced to every runner too."""


_CALLERS_PER_BATCH = 2
"""Most callers' channels a batch of replies is announced on. Every listener of the
database reads every notice on the server (PostgreSQL 15 filters channels there),
at about half the cost of one it is sent: past two channels, one notice on the
channel every runner hears costs the server less, and wakes the runners that are
not callers once for the whole batch."""


def reply_channel(prefix: str, machine_id: int | str) -> str:
    """The channel on which the replies to a runner's requests are announced (its
    machine id's); ``machine_id=""`` gives the prefix the statements complete."""
    return f"{prefix}r{machine_id}"


def _note(value: object) -> str:
    return base64.b64encode(_encode_note(value)).decode()


def _stored_note(origin: int, envelope: Envelope, meta: bytes) -> str:
    e = envelope
    ids = (origin, e.shard_group, e.shard_index, e.request_id)
    request = _RequestNote(
        e.entity_type, e.entity_id, e.rpc, e.payload, e.primary_key, e.deliver_at_ms, meta
    )
    note = _note(_StoredNote(*ids, request))
    return note if fits(note, _CARRIED_HEADER) else _note(_StoredNote(*ids))


def _stored(note: _StoredNote, xid: int | None, carried: list[Carried]) -> Stored:
    """The notice of one stored request; what it carries, usable with its xid, is kept."""
    request = note.request
    if request is not None and xid is not None:
        row = (note.request_id, note.group, note.index, *msgspec.structs.astuple(request), False)
        carried.append(Carried(xid, _envelope(row)))
    return Stored(ShardId(note.group, note.index), note.request_id, note.origin)


def _stored_values(
    item: _SaveRequest, meta: bytes
) -> tuple[int, str, int, str, str, str, bytes, str | None, int | None, bytes, str | None, int]:
    """What a request's row stores: ``_COLUMNS``, then its dedup key and ``reply_to``."""
    e = item.envelope
    return (
        e.request_id,
        e.shard_group,
        e.shard_index,
        e.entity_type,
        e.entity_id,
        e.rpc,
        e.payload,
        e.primary_key,
        e.deliver_at_ms,
        meta,
        e.dedup_key,
        item.origin,
    )


def _reply_note(origin: int, request_id: int, reply: bytes) -> str:
    note = _note((origin, request_id, reply))
    return note if fits(note, len(_REPLIED)) else _note((origin, request_id, None))


def _parse_notice(payload: str) -> tuple[list[Notice], list[Carried]]:
    """The notices of a batch notice (``C:``, ``R:``), a membership notice (``m:``), a
    persisted stream's chunk or ack (``c:``, ``a:``, see ``streams``), or one of the
    single-row notices (``i:`` for an interrupt; ``S:``, ``s:``, ``r:`` of earlier
    versions, as a rolling upgrade still sends them); and the requests they carry."""
    kind, _, rest = payload.partition(":")
    carried: list[Carried] = []
    try:
        if kind in ("C", "S"):
            xid_text, _, notes = rest.partition(":") if kind == "C" else ("", "", rest)
            xid = int(xid_text) if xid_text else None
            stored: list[Notice] = [
                _stored(_decode_stored(base64.b64decode(note)), xid, carried)
                for note in notes.split(",")
            ]
            return stored, carried
        if kind == "R":
            replied: list[Notice] = []
            for note in rest.split(","):
                origin, request_id, reply = _decode_replied(base64.b64decode(note))
                replied.append(Replied(request_id, origin, reply))
            return replied, carried
        if kind == "m":
            return [MembershipChanged()], carried
        if kind == "c":
            return [parse_chunk(rest)], carried
        if kind == "a":
            return [parse_acked(rest)], carried
        if kind == "r":
            origin_text, request_text = rest.split(":")
            return [Replied(int(request_text), int(origin_text))], carried
        if kind in ("s", "i"):
            origin_text, group, index_text, request_text = rest.split(":")
            notice = Stored if kind == "s" else InterruptStored
            shard = ShardId(group, int(index_text))
            return [notice(shard, int(request_text), int(origin_text))], carried
    except (ValueError, msgspec.MsgspecError):
        pass
    log.warning("ignoring unknown notification %r", payload[:200])
    return [], []


def never_owned(shard: ShardId) -> bool:
    """No lease session: no shard is provably owned."""
    return False


def _snapshot(text: str) -> Snapshot | None:
    try:
        return parse(text)
    except ValueError:
        log.warning("unreadable snapshot %r; reading carried requests back", text[:200])
        return None


class _SaveRequest(NamedTuple):
    envelope: Envelope
    origin: int
    announce: bool


class _SaveReply(NamedTuple):
    request_id: int
    reply: bytes
    lease: Lease
    state: StateWrite | None


def _reply_keys(item: _SaveReply) -> tuple[object, ...]:
    """One write per request and per entity state in a batch (see ``batching``)."""
    if item.state is None:
        return (item.request_id,)
    return (item.request_id, (item.state.entity_type, item.state.entity_id))


class PgMessageStorage:
    """Persisted messages; ``writing`` must be open (it runs the group-commit writers)."""

    def __init__(self, pool: Pool, prefix: str) -> None:
        self._pool = pool
        self._prefix = prefix
        self.channel = f"{prefix}events"
        self._reply_channels = reply_channel(prefix, "")
        self.requests: GroupWriter[_SaveRequest, Saved] = GroupWriter(
            "store requests", self._write_requests
        )
        self.replies: GroupWriter[_SaveReply, None] = GroupWriter(
            "store replies", self._write_replies, keys=_reply_keys
        )
        self.first_pages: GroupWriter[_FirstPage, list[Envelope]] = GroupWriter(
            "read shards' requests", self._read_first_pages, max_batch=500
        )
        """A shard's first read (its redelivery scan's first page) is batched with the
        other shards': a runner taking over hundreds of shards reads them in a few
        statements."""
        self.carried = CarriedRequests()
        self.owned: Callable[[ShardId], bool] = never_owned
        """Whether a shard's lease is provably still this runner's (its session's
        ``surely_holds``): a stale owner uses no carried request."""
        self.reads = 0
        """Reads of requests made (a figure for tests and benchmarks)."""
        p = prefix
        self._insert_sql = (
            "WITH input AS (SELECT * FROM json_to_recordset($1::json) AS t(i int,"
            " request_id int8, shard_group text, shard_index int, entity_type text,"
            " entity_id text, rpc text, payload text, primary_key text, deliver_at_ms int8,"
            " meta text, dedup_key text, reply_to int, note text, grp int)),"
            f" ins AS (INSERT INTO {p}messages ({_COLUMNS}, dedup_key, reply_to)"
            " SELECT request_id, shard_group, shard_index, entity_type, entity_id, rpc,"
            " decode(payload, 'base64'), primary_key, deliver_at_ms, decode(meta, 'base64'),"
            " dedup_key, reply_to FROM input ORDER BY i"
            " ON CONFLICT (dedup_key) DO NOTHING RETURNING request_id),"
            f" sent AS (SELECT pg_notify($2, '{_CARRIED}' || pg_current_xact_id()::text || ':'"
            " || string_agg(input.note, ','"
            " ORDER BY input.i)) FROM input JOIN ins USING (request_id) WHERE input.grp >= 0"
            " GROUP BY input.grp)"
            " SELECT request_id, (SELECT count(*) FROM sent) FROM ins"
        )
        self._reply_sql = (
            "WITH input AS (SELECT * FROM json_to_recordset($1::json) AS t(i int,"
            " request_id int8, reply text, shard_group text, shard_index int, epoch int8,"
            " has_state bool, entity_type text, entity_id text, state text, note text,"
            " grp int)),"
            # The fence: each shard's row share-locked once per batch, so a new owner's
            # epoch bump waits for this commit, and a stale epoch matches no row.
            f" lease AS (SELECT s.shard_group, s.shard_index, s.epoch FROM {p}shards AS s"
            " WHERE (s.shard_group, s.shard_index, s.epoch) IN"
            " (SELECT shard_group, shard_index, epoch FROM input)"
            " ORDER BY s.shard_group, s.shard_index FOR SHARE),"
            " ok AS (SELECT input.* FROM input JOIN lease USING (shard_group, shard_index,"
            " epoch)),"
            f" done AS (UPDATE {p}messages AS m SET processed = true,"
            " reply = decode(ok.reply, 'base64'), replied_at = now() FROM ok"
            " WHERE m.request_id = ok.request_id AND NOT m.processed"
            f" RETURNING m.request_id, {_ANNOUNCED_TO.format(everyone='$2', callers='$3')}),"
            # A request's state is written exactly when its reply is (``done``).
            " changed AS (SELECT ok.* FROM ok JOIN done USING (request_id)"
            " WHERE ok.has_state),"
            f" state_up AS (INSERT INTO {p}states"
            " (entity_type, entity_id, shard_group, shard_index, data)"
            " SELECT entity_type, entity_id, shard_group, shard_index,"
            " decode(state, 'base64') FROM changed WHERE state IS NOT NULL"
            " ON CONFLICT (entity_type, entity_id) DO UPDATE SET data = excluded.data,"
            f" version = {p}states.version + 1, saved_at = now() RETURNING 1),"
            f" state_del AS (DELETE FROM {p}states AS s USING changed AS c"
            " WHERE s.entity_type = c.entity_type AND s.entity_id = c.entity_id"
            " AND c.state IS NULL RETURNING 1),"
            # To its callers' channels, unless more than _CALLERS_PER_BATCH: then one
            # notice for everyone costs the server less (see ``_ANNOUNCED_TO``).
            " routed AS (SELECT CASE WHEN (SELECT count(DISTINCT channel) FROM done)"
            f" > {_CALLERS_PER_BATCH} THEN $2 ELSE done.channel END AS channel, ok.i, ok.note,"
            " ok.grp FROM ok JOIN done USING (request_id) WHERE ok.grp >= 0),"
            f" sent AS (SELECT pg_notify(channel, '{_REPLIED}' || string_agg(note, ','"
            " ORDER BY i)) FROM routed GROUP BY channel, grp)"
            " SELECT shard_group, shard_index, epoch, (SELECT count(*) FROM sent) FROM lease"
        )
        self._insert_one_sql = (
            f"WITH ins AS (INSERT INTO {p}messages ({_COLUMNS}, dedup_key, reply_to) VALUES"
            " ($1::int8, $2::text, $3::int4, $4::text, $5::text, $6::text, $7::bytea, $8::text,"
            " $9::int8, $10::bytea, $11::text, $12::int4) ON CONFLICT (dedup_key) DO NOTHING"
            " RETURNING request_id),"
            f" sent AS (SELECT pg_notify($13, '{_CARRIED}' || pg_current_xact_id()::text || ':'"
            " || $14::text) FROM ins WHERE $14::text IS NOT NULL)"
            " SELECT request_id, (SELECT count(*) FROM sent) FROM ins"
        )
        """``_insert_sql`` for one request, its values as parameters."""
        self._reply_one_sql = (
            f"WITH lease AS (SELECT epoch FROM {p}shards WHERE shard_group = $2::text"
            " AND shard_index = $3::int4 AND epoch = $4::int8 FOR SHARE),"
            f" done AS (UPDATE {p}messages AS m SET processed = true, reply = $5::bytea,"
            " replied_at = now() WHERE request_id = $1::int8 AND NOT processed"
            " AND EXISTS (SELECT FROM lease)"
            f" RETURNING request_id, {_ANNOUNCED_TO.format(everyone='$10', callers='$12')}),"
            f" state_up AS (INSERT INTO {p}states"
            " (entity_type, entity_id, shard_group, shard_index, data)"
            " SELECT $7::text, $8::text, $2::text, $3::int4, $9::bytea FROM done"
            " WHERE $6::bool AND $9::bytea IS NOT NULL"
            " ON CONFLICT (entity_type, entity_id) DO UPDATE SET data = excluded.data,"
            f" version = {p}states.version + 1, saved_at = now() RETURNING 1),"
            f" state_del AS (DELETE FROM {p}states WHERE $6::bool AND $9::bytea IS NULL"
            " AND entity_type = $7::text AND entity_id = $8::text"
            " AND EXISTS (SELECT FROM done) RETURNING 1),"
            f" sent AS (SELECT pg_notify(channel, '{_REPLIED}' || $11::text) FROM done)"
            " SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM sent)"
        )
        """``_reply_sql`` for one reply, its values as parameters: the same fence (the
        shard's row share-locked, a stale epoch matching nothing), the same state write,
        the same channel."""
        self._first_pages_sql = (
            "SELECT snap.taken, w.k, m.* FROM (SELECT pg_current_snapshot()::text AS taken)"
            " AS snap CROSS JOIN json_to_recordset($1::json) AS w(k int, g text, i int)"
            f" LEFT JOIN LATERAL (SELECT {_READ} FROM {p}messages WHERE shard_group = w.g"
            " AND shard_index = w.i AND NOT processed ORDER BY request_id LIMIT $2) AS m"
            " ON true ORDER BY w.k, m.request_id"
        )

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Run the group-commit writers (one of each kind) for the block."""
        async with (
            self.requests.running(),
            self.replies.running(),
            self.first_pages.running(),
        ):
            yield

    async def save_request(self, envelope: Envelope, origin: int, *, announce: bool) -> Saved:
        return await self.requests.submit(_SaveRequest(envelope, origin, announce))

    async def save_reply(
        self, request_id: int, reply: bytes, lease: Lease, state: StateWrite | None = None
    ) -> None:
        await self.replies.submit(_SaveReply(request_id, reply, lease, state))

    async def _write_requests(self, items: list[_SaveRequest]) -> list[Saved | ClusterError]:
        """One INSERT for the batch, skipping stored dedup keys, one NOTIFY per payload."""
        metas = [_encode_meta(_Meta(i.envelope.headers, i.envelope.call_chain)) for i in items]
        notes = [
            _stored_note(item.origin, item.envelope, meta) if item.announce else None
            for item, meta in zip(items, metas, strict=True)
        ]
        if len(items) == 1:
            inserted = await self._insert_one(items[0], metas[0], notes[0])
        else:
            inserted = await self._insert_batch(items, metas, notes)
        return await self._saved(items, inserted)

    async def _insert_one(self, item: _SaveRequest, meta: bytes, note: str | None) -> set[int]:
        params: list[Param] = [*_stored_values(item, meta), self.channel, note]
        rows = await self._pool.fetch(self._insert_one_sql, params, prepare=True)
        return {int(row[0]) for row in rows}

    async def _insert_batch(
        self, items: list[_SaveRequest], metas: list[bytes], notes: list[str | None]
    ) -> set[int]:
        groups = pack_notes(notes, _CARRIED_HEADER)
        rows = [
            _RequestRow(i, *_stored_values(item, meta), note, group)
            for i, (item, meta, note, group) in enumerate(
                zip(items, metas, notes, groups, strict=True)
            )
        ]
        return {
            int(row[0])
            for row in await self._pool.fetch(
                self._insert_sql, [_encode_json(rows).decode(), self.channel], prepare=True
            )
        }

    async def _saved(
        self, items: list[_SaveRequest], inserted: set[int]
    ) -> list[Saved | ClusterError]:
        """Each item's outcome: stored, or the original its dedup key found."""
        outcomes: list[Saved | ClusterError] = []
        originals: dict[str, int] = {}
        missing: list[str] = []
        for item in items:
            e = item.envelope
            if e.request_id in inserted:
                if e.dedup_key is not None:
                    originals.setdefault(e.dedup_key, e.request_id)
            elif e.dedup_key is not None and e.dedup_key not in originals:
                missing.append(e.dedup_key)
        stored: dict[str, tuple[int, bytes | None]] = {}
        if missing:
            for key, request_id, reply in await self._pool.fetch(
                f"SELECT dedup_key, request_id, reply FROM {self._prefix}messages"
                " WHERE dedup_key IN (SELECT json_array_elements_text($1::json))",
                [_encode_json(missing).decode()],
                prepare=True,
            ):
                stored[key] = (int(request_id), None if reply is None else bytes(reply))
        for item in items:
            e = item.envelope
            key = e.dedup_key
            if e.request_id in inserted:
                outcomes.append(Saved(e.request_id))
            elif key is not None and key in originals:
                outcomes.append(Saved(originals[key], duplicate=True))
            elif key is not None and key in stored:
                original, reply = stored[key]
                outcomes.append(Saved(original, duplicate=True, reply=reply))
            else:
                outcomes.append(
                    PersistenceError(f"request with key {key!r} vanished while storing")
                )
        return outcomes

    async def _write_replies(self, items: list[_SaveReply]) -> list[ClusterError | None]:
        """One fenced UPDATE for the batch, each row checked against its shard's epoch."""
        notes: list[str | None] = [
            _reply_note(item.lease.machine_id, item.request_id, item.reply) for item in items
        ]
        if len(items) == 1:
            current = await self._reply_one(items[0], notes[0])
        else:
            current = await self._reply_batch(items, notes)
        outcomes: list[ClusterError | None] = []
        for item in items:
            lease = item.lease
            if (lease.shard.group, lease.shard.index, lease.epoch) in current:
                outcomes.append(None)
            else:
                outcomes.append(
                    EntityNotAssignedToRunner(
                        f"lease epoch {lease.epoch} of shard {lease.shard} is stale",
                        request_id=item.request_id,
                    )
                )
        return outcomes

    async def _reply_one(self, item: _SaveReply, note: str | None) -> set[tuple[str, int, int]]:
        """The lease of the item, if current (its reply then written and announced)."""
        lease, state = item.lease, item.state
        params: list[Param] = [
            item.request_id,
            lease.shard.group,
            lease.shard.index,
            lease.epoch,
            item.reply,
            state is not None,
            None if state is None else state.entity_type,
            None if state is None else state.entity_id,
            None if state is None else state.data,
            self.channel,
            note,
            self._reply_channels,
        ]
        row = await self._pool.fetchrow(self._reply_one_sql, params, prepare=True)
        current = row is not None and int(row[0]) > 0
        return {(lease.shard.group, lease.shard.index, lease.epoch)} if current else set()

    async def _reply_batch(
        self, items: list[_SaveReply], notes: list[str | None]
    ) -> set[tuple[str, int, int]]:
        """The leases of the batch that are current (their replies written, announced)."""
        groups = pack_notes(notes, len(_REPLIED))
        rows = [
            _ReplyRow(
                i,
                item.request_id,
                item.reply,
                item.lease.shard.group,
                item.lease.shard.index,
                item.lease.epoch,
                item.state is not None,
                None if item.state is None else item.state.entity_type,
                None if item.state is None else item.state.entity_id,
                None if item.state is None else item.state.data,
                note,
                group,
            )
            for i, (item, note, group) in enumerate(zip(items, notes, groups, strict=True))
        ]
        return {
            (group, int(index), int(epoch))
            for group, index, epoch, _ in await self._pool.fetch(
                self._reply_sql,
                [_encode_json(rows).decode(), self.channel, self._reply_channels],
                prepare=True,
            )
        }

    async def purge(self, lease: Lease, window: float, limit: int) -> int:
        """Delete up to *limit* of the shard's processed requests replied over *window* s ago.

        Only the shard's owner calls this (see `trio_cluster.storage.retention`),
        and the window is measured on the server's clock, the one that stamped
        ``replied_at``.
        """
        p = self._prefix
        with translated("purge processed requests of %s", lease.shard):
            return await self._pool.execute(
                f"DELETE FROM {p}messages WHERE request_id IN (SELECT request_id"
                f" FROM {p}messages WHERE shard_group = $1 AND shard_index = $2 AND processed"
                " AND replied_at <= now() - make_interval(secs => $3) ORDER BY replied_at"
                " LIMIT $4)",
                [lease.shard.group, lease.shard.index, float(window), limit],
                prepare=True,
            )

    async def interrupt(self, request_id: int, origin: int) -> bool:
        return await mark_interrupted(self._pool, self._prefix, self.channel, request_id, origin)

    async def watch_reply(self, request_id: int) -> bytes | None:
        """The reply to another runner's request, and its notice from now on heard by
        every runner: it goes to the caller's channel (see ``_ANNOUNCED_TO``) unless the
        row is marked ``watched``. The mark and the reply's UPDATE take the row's lock
        in turn: a reply written first is returned here, one written after sees the
        mark."""
        with translated("watch reply to %s", request_id):
            reply = await self._pool.fetchval(
                f"UPDATE {self._prefix}messages SET watched = true WHERE request_id = $1"
                " RETURNING reply",
                [request_id],
                prepare=True,
            )
        return None if reply is None else bytes(reply)

    async def reply_for(self, request_id: int) -> bytes | None:
        with translated("read reply to %s", request_id):
            reply = await self._pool.fetchval(
                f"SELECT reply FROM {self._prefix}messages WHERE request_id = $1",
                [request_id],
                prepare=True,
            )
        return None if reply is None else bytes(reply)

    async def unprocessed(
        self,
        shard: ShardId,
        *,
        entity: tuple[str, str] | None = None,
        after: int = 0,
        due_by: int | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        if entity is None and not after and due_by is None:
            return await self.first_pages.submit(_FirstPage(shard, limit))
        sql = (
            f"SELECT {_READ} FROM {self._prefix}messages WHERE shard_group = $1"
            " AND shard_index = $2 AND NOT processed AND request_id > $3"
            " AND ($4::int8 IS NULL OR deliver_at_ms IS NULL OR deliver_at_ms <= $4::int8)"
        )
        params: list[Any] = [shard.group, shard.index, after, due_by]
        if entity is not None:
            sql += " AND entity_type = $6 AND entity_id = $7"
            params += [limit, *entity]
        else:
            params.append(limit)
        sql += " ORDER BY request_id LIMIT $5"
        return await self._read(sql, params, shard)

    async def _read_first_pages(
        self, items: list[_FirstPage]
    ) -> list[list[Envelope] | ClusterError]:
        """Each shard's oldest unprocessed requests, in one statement and one snapshot,
        recorded for each shard as its own read would be (see ``_read``)."""
        wanted = [_PageRow(k, item.shard.group, item.shard.index) for k, item in enumerate(items)]
        rows = await self._pool.fetch(
            self._first_pages_sql,
            [_encode_json(wanted).decode(), max(item.limit for item in items)],
            prepare=True,
        )
        pages: list[list[Envelope]] = [[] for _ in items]
        for row in rows:
            if row[2] is not None:
                pages[row[1]].append(_envelope(row[2:]))
        snapshot = _snapshot(rows[0][0])
        for item in items:
            self.reads += 1
            self.carried.saw(item.shard, snapshot)
        return [page[: item.limit] for page, item in zip(pages, items, strict=True)]

    async def fetch(self, shard: ShardId, request_ids: Sequence[int]) -> list[Envelope]:
        """What notices carried and no read of the shard saw, with no read (see
        ``carried``); the rest read, ``NOT processed``, as before notices carried any."""
        found, rest = self.carried.take(shard, request_ids, owned=self.owned(shard))
        if not rest:
            return found
        ids = "{" + ",".join(str(int(i)) for i in rest) + "}"
        found += await self._read(
            f"SELECT {_READ} FROM {self._prefix}messages WHERE request_id = ANY($1::int8[])"
            " AND shard_group = $2 AND shard_index = $3 AND NOT processed"
            " ORDER BY request_id",
            [ids, shard.group, shard.index],
            shard,
        )
        return sorted(found, key=lambda e: e.request_id)

    async def _read(self, sql: str, params: Sequence[Any], shard: ShardId) -> list[Envelope]:
        """Read requests, recording the read's snapshot for the fence (see ``carried``)."""
        with translated("read requests of %s", shard):
            rows = await self._pool.fetch(_SNAPSHOT.format(sql), params, prepare=True)
        self.reads += 1
        self.carried.saw(shard, _snapshot(rows[0][0]))
        return [_envelope(row[1:]) for row in rows if row[1] is not None]

    def parse_notification(self, payload: str) -> list[Notice]:
        """The notices of one notification, keeping the requests it carries for
        ``fetch`` (the lease session delivers notifications; see ``leases``)."""
        notices, carried = _parse_notice(payload)
        for request in carried:
            self.carried.keep(request)
        return notices
