"""The schema check at start: is this database's schema one this worker can run on?

``run``, ``replay --direct``, ``templates`` and ``status`` ask before they touch a table, so
a worker pointed at an unmigrated, half-migrated or too new database stops at once with
one line naming what is missing and the command that fixes it, instead of retrying every
batch forever (a missing table is a retried :class:`~worker.errors.DatabaseError`).

Two questions, both answered from what any role may read (the catalog, and the two
bookkeeping tables, which ``migrate`` makes readable to PUBLIC):

1. **Which revision of prompter's history does the database record?**
   (:mod:`~worker.store.revisions`) In prompter's own version table
   (``prompter_alembic_version``, or ``PROMPTER_VERSION_TABLE``), or in an
   application's ``alembic_version`` when the application's Alembic applies prompter's
   revisions (our branch in its ``version_locations``, or the V7 revision copied into its
   history). The head this worker was built for is current; an older one of ours is behind
   (migrate first). A revision this worker does not know is newer: it is accepted if the
   database says workers of a revision this worker knows still run on it (see
   :data:`COMPAT_TABLE`), refused otherwise. When no revision of ours is recorded
   anywhere (a schema applied by hand, or an application's history that went on after
   the copied V7 revision), only the next question decides.
2. **Does the schema hold what the worker relies on?** (:mod:`~worker.store.structure`)
   The tables, every column the commands read or write, the unique keys its ``ON
   CONFLICT`` clauses name (valid, not left INVALID by an interrupted concurrent build),
   and no ``NOT NULL`` column without a default that its inserts would leave out. Asked
   whatever the revision says.

Rolling upgrades: see :mod:`worker.store.revisions` for the compatibility rows ``migrate``
records for older workers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import asyncpg

from worker.config import Settings, asyncpg_dsn
from worker.errors import ConfigError, SchemaError
from worker.security import mask_url
from worker.store import revisions
from worker.store.classify import classify
from worker.store.revisions import (
    APPLICATION_VERSION_TABLE,
    BEHIND,
    COMPAT_TABLE,
    CURRENT,
    HEAD,
    INCOMPATIBLE,
    NEWER,
    REVISIONS,
    UNVERSIONED,
    recorded,
    version_table,
)
from worker.store.structure import TABLES, find_missing, present_tables

# What the check's callers read here (the commands, alembic/env.py, the tests), wherever
# it is defined.
__all__ = [
    "BEHIND",
    "COMPAT_TABLE",
    "CURRENT",
    "HEAD",
    "INCOMPATIBLE",
    "MISSING",
    "NEWER",
    "REVISIONS",
    "UNVERSIONED",
    "SchemaState",
    "inspect",
    "require",
    "require_database",
    "version_table",
]

log = logging.getLogger(__name__)

#: No prompter schema at all: no revision recorded, none of the tables.
MISSING: Final = "missing"
#: Current, newer (compatible) and unversioned are runnable if nothing is missing.
RUNNABLE: Final = frozenset({CURRENT, NEWER, UNVERSIONED})
MIGRATE: Final = "run `prompter-worker migrate` first"


@dataclass(frozen=True, kw_only=True)
class SchemaState:
    """What the check found. ``missing`` is what the worker relies on and the database
    lacks; ``warnings`` do not stop the worker (an INVALID secondary index, a version
    table it may not read)."""

    status: str
    revision: str | None  # prompter's revision the database records, if any
    recorded_in: str | None  # the version table that records it
    head: str  # the revision this worker is built for
    compatible_from: str | None  # newer schemas: workers of this revision run on it
    beside: tuple[str, ...]  # other revisions in that version table (an application's)
    missing: tuple[str, ...]
    invalid_indexes: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.status in RUNNABLE and not self.missing

    @property
    def fix(self) -> str:
        """The command, or the action, that makes the schema one this worker runs on."""
        if self.status == INCOMPATIBLE:
            return "upgrade prompter-worker to the release that migrated this database"
        if self.status in (MISSING, BEHIND):
            if self.beside:
                return (
                    "upgrade it with your application's Alembic first "
                    "(`alembic upgrade heads`), which applies prompter's revisions"
                )
            if self.recorded_in == APPLICATION_VERSION_TABLE:
                return (
                    f"{MIGRATE} (or `alembic upgrade head` in your application, if its "
                    "history holds prompter's revisions)"
                )
            return MIGRATE
        return "create them as the revisions do (`prompter-worker migrate --sql` prints the DDL)"

    def describe(self) -> str:
        """One line: the state, what is missing, and the fix when the worker cannot run."""
        where = f" (in {self.recorded_in})" if self.recorded_in else ""
        if self.status == MISSING:
            return f"the database has no prompter schema (no {', '.join(TABLES)}): {self.fix}"
        if self.status == CURRENT:
            head = f"schema at revision {self.revision}{where}, current"
        elif self.status == BEHIND:
            head = (
                f"schema at revision {self.revision}{where}, behind: this prompter-worker "
                f"needs {self.head}"
            )
        elif self.status == NEWER:
            head = (
                f"schema at revision {self.revision}{where}, newer than this prompter-worker "
                f"(built for {self.head}); it runs workers of {self.compatible_from} and later"
            )
        elif self.status == INCOMPATIBLE:
            runs = (
                f"runs only workers of revision {self.compatible_from} and later"
                if self.compatible_from
                else "records no compatibility with older workers"
            )
            head = (
                f"schema at revision {self.revision}{where}, newer than this prompter-worker "
                f"knows (built for {self.head}), and {runs}"
            )
        else:
            head = "no prompter revision recorded (schema applied by hand or by an application)"
        if self.missing:
            return f"{head}; missing: {', '.join(self.missing)}: {self.fix}"
        if self.status in RUNNABLE:
            return head
        return f"{head}: {self.fix}"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("beside", "missing", "invalid_indexes", "warnings"):
            out[key] = list(out[key])
        out["ok"] = self.ok
        out["message"] = self.describe()
        return out


async def inspect(
    conn: asyncpg.Connection, *, environ: Mapping[str, str] | None = None
) -> SchemaState:
    """Answer both questions on ``conn`` (any role: see the module docstring)."""
    warnings: list[str] = []
    found = await recorded(conn, version_table(environ), warnings)
    status = found.status
    present = await present_tables(conn)
    if not present and status == UNVERSIONED:
        status = MISSING
    missing, invalid = ([], []) if status == MISSING else await find_missing(conn, present)
    for name in invalid:
        warnings.append(
            f"index {name} is INVALID (an interrupted CREATE INDEX CONCURRENTLY): rebuild it "
            f"with `REINDEX INDEX CONCURRENTLY {name}`"
        )
    return SchemaState(
        status=status,
        revision=found.revision,
        recorded_in=found.recorded_in,
        head=revisions.HEAD,  # read here, not bound at import: the tests replace it
        compatible_from=found.compatible_from,
        beside=found.beside,
        missing=tuple(missing),
        invalid_indexes=tuple(invalid),
        warnings=tuple(warnings),
    )


async def require(
    conn: asyncpg.Connection,
    *,
    database_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> SchemaState:
    """:func:`inspect`, then raise :class:`SchemaError` (one line, the fix named) unless the
    worker can run on the schema. Failures to read are the transient errors of the store."""
    try:
        state = await inspect(conn, environ=environ)
    except ConfigError:
        raise
    except Exception as exc:
        raise classify(exc) from exc
    if not state.ok:
        where = f"{mask_url(database_url)}: " if database_url else ""
        raise SchemaError(where + state.describe())
    if state.status == NEWER:
        log.warning("%s", state.describe())
    elif state.status == UNVERSIONED:
        log.info("%s", state.describe())
    for warning in state.warnings:
        log.warning("schema: %s", warning)
    return state


async def require_database(settings: Settings) -> SchemaState:
    """:func:`require` on a connection of its own (the worker checks before its pool opens:
    a pool of a worker that cannot start would only be closed again)."""
    try:
        conn = await asyncpg.connect(
            asyncpg_dsn(settings.database_url),
            timeout=10,
            statement_cache_size=settings.statement_cache_size,
            server_settings={"application_name": "prompter-worker"},
        )
    except Exception as exc:
        raise classify(exc) from exc
    try:
        return await require(conn, database_url=settings.database_url)
    finally:
        await conn.close()
