"""What a database failure means: the data's fault (:func:`is_data_fault`, and the
:func:`rejection_for` the event it names), or one of the transient faults of
:mod:`worker.errors` (:func:`classify`), which the one retry policy (:mod:`worker.retry`)
retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

import asyncpg

from worker import events as ev
from worker.errors import (
    DatabaseConflict,
    DatabaseError,
    DatabaseUnavailable,
    Rejection,
    TransientError,
)

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


class Unencodable(Exception):
    """asyncpg could not encode a value of the batch (``__cause__``): the data's fault."""


@contextlib.contextmanager
def sending_values() -> Iterator[None]:
    """Around a statement that sends the batch's values: what asyncpg raises while
    encoding them (an ``OverflowError`` for a timestamp beyond year 9999 in UTC inside
    COPY, the ``DataError`` it makes of one in a statement's arguments) is the data's
    fault (:class:`Unencodable`), bisected like PostgreSQL's own refusals."""
    try:
        yield
    except (OverflowError, ValueError, TypeError) as exc:
        raise Unencodable(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        cause = exc.__cause__
        if getattr(exc, "severity", None) is None and cause is not None:  # never sent
            raise Unencodable(f"{type(cause).__name__}: {cause}") from exc
        raise


def is_data_fault(exc: BaseException) -> bool:
    """Some event of the batch is at fault: PostgreSQL refused its data, or asyncpg could
    not encode it."""
    return isinstance(exc, Unencodable) or is_data_error(exc)


def rejection_for(exc: BaseException) -> Rejection:
    """The rejection of the one event whose data caused ``exc`` (a data fault)."""
    if isinstance(exc, Unencodable):
        # The exception's type and message (a reason such as "date value out of range"),
        # never asyncpg's own message, which quotes the start of the value.
        return Rejection(
            ev.UNSTORABLE_CONTENT,
            f"a value of the event cannot be sent to PostgreSQL ({exc})"[:300],
        )
    state = getattr(exc, "sqlstate", None)
    if state == "23503":  # foreign_key_violation: the template went away under us
        return Rejection(ev.UNKNOWN_TEMPLATE, '"template_id" no longer exists')
    # The message only (never DETAIL, which may quote the payload).
    return Rejection(ev.UNSTORABLE_CONTENT, f"PostgreSQL refused the event [{state}]: {exc}")
