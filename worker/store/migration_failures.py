"""``migrate``'s failures in one line for an operator (:func:`describe_failure`): a missing
privilege, a lock timeout, an unknown revision, an unreachable server, found in whatever
Alembic and SQLAlchemy wrapped them in; the traceback only at ``--log-level debug``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import asyncpg
from alembic.util import CommandError

from worker.security import mask_url
from worker.store import revisions


def lock_timeout_message(seconds: float) -> str:
    """What to do when a lock was not granted within ``seconds`` (0: no limit)."""
    limit = f"{seconds:g} s" if seconds else "no limit"
    return (
        f"a lock was not granted within lock_timeout ({limit}): another migrate, or a long "
        "transaction on prompter's tables, holds it; run migrate again when it is done, or "
        "give it longer with --lock-timeout"
    )


_CONNECTION_FAILURES: Final = (OSError, ConnectionError, TimeoutError, asyncpg.InterfaceError)


def _causes(exc: BaseException) -> Iterable[BaseException]:
    """The exception, then what it wraps (SQLAlchemy's ``orig``, causes, contexts)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [getattr(current, "orig", None), current.__cause__, current.__context__]


def describe_failure(
    exc: BaseException, *, database_url: str, revision: str = "head", lock_timeout: float
) -> str:
    """One line for an operator: what failed, and what to do."""
    causes = list(_causes(exc))
    postgres = next((c for c in causes if isinstance(c, asyncpg.PostgresError)), None)
    if postgres is not None:
        state = getattr(postgres, "sqlstate", "") or ""
        text = str(postgres).splitlines()[0] if str(postgres) else type(postgres).__name__
        if state == "55P03":
            return lock_timeout_message(lock_timeout)
        if state == "42501":
            return (
                f"permission denied ({text}): migrate needs the role that owns prompter's "
                "tables, with CREATE on the schema (not the workers' runtime role)"
            )
        if state.startswith("08") or state in ("57P01", "57P02", "57P03", "53300"):
            return f"cannot reach PostgreSQL at {mask_url(database_url)}: {text}"
        return f"migration failed: [{state}] {text}"
    command_error = next((c for c in causes if isinstance(c, CommandError)), None)
    if command_error is not None:
        text = str(command_error).splitlines()[0]
        match = re.search(r"Can't locate revision identified by '([^']*)'", text)
        if match and match.group(1) != revision:
            return (
                f"the database records revision {match.group(1)}, which this prompter-worker "
                f"does not know (its newest is {revisions.HEAD}): a newer release migrated it; "
                "migrate with that release, or check PROMPTER_VERSION_TABLE"
            )
        if match:
            return f"no revision {revision!r} in prompter's history (see `alembic history`)"
        return f"migration failed: {text}"
    connection = next((c for c in causes if isinstance(c, _CONNECTION_FAILURES)), None)
    if connection is not None:
        return f"cannot reach PostgreSQL at {mask_url(database_url)}: {connection}"
    return f"migration failed: {type(exc).__name__}: {exc}"
