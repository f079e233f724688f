"""Where driver errors become the storage protocol's errors: once, at the adapter's edge.

The runtime knows only ClusterErrors. The server or the network failing is
PersistenceError (retryable: nothing acknowledged was lost); a value the
driver cannot encode is SerializationError (trying again cannot help).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import PersistenceError, SerializationError
from .errors import PgError


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a storage operation, raising its failure as a ClusterError naming ``what``."""
    try:
        yield
    except (PgError, OSError) as error:
        raise PersistenceError(f"cannot {what}: {error}") from error
    except (ValueError, TypeError) as error:
        raise SerializationError(f"cannot {what}: {error}") from error
