"""Alembic environment: async, on SQLAlchemy's asyncpg dialect (no second driver).

The database URL comes, in this order, from ``config.attributes["database_url"]`` (set by
``prompter-worker migrate`` and the tests), then ``DATABASE_URL`` / ``DATABASE_URL_FILE``,
then the local default. A plain ``postgresql://`` URL is accepted: the connection is made by
asyncpg itself from that URL, so libpq-style options such as ``sslmode`` and
``sslrootcert`` work exactly as they do for the worker.

prompter's revisions are recorded in its own version table, ``prompter_alembic_version``
(``PROMPTER_VERSION_TABLE``), so they live beside an application's ``alembic_version``.
Each connection waits at most ``lock_timeout`` for a lock (``config.attributes
["lock_timeout"]``, else ``PROMPTER_MIGRATION_LOCK_TIMEOUT``, else 10 s) and holds the
migration advisory lock while it runs, so concurrent migrations run one after the other.
After each step, the compatibility of the schema with older workers is recorded
(:func:`worker.store.migrations.compat_statements`, read by :mod:`worker.store.schema`).

Offline mode (``alembic upgrade head --sql``) needs no database at all.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any

import asyncpg
from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from worker.config import asyncpg_dsn, database_url_from_env
from worker.store import migrations
from worker.store.schema import version_table

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = None
VERSION_TABLE = version_table()


def _database_url() -> str:
    url = config.attributes.get("database_url")
    return str(url) if url else database_url_from_env()


def _lock_timeout() -> float:
    value = config.attributes.get("lock_timeout")
    return float(value) if value is not None else migrations.lock_timeout_from_env()


def _record_compatibility(
    *, ctx: MigrationContext, step: MigrationInfo, heads: set[str], run_args: Any
) -> None:
    """After each step, in its transaction: one compatibility row per head."""
    revisions = {head: step.revision_map.get_revision(head) for head in heads}
    since = {
        head: migrations.workers_compatible_from(getattr(script, "module", None), head)
        for head, script in revisions.items()
    }
    for statement in migrations.compat_statements(VERSION_TABLE, since):
        ctx.execute(statement)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        transaction_per_migration=True,
        version_table=VERSION_TABLE,
        on_version_apply=[_record_compatibility],
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the SQL to stdout; the dialect is all that is needed."""
    _configure(dialect_name="postgresql", literal_binds=True, dialect_opts={"paramstyle": "named"})
    context.execute(migrations.lock_timeout_sql(_lock_timeout()))
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    dsn = asyncpg_dsn(_database_url())
    lock_timeout = _lock_timeout()

    async def connect() -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn, server_settings={"application_name": "prompter-worker migrate"}
        )
        try:
            await conn.execute(migrations.lock_timeout_sql(lock_timeout))
            # Held until this connection closes (the engine keeps no pool): a concurrent
            # migration waits here, then finds its work done.
            await migrations.acquire_migration_lock(conn, lock_timeout)
        except BaseException:
            await conn.close()
            raise
        return conn

    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=connect, poolclass=pool.NullPool
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
