"""What a database failure means: the data's fault (:func:`is_data_error`), or one of the
transient faults of :mod:`worker.errors` (:func:`classify`), which the one retry policy
(:mod:`worker.retry`) retries."""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg

from worker.errors import DatabaseConflict, DatabaseError, DatabaseUnavailable, TransientError

_UNAVAILABLE_STATES: Final = frozenset(
    {"57P01", "57P02", "57P03", "57P04", "57P05", "53300", "53100", "53200", "53400", "0A000"}
)
_CONFLICT_STATES: Final = frozenset({"40001", "40P01", "55P03", "57014", "55006"})
_DATA_CLASSES: Final = frozenset({"22", "23", "54"})
# Failures of the connection itself rather than of a statement.
_INFRASTRUCTURE: Final = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def is_data_error(exc: BaseException) -> bool:
    """The database refused the *data* (SQLSTATE class 22, 23 or 54): some event is at fault."""
    state = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, asyncpg.PostgresError)
        and isinstance(state, str)
        and state[:2] in _DATA_CLASSES
    )


def classify(exc: BaseException) -> TransientError:
    """Map a failure that is not the data's fault onto the transient branch of the tree.

    Connection loss, refusal and timeouts, server shutdown or startup, too many connections,
    resource exhaustion and a cached plan invalidated by a migration are
    :class:`DatabaseUnavailable`; deadlocks, serialization failures, lock and statement
    timeouts are :class:`DatabaseConflict`; anything else from PostgreSQL (a missing table or
    privilege) is :class:`DatabaseError`, retried like the others but logged as an error.
    """
    if isinstance(exc, TransientError):
        return exc
    state = getattr(exc, "sqlstate", None)
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, asyncpg.PostgresError) and isinstance(state, str):
        if state.startswith("08") or state in _UNAVAILABLE_STATES:
            return DatabaseUnavailable(f"[{state}] {message}")
        if state in _CONFLICT_STATES or state.startswith("40"):
            return DatabaseConflict(f"[{state}] {message}")
        return DatabaseError(f"[{state}] {message}")
    if isinstance(exc, _INFRASTRUCTURE):
        return DatabaseUnavailable(message)
    return DatabaseError(message)


def is_infrastructure(exc: BaseException) -> bool:
    """A failure of the connection itself rather than of a statement."""
    return isinstance(exc, _INFRASTRUCTURE)
