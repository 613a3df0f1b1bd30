"""Running the Alembic migrations from the worker's own command, and creating the database."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config

from worker.config import asyncpg_dsn, mask_url
from worker.errors import ConfigError


def find_alembic_ini() -> Path:
    """``PROMPTER_ALEMBIC_INI``, else the checkout this package runs from, else the cwd."""
    candidates = []
    if os.environ.get("PROMPTER_ALEMBIC_INI"):
        candidates.append(Path(os.environ["PROMPTER_ALEMBIC_INI"]))
    candidates.append(Path(__file__).resolve().parent.parent / "alembic.ini")
    candidates.append(Path.cwd() / "alembic.ini")
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        "alembic.ini not found: run from the project directory or set PROMPTER_ALEMBIC_INI"
    )


def alembic_config(database_url: str) -> Config:
    config = Config(str(find_alembic_ini()))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False  # keep the worker's own log format
    return config


def upgrade(database_url: str, revision: str = "head", *, sql: bool = False) -> None:
    command.upgrade(alembic_config(database_url), revision, sql=sql)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


async def create_database(database_url: str) -> bool:
    """Create the database named in the URL if it does not exist; True if created.

    Connects to the ``postgres`` maintenance database on the same server with the same
    credentials. The name is quoted as an identifier, never interpolated raw.
    """
    dsn = asyncpg_dsn(database_url)
    parts = urllib.parse.urlsplit(dsn)
    name = urllib.parse.unquote(parts.path.lstrip("/"))
    if not name:
        raise ConfigError(f"DATABASE_URL names no database: {mask_url(database_url)}")
    admin = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted} ENCODING 'UTF8' TEMPLATE template0")
        return True
    finally:
        await conn.close()
