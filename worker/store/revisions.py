"""prompter's revision history as a database records it: which version table holds it
(prompter's own, beside any application's ``alembic_version``), which revision it records
and whether this worker runs on it (read by the schema check, :mod:`worker.store.schema`),
and what ``migrate`` writes there (:mod:`worker.store.migrations`): a record an older
prompter-worker left in ``alembic_version`` moved over, and the compatibility rows.

Rolling upgrades: ``migrate`` records, for each revision it applies, the oldest revision
whose workers still run on the schema it leaves (the revision module's
``workers_compatible_from``, see ``alembic/script.py.mako``), in :data:`COMPAT_TABLE`. An
older worker cannot import a revision it does not have, but it can read that row.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from worker.errors import ConfigError, SchemaError
from worker.store.structure import TABLES, present_tables, table_exists

#: prompter's own history, oldest first; the last one is the head this worker is built for.
#: ``tests/test_schema.py`` checks it against ``alembic/versions``: a new revision goes here.
REVISIONS: Final = (
    "20250814141329",
    "20261124090000",
    "20261201090000",
    "20261202090000",
)
HEAD: Final = REVISIONS[-1]

#: prompter's own Alembic version table, beside any application's ``alembic_version``.
DEFAULT_VERSION_TABLE: Final = "prompter_alembic_version"
VERSION_TABLE_ENV: Final = "PROMPTER_VERSION_TABLE"
#: Where an application's Alembic (or an older prompter-worker) records revisions.
APPLICATION_VERSION_TABLE: Final = "alembic_version"
#: One row per recorded head: ``(revision, workers_compatible_from)``, written by ``migrate``.
COMPAT_TABLE: Final = "prompter_schema_compat"

# What the recorded revision says: the first question of the schema check.
CURRENT: Final = "current"
BEHIND: Final = "behind"
NEWER: Final = "newer"
INCOMPATIBLE: Final = "incompatible"
UNVERSIONED: Final = "unversioned"

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_REVISION_ID = re.compile(r"[A-Za-z0-9_]{1,32}")

COMPATIBLE_FROM_SQL: Final = (
    f"SELECT workers_compatible_from FROM {COMPAT_TABLE} WHERE revision = $1"
)


def version_table(environ: Mapping[str, str] | None = None) -> str:
    """prompter's version table: ``PROMPTER_VERSION_TABLE``, else ``prompter_alembic_version``.

    A plain lower-case SQL name (it is put into statements unquoted), in the schema the
    connection's ``search_path`` picks, as the tables themselves.
    """
    env = os.environ if environ is None else environ
    name = env.get(VERSION_TABLE_ENV, "").strip() or DEFAULT_VERSION_TABLE
    if not _IDENTIFIER.fullmatch(name):
        raise ConfigError(
            f"{VERSION_TABLE_ENV}: {name!r} is not a plain lower-case SQL name "
            "(letters, digits, underscores; at most 63; not starting with a digit)"
        )
    return name


# --- reading: the schema check ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Recorded:
    """The revision of prompter's the database records, and what it means for this worker."""

    status: str  # CURRENT, BEHIND, NEWER, INCOMPATIBLE or UNVERSIONED
    revision: str | None = None
    recorded_in: str | None = None  # the version table that records it
    compatible_from: str | None = None  # newer schemas: workers of this revision run on it
    beside: tuple[str, ...] = ()  # other revisions in that version table (an application's)


async def recorded(conn: asyncpg.Connection, own_table: str, warnings: list[str]) -> Recorded:
    """Which of prompter's revisions ``own_table`` or ``alembic_version`` records (a version
    table this role may not read adds a line to ``warnings``)."""
    records: dict[str, list[str]] = {}
    for name in dict.fromkeys((own_table, APPLICATION_VERSION_TABLE)):
        rows = await _readable_versions(conn, name, warnings)
        if rows:
            records[name] = rows
    known = set(REVISIONS)
    for name, rows in records.items():
        for revision in rows:
            beside = tuple(r for r in rows if r != revision)
            if revision in known:
                status = CURRENT if revision == HEAD else BEHIND
                return Recorded(status=status, revision=revision, recorded_in=name, beside=beside)
            compatible_from = await _compatible_from(conn, revision)
            # In our own table every revision is ours; in an application's, an unknown one
            # is ours only if migrate recorded its compatibility.
            if compatible_from is None and name != own_table:
                continue
            return Recorded(
                status=NEWER if compatible_from in known else INCOMPATIBLE,
                revision=revision,
                recorded_in=name,
                compatible_from=compatible_from,
                beside=beside,
            )
    return Recorded(status=UNVERSIONED)


async def _readable_versions(
    conn: asyncpg.Connection, table: str, warnings: list[str]
) -> list[str]:
    if not await table_exists(conn, table):
        return []
    try:
        rows = await conn.fetch(f"SELECT version_num FROM {table}")
    except asyncpg.InsufficientPrivilegeError:
        warnings.append(f"this role may not read {table}: the tables were checked instead")
        return []
    except asyncpg.UndefinedTableError:  # dropped meanwhile
        return []
    return sorted(str(r["version_num"]) for r in rows)


async def _compatible_from(conn: asyncpg.Connection, revision: str) -> str | None:
    if not await table_exists(conn, COMPAT_TABLE):
        return None
    try:
        value = await conn.fetchval(COMPATIBLE_FROM_SQL, revision)
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedTableError):
        return None
    return None if value is None else str(value)


