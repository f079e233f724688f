"""Which statements a connection has prepared on its server: a bounded LRU of names.

An unnamed statement is parsed and planned again on every call; a hot statement
prepared once per connection is only bound and executed. The cache is bounded, so a
caller that builds many distinct texts cannot make the server hold a plan for each:
the least recently used names are handed back for DEALLOCATE.

Pure bookkeeping, no I/O: the connection sends PREPARE, EXECUTE and DEALLOCATE and
tells the cache what happened. A key is the statement text *with* its parameter type
OIDs, because a prepared statement's parameter types are fixed when it is prepared
(an int4 ``$1`` would refuse a later int8 value the unnamed path accepts).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

__all__ = ["DEFAULT_CAPACITY", "StatementCache", "StatementKey"]

DEFAULT_CAPACITY: Final = 256

StatementKey = tuple[bytes, tuple[int, ...]]
"""The statement's text and its parameters' type OIDs."""


class StatementCache:
    """Names of prepared statements by key, most recently used last."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("statement cache capacity must be at least 1")
        self._capacity = capacity
        self._names: OrderedDict[StatementKey, bytes] = OrderedDict()
        self._retired: list[bytes] = []
        self._serial = 0

    def __len__(self) -> int:
        return len(self._names)

    def get(self, key: StatementKey) -> bytes | None:
        """The name *key* is prepared under, marked as just used; None if it is not."""
        name = self._names.get(key)
        if name is not None:
            self._names.move_to_end(key)
        return name

    def new_name(self) -> bytes:
        """A name no statement of this cache has had, to prepare the next one under.

        Names are never reused, so a name whose DEALLOCATE is still pending (or was
        lost with a cancelled statement) can never be confused with a newer one.
        """
        self._serial += 1
        return b"tc_%d" % self._serial

    def add(self, key: StatementKey, name: bytes) -> None:
        """*key* is now prepared under *name*; evicts the least recently used past capacity."""
        self.discard(key)
        self._names[key] = name
        while len(self._names) > self._capacity:
            _, evicted = self._names.popitem(last=False)
            self._retired.append(evicted)

    def discard(self, key: StatementKey, *, deallocate: bool = True) -> None:
        """Forget *key* (its plan is stale, or gone from the server: not *deallocate*)."""
        name = self._names.pop(key, None)
        if name is not None and deallocate:
            self._retired.append(name)

    def take_retired(self) -> list[bytes]:
        """Names to DEALLOCATE on the server; the caller now owns them."""
        retired, self._retired = self._retired, []
        return retired
