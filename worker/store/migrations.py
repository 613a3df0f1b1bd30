"""Running the Alembic migrations from the worker's own command, and creating the database.

What ``prompter-worker migrate`` adds around ``alembic upgrade``:

- **Its own version table** (``prompter_alembic_version``, or ``PROMPTER_VERSION_TABLE``),
  so prompter's history lives beside an application's ``alembic_version`` in the same
  schema. A database an older prompter-worker migrated records its revision in
  ``alembic_version``: that record is moved over first, and said so
  (:func:`~worker.store.revisions.prepare_version_table`).
- **One migration at a time, and no endless waits**: every migration connection waits at
  most ``lock_timeout`` (``--lock-timeout``, ``PROMPTER_MIGRATION_LOCK_TIMEOUT``; 10 s) for
  a lock, and holds an advisory lock for its whole run, so a second ``migrate`` started
  meanwhile (one per pod, say) waits for the first, then finds nothing to do.
- **Compatibility records** for rolling upgrades
  (:func:`~worker.store.revisions.compat_statements`, run by ``alembic/env.py`` after each
  step; read by :mod:`worker.store.schema`).
- **A check of what was built** (:func:`_verify`): the schema check of the workers, and no
  index left INVALID.
- **One line per failure** (:func:`~worker.store.migration_failures.describe_failure`): a
  missing privilege, a lock timeout, an unknown revision, an unreachable server; the
  traceback only at ``--log-level debug``.
"""

from __future__ import annotations

import asyncio
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from worker.config import asyncpg_dsn
from worker.errors import ConfigError, SchemaError, WorkerError
from worker.security import mask_url
from worker.store import revisions, schema
from worker.store.migration_failures import describe_failure, lock_timeout_message
from worker.store.revisions import compat_statements, workers_compatible_from

# alembic/env.py and the tests call these here, beside the command they serve.
__all__ = [
    "ADVISORY_LOCK_KEY",
    "acquire_migration_lock",
    "compat_statements",
    "create_database",
    "describe_failure",
    "downgrade",
    "lock_timeout_from_env",
    "lock_timeout_sql",
    "upgrade",
    "workers_compatible_from",
]

#: Seconds a migration statement waits for a lock before it fails (0: no limit).
DEFAULT_LOCK_TIMEOUT: Final = 10.0
LOCK_TIMEOUT_ENV: Final = "PROMPTER_MIGRATION_LOCK_TIMEOUT"
#: The advisory lock every migration of a database holds ("prompter" in ASCII).
ADVISORY_LOCK_KEY: Final = int.from_bytes(b"prompter", "big")


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
        table = revisions.version_table()
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


async def _prepare(
    database_url: str, table: str, ours: frozenset[str], lock_timeout: float, adopt: bool
) -> str | None:
    """:func:`~worker.store.revisions.prepare_version_table` under the migration lock."""
    conn = await _connect(database_url, lock_timeout)
    try:
        await acquire_migration_lock(conn, lock_timeout)  # released when conn closes
        return await revisions.prepare_version_table(conn, table, ours, adopt=adopt)
    finally:
        await conn.close()


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
