"""Conversion between Python values and PostgreSQL wire values.

Parameters go out in text format (binary only for bytes) with a type OID when the
Python type pins one down, and OID 0 ("unknown") for ``str`` so that the server infers
the type from context: a ``str`` can feed a jsonb, uuid or timestamptz column directly.
An ``int`` is typed int4 when it fits (int8, then numeric, when it does not), so
arithmetic on parameters that may outgrow int4 needs a cast (``$1::int8 * $2``).

Results come back in text format and are decoded by column type OID. Text keeps every
other type readable as ``str`` instead of failing; the session is kept in DateStyle ISO
(see the connection) so that timestamps parse without guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeAlias

from psycopg.pq.abc import PGresult

__all__ = ["Param", "decode_rows", "encode_params"]

Param: TypeAlias = bool | int | float | str | bytes | datetime | Decimal | None
"""A value that can be sent as a query parameter."""

_OID_BOOL = 16
_OID_BYTEA = 17
_OID_INT4 = 23
_OID_INT8 = 20
_OID_FLOAT8 = 701
_OID_TIMESTAMPTZ = 1184
_OID_NUMERIC = 1700
_OID_UNKNOWN = 0

_TEXT = 0
_BINARY = 1

_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1
_INT8_MIN, _INT8_MAX = -(2**63), 2**63 - 1

EncodedParams: TypeAlias = tuple[list[bytes | None], list[int], list[int] | None]


def encode_params(params: Sequence[Param]) -> EncodedParams:
    """Values, type OIDs and formats for ``PQsendQueryParams``."""
    values: list[bytes | None] = []
    oids: list[int] = []
    formats: list[int] | None = None
    for index, param in enumerate(params):
        value, oid, fmt = _encode(param, index)
        values.append(value)
        oids.append(oid)
        if fmt != _TEXT and formats is None:
            formats = [_TEXT] * index
        if formats is not None:
            formats.append(fmt)
    return values, oids, formats


def _encode(param: Param, index: int) -> tuple[bytes | None, int, int]:
    # Order matters: bool is an int subclass.
    if param is None:
        return None, _OID_UNKNOWN, _TEXT
    if isinstance(param, str):
        if "\x00" in param:
            # libpq sends text parameters as C strings: a NUL would silently truncate.
            raise ValueError(f"parameter ${index + 1}: PostgreSQL text cannot contain NUL")
        return param.encode(), _OID_UNKNOWN, _TEXT
    if isinstance(param, bool):
        return (b"t" if param else b"f"), _OID_BOOL, _TEXT
    if isinstance(param, int):
        # The narrowest type that holds the value: int4 widens implicitly to int8,
        # numeric and float8, while int8 never narrows implicitly (f(int4) would fail).
        if _INT4_MIN <= param <= _INT4_MAX:
            oid = _OID_INT4
        elif _INT8_MIN <= param <= _INT8_MAX:
            oid = _OID_INT8
        else:
            oid = _OID_NUMERIC
        return str(param).encode(), oid, _TEXT
    if isinstance(param, float):
        return repr(param).encode(), _OID_FLOAT8, _TEXT
    if isinstance(param, bytes):
        return param, _OID_BYTEA, _BINARY
    if isinstance(param, datetime):
        if param.tzinfo is None:
            raise TypeError(f"parameter ${index + 1}: naive datetime is ambiguous; add a tzinfo")
        return param.isoformat().encode(), _OID_TIMESTAMPTZ, _TEXT
    if isinstance(param, Decimal):
        return str(param).encode(), _OID_NUMERIC, _TEXT
    raise TypeError(f"parameter ${index + 1}: unsupported type {type(param).__name__}")


def _text(value: bytes) -> str:
    return value.decode()


def _bool(value: bytes) -> bool:
    return value == b"t"


def _bytea(value: bytes) -> bytes:
    if not value.startswith(b"\\x"):
        raise ValueError("bytea value is not in hex format (is bytea_output changed?)")
    return bytes.fromhex(value[2:].decode())


def _timestamptz(value: bytes) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.decode())
    except ValueError:
        # infinity, BC dates and years past 9999 have no datetime equivalent.
        raise ValueError(f"timestamptz {value.decode()!r} has no Python datetime") from None
    if parsed.tzinfo is None:
        raise ValueError(f"timestamptz {value.decode()!r} has no UTC offset")
    return parsed.astimezone(UTC)


def _numeric(value: bytes) -> Decimal:
    return Decimal(value.decode())


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    16: _bool,  # bool
    17: _bytea,  # bytea
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    26: int,  # oid
    700: float,  # float4
    701: float,  # float8
    1184: _timestamptz,  # timestamptz
    1700: _numeric,  # numeric
    # text, varchar, name, bpchar, unknown, json, jsonb and everything else: str
}


def decode_rows(result: PGresult) -> list[tuple[Any, ...]]:
    """All rows of *result* as tuples of Python values."""
    ncols = result.nfields
    if ncols == 0:
        return []
    decoders = [_DECODERS.get(result.ftype(col), _text) for col in range(ncols)]
    columns = list(enumerate(decoders))
    get = result.get_value
    rows: list[tuple[Any, ...]] = []
    for row in range(result.ntuples):
        values = []
        for col, decode in columns:
            raw = get(row, col)
            values.append(None if raw is None else decode(raw))
        rows.append(tuple(values))
    return rows
