"""Where driver errors become the storage protocol's errors: once, at the adapter's edge.

The runtime knows only ClusterErrors. The server or the network failing is
PersistenceError (retryable: nothing acknowledged was lost); a value the
driver cannot encode is SerializationError (trying again cannot help).
"""

from __future__ import annotations

from types import TracebackType

from ..errors import PersistenceError, SerializationError
from ..pgdriver.errors import PgError


class translated:  # noqa: N801 - used like a function: ``with translated(...)``
    """Run a storage operation, raising its failure as a ClusterError naming it.

    A class rather than a generator-based context manager, and the message
    formatted only on failure: this wraps every statement of the persisted path.
    """

    __slots__ = ("_args", "_what")

    def __init__(self, what: str, *args: object) -> None:
        self._what = what
        self._args = args

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            return
        what = self._what % self._args if self._args else self._what
        if isinstance(error, PgError | OSError):
            raise PersistenceError(f"cannot {what}: {error}") from error
        if isinstance(error, ValueError | TypeError):
            raise SerializationError(f"cannot {what}: {error}") from error
