"""Alembic environment: async, on SQLAlchemy's asyncpg dialect (no second driver).

The database URL comes, in this order, from ``config.attributes["database_url"]`` (set by
``prompter-worker migrate`` and the tests), then ``DATABASE_URL`` / ``DATABASE_URL_FILE``,
then the local default. A plain ``postgresql://`` URL is accepted: the connection is made by
asyncpg itself from that URL, so libpq-style options such as ``sslmode`` and
``sslrootcert`` work exactly as they do for the worker.

Offline mode (``alembic upgrade head --sql``) needs no database at all.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

import asyncpg
from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from worker.config import asyncpg_dsn, database_url_from_env

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = None


def _database_url() -> str:
    url = config.attributes.get("database_url")
    return str(url) if url else database_url_from_env()


def run_migrations_offline() -> None:
    """Emit the SQL to stdout; the dialect is all that is needed."""
    context.configure(
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    dsn = asyncpg_dsn(_database_url())

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

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
