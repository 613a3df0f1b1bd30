"""The schema check at start: is this database's schema one this worker can run on?

``run``, ``replay --direct``, ``templates`` and ``status`` ask before they touch a table, so
a worker pointed at an unmigrated, half-migrated or too new database stops at once with
one line naming what is missing and the command that fixes it, instead of retrying every
batch forever (a missing table is a retried :class:`~worker.errors.DatabaseError`).

Two questions, both answered from what any role may read (the catalog, and the two
bookkeeping tables, which ``migrate`` makes readable to PUBLIC):

1. **Which revision of prompter's history does the database record?** In prompter's own
   version table (``prompter_alembic_version``, or ``PROMPTER_VERSION_TABLE``), or in an
   application's ``alembic_version`` when the application's Alembic applies prompter's
   revisions (our branch in its ``version_locations``, or the V7 revision copied into its
   history). The head this worker was built for is current; an older one of ours is behind
   (migrate first). A revision this worker does not know is newer: it is accepted if the
   database says workers of a revision this worker knows still run on it (see
   :data:`COMPAT_TABLE`), refused otherwise. When no revision of ours is recorded
   anywhere (a schema applied by hand, or an application's history that went on after
   the copied V7 revision), only the next question decides.
2. **Does the schema hold what the worker relies on?** The tables, every column the
   commands read or write, the unique keys its ``ON CONFLICT`` clauses name (valid, not
   left INVALID by an interrupted concurrent build), and no ``NOT NULL`` column without
   a default that its inserts would leave out. Asked whatever the revision says.

Rolling upgrades: ``migrate`` records, for each revision it applies, the oldest revision
whose workers still run on the schema it leaves (the revision module's
``workers_compatible_from``, see ``alembic/script.py.mako``), in :data:`COMPAT_TABLE`. An
older worker cannot import a revision it does not have, but it can read that row.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import asyncpg

from worker.config import Settings, asyncpg_dsn
from worker.errors import ConfigError, SchemaError
from worker.security import mask_url
from worker.store.classify import classify

log = logging.getLogger(__name__)

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

TABLES: Final = ("prompt_templates", "prompt_versions", "prompt_results")

#: Every column a command reads or writes, per table: the whole V7 schema.
COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "prompt_templates": (
        "id", "org_id", "workspace_id", "name", "provider", "system_instructions",
        "user_prompt_template", "country_set", "model_id", "inference_params", "tools_spec",
        "response_format", "grounding_profile_id", "grounding_snapshot_id", "retrieval_params",
        "config_hash", "config_canonical_json", "created_by", "created_at", "deleted_at",
    ),
    "prompt_versions": (
        "id", "org_id", "workspace_id", "template_id", "provider", "provider_version_key",
        "model_id", "fingerprint_captured_at", "first_seen_at", "last_seen_at",
    ),
    "prompt_results": (
        "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
        "system_fingerprint", "request", "response", "analysis_config", "created_at",
    ),
}  # fmt: skip

#: The columns each table's INSERT gives a value (``templates.SQL.REGISTER``,
#: ``SQL.INSERT_VERSIONS``, ``ingest.RESULT_COLUMNS``): any other NOT NULL column
#: needs a default, or every insert fails.
WRITTEN: Final[Mapping[str, frozenset[str]]] = {
    "prompt_templates": frozenset(COLUMNS["prompt_templates"]) - {"id", "created_at", "deleted_at"},
    "prompt_versions": frozenset(COLUMNS["prompt_versions"]) - {"id"},
    "prompt_results": frozenset(COLUMNS["prompt_results"]),
}


@dataclass(frozen=True, kw_only=True)
class UniqueKey:
    """A unique index the SQL relies on: an ``ON CONFLICT`` target, by columns (and the
    partial index's predicate) or, for ``ON CONFLICT ON CONSTRAINT``, by name."""

    table: str
    columns: tuple[str, ...]
    predicate: str | None = None
    constraint: str | None = None

    def describe(self) -> str:
        name = f"{self.constraint} " if self.constraint else ""
        where = f" WHERE {self.predicate}" if self.predicate else ""
        return f"unique key {name}on {self.table} ({', '.join(self.columns)}){where}"


UNIQUE_KEYS: Final = (
    # templates.SQL.REGISTER: ON CONFLICT (org_id, workspace_id, config_hash) WHERE ...
    UniqueKey(
        table="prompt_templates",
        columns=("org_id", "workspace_id", "config_hash"),
        predicate="deleted_at IS NULL",
    ),
    # SQL.INSERT_VERSIONS: ON CONFLICT ON CONSTRAINT ux_versions_org_ws_tpl_pvk
    UniqueKey(
        table="prompt_versions",
        columns=("org_id", "workspace_id", "template_id", "provider_version_key"),
        constraint="ux_versions_org_ws_tpl_pvk",
    ),
    # SQL.INSERT_RESULTS: ON CONFLICT (id); event_id is the result's id.
    UniqueKey(table="prompt_results", columns=("id",)),
)

# Statuses. Current, newer (compatible) and unversioned are runnable if nothing is missing.
CURRENT: Final = "current"
BEHIND: Final = "behind"
NEWER: Final = "newer"
INCOMPATIBLE: Final = "incompatible"
UNVERSIONED: Final = "unversioned"
MISSING: Final = "missing"
RUNNABLE: Final = frozenset({CURRENT, NEWER, UNVERSIONED})

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MIGRATE: Final = "run `prompter-worker migrate` first"


class SQL:
    """Every statement of the check, by name. Only the catalog and the bookkeeping tables."""

    EXISTS: Final = "SELECT to_regclass($1) IS NOT NULL"
    COLUMNS: Final = """
        SELECT c.relname AS table, a.attname AS column, a.attnotnull AS not_null,
               (a.atthasdef OR a.attidentity <> '') AS has_default
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.oid = ANY($1::regclass[]) AND a.attnum > 0 AND NOT a.attisdropped
    """
    INDEXES: Final = """
        SELECT t.relname AS table, ic.relname AS name, i.indisunique AS is_unique,
               i.indisvalid AS is_valid, i.indexprs IS NOT NULL AS has_expressions,
               pg_get_expr(i.indpred, i.indrelid) AS predicate, con.conname AS constraint,
               ARRAY(SELECT a.attname::text FROM unnest(i.indkey) AS k(attnum)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
                   AS columns
        FROM pg_index i
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_class ic ON ic.oid = i.indexrelid
        LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
                                   AND con.conrelid = i.indrelid
        WHERE i.indrelid = ANY($1::regclass[])
        ORDER BY t.relname, ic.relname
    """
    COMPATIBLE_FROM: Final = (
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
    table = version_table(environ)
    warnings: list[str] = []
    records: dict[str, list[str]] = {}
    for name in dict.fromkeys((table, APPLICATION_VERSION_TABLE)):
        rows = await _versions(conn, name, warnings)
        if rows:
            records[name] = rows
    status, revision, recorded_in, compatible_from, beside = await _revision(conn, table, records)
    present = [t for t in TABLES if await conn.fetchval(SQL.EXISTS, t)]
    if not present and status == UNVERSIONED:
        status = MISSING
    missing, invalid = ([], []) if status == MISSING else await _structure(conn, present)
    for name in invalid:
        warnings.append(
            f"index {name} is INVALID (an interrupted CREATE INDEX CONCURRENTLY): rebuild it "
            f"with `REINDEX INDEX CONCURRENTLY {name}`"
        )
    return SchemaState(
        status=status,
        revision=revision,
        recorded_in=recorded_in,
        head=HEAD,
        compatible_from=compatible_from,
        beside=tuple(beside),
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


async def _versions(conn: asyncpg.Connection, table: str, warnings: list[str]) -> list[str]:
    if not await conn.fetchval(SQL.EXISTS, table):
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
    if not await conn.fetchval(SQL.EXISTS, COMPAT_TABLE):
        return None
    try:
        value = await conn.fetchval(SQL.COMPATIBLE_FROM, revision)
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedTableError):
        return None
    return None if value is None else str(value)


async def _revision(
    conn: asyncpg.Connection, own_table: str, records: dict[str, list[str]]
) -> tuple[str, str | None, str | None, str | None, list[str]]:
    """(status, revision, recorded_in, compatible_from, the other revisions beside it)."""
    known = set(REVISIONS)
    for name, rows in records.items():
        for revision in rows:
            beside = [r for r in rows if r != revision]
            if revision in known:
                status = CURRENT if revision == HEAD else BEHIND
                return status, revision, name, None, beside
            compatible_from = await _compatible_from(conn, revision)
            # In our own table every revision is ours; in an application's, an unknown one
            # is ours only if migrate recorded its compatibility.
            if compatible_from is None and name != own_table:
                continue
            status = NEWER if compatible_from in known else INCOMPATIBLE
            return status, revision, name, compatible_from, beside
    return UNVERSIONED, None, None, None, []


async def _structure(conn: asyncpg.Connection, present: list[str]) -> tuple[list[str], list[str]]:
    """(what is missing, the INVALID indexes) on the tables that exist."""
    missing = [f"table {t}" for t in TABLES if t not in present]
    if not present:
        return missing, []
    columns: dict[str, dict[str, asyncpg.Record]] = {t: {} for t in present}
    for row in await conn.fetch(SQL.COLUMNS, present):
        columns[row["table"]][row["column"]] = row
    for table in present:
        have = columns[table]
        missing += [f"column {table}.{c}" for c in COLUMNS[table] if c not in have]
        missing += [
            f"a value for column {table}.{name} (NOT NULL, no default, not written by this worker)"
            for name, row in have.items()
            if row["not_null"] and not row["has_default"] and name not in WRITTEN[table]
        ]
    indexes = await conn.fetch(SQL.INDEXES, present)
    for key in UNIQUE_KEYS:
        if key.table in present and not any(_satisfies(row, key) for row in indexes):
            missing.append(key.describe())
    invalid = [str(r["name"]) for r in indexes if not r["is_valid"]]
    return missing, invalid


def _satisfies(index: asyncpg.Record, key: UniqueKey) -> bool:
    """A valid unique index on exactly the key's columns (any order, as ON CONFLICT infers),
    with the key's predicate; named as the constraint when the SQL names it."""
    if index["table"] != key.table or not index["is_unique"] or not index["is_valid"]:
        return False
    if index["has_expressions"] or set(index["columns"]) != set(key.columns):
        return False
    if key.constraint is not None and index["constraint"] != key.constraint:
        return False
    return _normal(index["predicate"]) == _normal(key.predicate)


def _normal(predicate: str | None) -> str | None:
    if predicate is None:
        return None
    text = predicate.strip()
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    return " ".join(text.split()).lower()
