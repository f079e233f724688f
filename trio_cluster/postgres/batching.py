"""How group commit cuts what is queued into batches, and their notices into payloads.

Pure decisions, apart from the writer that acts on them (see ``writer``):

- a batch holds at most one write per key (a request id, an entity's state):
  two writes of one row in one statement would have the server pick one at
  random (``UPDATE ... FROM``) or refuse the statement (``ON CONFLICT DO
  UPDATE`` touching a row twice), so a repeated key waits for the next batch,
  and order within a key is kept;
- a batch's notices are packed into as few ``pg_notify`` payloads as fit the
  server's limit (8000 bytes): usually one per batch; an item too large for any
  payload is announced by a smaller stand-in (its id only), and the receiver
  reads the row back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

NOTIFY_LIMIT = 7999
"""Bytes in one NOTIFY payload: the server refuses 8000 or more."""


def split_conflicts(items: Sequence[T], keys: Callable[[T], Sequence[Hashable]]) -> list[list[T]]:
    """Cut ``items`` into consecutive-order batches in which no key occurs twice.

    An item goes into the first batch after the last one holding any of its keys,
    so items sharing a key keep their order, and items without conflicts all go
    into the first batch.
    """
    batches: list[list[T]] = []
    seen: list[set[Hashable]] = []
    last: dict[Hashable, int] = {}
    for item in items:
        item_keys = keys(item)
        index = max((last[key] + 1 for key in item_keys if key in last), default=0)
        if index == len(batches):
            batches.append([])
            seen.append(set())
        batches[index].append(item)
        for key in item_keys:
            seen[index].add(key)
            last[key] = index
    return batches


def pack_notes(notes: Sequence[str | None], header: int, limit: int = NOTIFY_LIMIT) -> list[int]:
    """A payload number for each note (-1: none), so each payload fits ``limit`` bytes.

    A payload is a ``header``-byte prefix then its notes joined by one separator
    byte. Notes are ASCII (their length is their size) and must each fit alone;
    the caller replaces a note that does not (see ``fits``). Notes are packed in
    order, a new payload begun when the next note would overflow the current one.
    """
    groups: list[int] = []
    group = -1
    used = limit + 1  # forces a first payload
    for note in notes:
        if note is None:
            groups.append(-1)
            continue
        size = len(note) + (1 if used > header else 0)
        if used + size > limit:
            group += 1
            used = header
            size = len(note)
        used += size
        groups.append(group)
    return groups


def fits(note: str, header: int, limit: int = NOTIFY_LIMIT) -> bool:
    """Whether ``note`` fits in a payload of its own."""
    return header + len(note) <= limit
