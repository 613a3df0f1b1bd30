"""Running the Alembic migrations from the worker's own command, and creating the database.

What ``prompter-worker migrate`` adds around ``alembic upgrade``:

- **Its own version table** (``prompter_alembic_version``, or ``PROMPTER_VERSION_TABLE``),
  so prompter's history lives beside an application's ``alembic_version`` in the same
  schema. A database an older prompter-worker migrated records its revision in
  ``alembic_version``: that record is moved over first, and said so (:func:`_prepare`).
- **One migration at a time, and no endless waits**: every migration connection waits at
  most ``lock_timeout`` (``--lock-timeout``, ``PROMPTER_MIGRATION_LOCK_TIMEOUT``; 10 s) for
  a lock, and holds an advisory lock for its whole run, so a second ``migrate`` started
  meanwhile (one per pod, say) waits for the first, then finds nothing to do.
- **Compatibility records** for rolling upgrades (:func:`compat_statements`, run by
  ``alembic/env.py`` after each step; read by :mod:`worker.store.schema`).
- **A check of what was built** (:func:`_verify`): the schema check of the workers, and no
  index left INVALID.
- **One line per failure** (:func:`describe_failure`): a missing privilege, a lock timeout,
  an unknown revision, an unreachable server; the traceback only at ``--log-level debug``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from worker.config import asyncpg_dsn
from worker.errors import ConfigError, SchemaError, WorkerError
from worker.security import mask_url
from worker.store import schema

#: Seconds a migration statement waits for a lock before it fails (0: no limit).
DEFAULT_LOCK_TIMEOUT: Final = 10.0
LOCK_TIMEOUT_ENV: Final = "PROMPTER_MIGRATION_LOCK_TIMEOUT"
#: The advisory lock every migration of a database holds ("prompter" in ASCII).
ADVISORY_LOCK_KEY: Final = int.from_bytes(b"prompter", "big")
_REVISION_ID = re.compile(r"[A-Za-z0-9_]{1,32}")


def find_alembic_ini() -> Path:
    """``PROMPTER_ALEMBIC_INI``, else the checkout this package runs from, else the cwd."""
    candidates = []
    if os.environ.get("PROMPTER_ALEMBIC_INI"):
        candidates.append(Path(os.environ["PROMPTER_ALEMBIC_INI"]))
    candidates.append(Path(__file__).resolve().parents[2] / "alembic.ini")
    candidates.append(Path.cwd() / "alembic.ini")
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        "alembic.ini not found: run from the project directory or set PROMPTER_ALEMBIC_INI"
    )


def lock_timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """``PROMPTER_MIGRATION_LOCK_TIMEOUT`` in seconds (0: wait forever), else 10."""
    env = os.environ if environ is None else environ
    raw = env.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and 0 <= value <= 86_400):
        raise ConfigError(f"{LOCK_TIMEOUT_ENV}: {raw!r} is not a number of seconds in 0-86400")
    return value


def lock_timeout_sql(seconds: float) -> str:
    """The ``SET`` statement for a lock timeout of ``seconds`` (whole milliseconds)."""
    return f"SET lock_timeout = {round(seconds * 1000)}"


def lock_timeout_message(seconds: float) -> str:
    limit = f"{seconds:g} s" if seconds else "no limit"
    return (
        f"a lock was not granted within lock_timeout ({limit}): another migrate, or a long "
        "transaction on prompter's tables, holds it; run migrate again when it is done, or "
        "give it longer with --lock-timeout"
    )


async def acquire_migration_lock(conn: asyncpg.Connection, lock_timeout: float) -> None:
    """Take the session's migration lock (:data:`ADVISORY_LOCK_KEY`), waiting at most
    ``lock_timeout`` seconds (0: for ever); :class:`SchemaError` if it stays taken.

    Polled with ``pg_try_advisory_lock`` rather than waited for with ``pg_advisory_lock``:
    a statement blocked on the lock keeps its snapshot, and the holder's ``CREATE INDEX
    CONCURRENTLY`` waits for every such snapshot to go away; each would wait for the other
    (PostgreSQL then cancels one of them as a deadlock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_timeout if lock_timeout else math.inf
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
        if loop.time() >= deadline:
            raise SchemaError(lock_timeout_message(lock_timeout))
        await asyncio.sleep(min(0.2, max(deadline - loop.time(), 0.01)))


def alembic_config(database_url: str, *, lock_timeout: float | None = None) -> Config:
    config = Config(str(find_alembic_ini()))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False  # keep the worker's own log format
    if lock_timeout is not None:
        config.attributes["lock_timeout"] = lock_timeout
    return config


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What ``migrate`` did: the schema it left (None with ``--sql``)."""

    schema: schema.SchemaState | None


def upgrade(
    database_url: str,
    revision: str = "head",
    *,
    sql: bool = False,
    lock_timeout: float | None = None,
    adopt_alembic_version: bool = False,
    note: Callable[[str], None] | None = None,
) -> Outcome:
    """``alembic upgrade`` with what the module docstring lists. ``note`` receives the lines
    an operator should read (the record moved from ``alembic_version``). Every failure is a
    :class:`SchemaError` of one line (the original chained)."""
    timeout = lock_timeout_from_env() if lock_timeout is None else lock_timeout
    config = alembic_config(database_url, lock_timeout=timeout)
    try:
        if sql:
            command.upgrade(config, revision, sql=True)
            return Outcome(schema=None)
        table = schema.version_table()
        ours = frozenset(r.revision for r in ScriptDirectory.from_config(config).walk_revisions())
        moved = asyncio.run(_prepare(database_url, table, ours, timeout, adopt_alembic_version))
        if moved and note is not None:
            note(moved)
        command.upgrade(config, revision)
        state = asyncio.run(_verify(database_url, at_head=revision in ("head", "heads")))
    except WorkerError:
        raise
    except Exception as exc:
        raise SchemaError(
            describe_failure(
                exc, database_url=database_url, revision=revision, lock_timeout=timeout
            )
        ) from exc
    return Outcome(schema=state)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


async def _connect(database_url: str, lock_timeout: float) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(
        asyncpg_dsn(database_url),
        timeout=10,
        server_settings={"application_name": "prompter-worker migrate"},
    )
    await conn.execute(lock_timeout_sql(lock_timeout))
    return conn


async def _rows(conn: asyncpg.Connection, table: str) -> list[str] | None:
    if not await conn.fetchval(schema.SQL.EXISTS, table):
        return None
    rows = await conn.fetch(f"SELECT version_num FROM {table}")
    return sorted(str(r["version_num"]) for r in rows)


async def _prepare(
    database_url: str, table: str, ours: frozenset[str], lock_timeout: float, adopt: bool
) -> str | None:
    """Before Alembic runs, under the migration lock: move a record an older prompter-worker
    left in ``alembic_version`` into ``table`` (the line saying so is returned), or refuse
    when Alembic would do harm: prompter's revisions beside an application's in
    ``alembic_version`` (the application's Alembic manages them), or prompter's tables
    with no revision recorded anywhere (``upgrade`` would try to create them again)."""
    app = schema.APPLICATION_VERSION_TABLE
    conn = await _connect(database_url, lock_timeout)
    try:
        await acquire_migration_lock(conn, lock_timeout)  # released when conn closes
        async with conn.transaction():
            if await _rows(conn, table) or table == app:
                return None
            recorded = await _rows(conn, app) or []
            mine = [r for r in recorded if r in ours]
            foreign = [r for r in recorded if r not in ours]
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
            present = [t for t in schema.TABLES if await conn.fetchval(schema.SQL.EXISTS, t)]
            if present:
                where = f"{table} or {app}"
                raise SchemaError(
                    f"{', '.join(present)} exist but no revision of prompter's is recorded "
                    f"in {where}: if your application's Alembic created them, upgrade with it; "
                    "if they were made by hand, record the revision they match with `alembic "
                    f"stamp REVISION` from prompter-worker's directory ({schema.VERSION_TABLE_ENV}"
                    f"={table}), then migrate"
                )
            return None
    finally:
        await conn.close()


async def _other_tables(conn: asyncpg.Connection, table: str) -> list[str]:
    """Up to five tables of the current schema that are none of prompter's."""
    own = [*schema.TABLES, table, schema.APPLICATION_VERSION_TABLE, schema.COMPAT_TABLE]
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


async def _verify(database_url: str, *, at_head: bool) -> schema.SchemaState:
    """After Alembic: no INVALID index on prompter's tables (an interrupted concurrent build
    that ``IF NOT EXISTS`` would skip for ever) and, when upgraded to head, a schema the
    workers run on."""
    conn = await _connect(database_url, DEFAULT_LOCK_TIMEOUT)
    try:
        state = await schema.inspect(conn)
    finally:
        await conn.close()
    if state.invalid_indexes:
        raise SchemaError(
            "migrated, but "
            + "; ".join(w for w in state.warnings if "INVALID" in w)
            + "; then run migrate again"
        )
    if at_head and not state.ok:
        raise SchemaError(f"migrated, but the workers cannot run on it: {state.describe()}")
    return state


# --- compatibility records (called by alembic/env.py) ------------------------------------


def workers_compatible_from(module: Any, revision: str) -> str:
    """The revision module's ``workers_compatible_from``; the revision itself if it has none
    (only workers that know it may run on its schema: the safe default)."""
    value = getattr(module, "workers_compatible_from", None)
    return str(value) if value else revision


def compat_statements(version_table: str, heads: Mapping[str, str]) -> list[str]:
    """The statements that make :data:`schema.COMPAT_TABLE` hold one row per current head,
    ``head -> workers_compatible_from``, readable (with the version table) by every role:
    the workers' check reads both, whatever role they log in as."""
    for value in (*heads, *heads.values()):
        if not _REVISION_ID.fullmatch(value):
            raise ConfigError(f"revision id {value!r} is not 1-32 letters, digits, underscores")
    table = schema.COMPAT_TABLE
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


# --- failures, in one line ----------------------------------------------------------------

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
                f"does not know (its newest is {schema.HEAD}): a newer release migrated it; "
                "migrate with that release, or check PROMPTER_VERSION_TABLE"
            )
        if match:
            return f"no revision {revision!r} in prompter's history (see `alembic history`)"
        return f"migration failed: {text}"
    connection = next((c for c in causes if isinstance(c, _CONNECTION_FAILURES)), None)
    if connection is not None:
        return f"cannot reach PostgreSQL at {mask_url(database_url)}: {connection}"
    return f"migration failed: {type(exc).__name__}: {exc}"


async def create_database(database_url: str) -> bool:
    """Create the database named in the URL if it does not exist; True if created.

    Connects to the ``postgres`` maintenance database on the same server with the same
    credentials. The name is quoted as an identifier, never interpolated raw. A failure is
    a :class:`SchemaError` of one line.
    """
    dsn = asyncpg_dsn(database_url)
    parts = urllib.parse.urlsplit(dsn)
    name = urllib.parse.unquote(parts.path.lstrip("/"))
    if not name:
        raise ConfigError(f"DATABASE_URL names no database: {mask_url(database_url)}")
    admin = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
    try:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if exists:
                return False
            quoted = '"' + name.replace('"', '""') + '"'
            await conn.execute(f"CREATE DATABASE {quoted} ENCODING 'UTF8' TEMPLATE template0")
            return True
        finally:
            await conn.close()
    except Exception as exc:
        detail = describe_failure(exc, database_url=database_url, lock_timeout=0)
        raise SchemaError(f"cannot create the database: {detail}") from exc