# --- writing: migrate -------------------------------------------------------------------


async def prepare_version_table(
    conn: asyncpg.Connection, table: str, ours: frozenset[str], *, adopt: bool
) -> str | None:
    """Before Alembic runs (the caller holds the migration lock): move a record an older
    prompter-worker left in ``alembic_version`` into ``table`` (the line saying so is
    returned), or refuse when Alembic would do harm: prompter's revisions (``ours``) beside
    an application's in ``alembic_version`` (the application's Alembic manages them), or
    prompter's tables with no revision recorded anywhere (``upgrade`` would try to create
    them again)."""
    app = APPLICATION_VERSION_TABLE
    async with conn.transaction():
        if await _versions(conn, table) or table == app:
            return None
        listed = await _versions(conn, app) or []
        mine = [r for r in listed if r in ours]
        foreign = [r for r in listed if r not in ours]
        if mine and foreign:
            raise SchemaError(
                f"{app} records prompter's revision {', '.join(mine)} beside "
                f"{', '.join(foreign)}: your application's Alembic applies prompter's "
                "revisions here; upgrade with it (`alembic upgrade heads`), not with "
                "prompter-worker migrate"
            )
        if mine:
            others = await _other_tables(conn, table)
            if others and not adopt:
                raise SchemaError(
                    f"{app} records prompter's revision {', '.join(mine)} and the "
                    f"database holds other tables ({', '.join(others)}): if your "
                    "application's Alembic applies prompter's revisions (a copied V7 "
                    "revision), upgrade with it (`alembic upgrade head`); if an older "
                    "prompter-worker wrote that record, move it with `prompter-worker "
                    "migrate --adopt-alembic-version`"
                )
            await conn.execute(
                f"CREATE TABLE {table} (version_num VARCHAR(32) NOT NULL, "
                f"CONSTRAINT {table[:58]}_pkc PRIMARY KEY (version_num))"
            )
            await conn.executemany(
                f"INSERT INTO {table} (version_num) VALUES ($1)",
                [(r,) for r in mine],
            )
            await conn.execute(
                f"DELETE FROM {app} WHERE version_num = ANY($1::text[])",
                mine,
            )
            return (
                f"moved prompter's schema revision {', '.join(mine)} from {app} to {table} "
                f"(prompter's own version table; {app} is left to your application)"
            )
        present = await present_tables(conn)
        if present:
            where = f"{table} or {app}"
            raise SchemaError(
                f"{', '.join(present)} exist but no revision of prompter's is recorded "
                f"in {where}: if your application's Alembic created them, upgrade with it; "
                "if they were made by hand, record the revision they match with `alembic "
                f"stamp REVISION` from prompter-worker's directory ({VERSION_TABLE_ENV}"
                f"={table}), then migrate"
            )
        return None


async def _versions(conn: asyncpg.Connection, table: str) -> list[str] | None:
    """The revisions ``table`` records, or None if there is no such table."""
    if not await table_exists(conn, table):
        return None
    rows = await conn.fetch(f"SELECT version_num FROM {table}")
    return sorted(str(r["version_num"]) for r in rows)


async def _other_tables(conn: asyncpg.Connection, table: str) -> list[str]:
    """Up to five tables of the current schema that are none of prompter's."""
    own = [*TABLES, table, APPLICATION_VERSION_TABLE, COMPAT_TABLE]
    rows = await conn.fetch(
        """
        SELECT relname FROM pg_class
        WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'p')
          AND relname <> ALL($1::text[])
        ORDER BY relname LIMIT 5
        """,
        own,
    )
    return [str(r["relname"]) for r in rows]


def workers_compatible_from(module: Any, revision: str) -> str:
    """The revision module's ``workers_compatible_from``; the revision itself if it has none
    (only workers that know it may run on its schema: the safe default)."""
    value = getattr(module, "workers_compatible_from", None)
    return str(value) if value else revision


def compat_statements(version_table: str, heads: Mapping[str, str]) -> list[str]:
    """The statements that make :data:`COMPAT_TABLE` hold one row per current head,
    ``head -> workers_compatible_from``, readable (with the version table) by every role:
    the workers' check reads both, whatever role they log in as."""
    for value in (*heads, *heads.values()):
        if not _REVISION_ID.fullmatch(value):
            raise ConfigError(f"revision id {value!r} is not 1-32 letters, digits, underscores")
    table = COMPAT_TABLE
    statements = [
        f"CREATE TABLE IF NOT EXISTS {table} (revision VARCHAR(32) PRIMARY KEY, "
        "workers_compatible_from VARCHAR(32) NOT NULL)",
        f"GRANT SELECT ON {table}, {version_table} TO PUBLIC",
    ]
    kept = ", ".join(f"'{h}'" for h in sorted(heads))
    statements.append(
        f"DELETE FROM {table}" + (f" WHERE revision NOT IN ({kept})" if heads else "")
    )
    statements += [
        f"INSERT INTO {table} (revision, workers_compatible_from) VALUES ('{head}', '{since}') "
        "ON CONFLICT (revision) DO UPDATE SET "
        "workers_compatible_from = EXCLUDED.workers_compatible_from"
        for head, since in sorted(heads.items())
    ]
    return statements
