"""Exceptions raised by the driver, chosen by SQLSTATE.

Callers branch on *kind* (retry a serialization failure, replace a lost connection), so
each kind that calls for a different reaction gets its own class; everything else is a
plain `PgError` carrying its SQLSTATE.
"""

from __future__ import annotations

__all__ = [
    "ConnectionLost",
    "DeadlockDetected",
    "LockNotAvailable",
    "PgError",
    "QueryCanceled",
    "SerializationFailure",
    "UniqueViolation",
    "error_class_for",
]


class PgError(Exception):
    """An error reported by the server or by the driver.

    ``sqlstate`` is the five-character code from the server, or None when the error
    did not come from the server (e.g. a network failure detected by the client).
    """

    def __init__(
        self, message: str, *, sqlstate: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail

    def __str__(self) -> str:
        text = self.message if self.sqlstate is None else f"{self.message} [{self.sqlstate}]"
        return text if self.detail is None else f"{text}\nDETAIL: {self.detail}"


class ConnectionLost(PgError):
    """The connection is gone (closed, terminated, network failure, server shutdown).

    The connection object is unusable afterwards; whether the interrupted statement
    took effect is unknown.
    """


class UniqueViolation(PgError):
    """A unique or primary-key constraint rejected a row (23505)."""


class QueryCanceled(PgError):
    """The statement was canceled by a timeout or a cancel request (57014)."""


class SerializationFailure(PgError):
    """The transaction conflicted with a concurrent one and may be retried (40001)."""


class DeadlockDetected(PgError):
    """The server broke a deadlock by aborting this transaction; it may be retried (40P01)."""


class LockNotAvailable(PgError):
    """A lock could not be taken at once (NOWAIT, lock_timeout) (55P03)."""


_BY_SQLSTATE: dict[str, type[PgError]] = {
    "23505": UniqueViolation,
    "57014": QueryCanceled,
    "40001": SerializationFailure,
    "40P01": DeadlockDetected,
    "55P03": LockNotAvailable,
    "57P01": ConnectionLost,  # admin_shutdown
    "57P02": ConnectionLost,  # crash_shutdown
    "57P03": ConnectionLost,  # cannot_connect_now
}

_BY_SQLSTATE_CLASS: dict[str, type[PgError]] = {
    "08": ConnectionLost,  # connection_exception
}


def error_class_for(sqlstate: str | None) -> type[PgError]:
    """The exception class for *sqlstate*: exact code first, then its two-letter class."""
    if sqlstate is None:
        return PgError
    return _BY_SQLSTATE.get(sqlstate) or _BY_SQLSTATE_CLASS.get(sqlstate[:2], PgError)
