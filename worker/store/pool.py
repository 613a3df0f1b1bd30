"""Connections to PostgreSQL: the pool the worker ingests through (json and jsonb encoded
by orjson in their binary form, which COPY needs), one-off connections for commands, and
the error for a database that cannot be reached."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg
import orjson

from worker.config import Settings, asyncpg_dsn
from worker.errors import DatabaseUnavailable
from worker.security import mask_url
from worker.store.classify import classify

#: The first byte of jsonb's binary form: its format version.
_JSONB_VERSION: Final = b"\x01"


def _encode_jsonb(value: Any) -> bytes:
    return _JSONB_VERSION + orjson.dumps(value)


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(memoryview(data)[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    """Encode and decode json and jsonb with orjson on every pooled connection.

    In the binary format (JSON text, after a version byte for jsonb), which COPY requires;
    a value wrapped in :class:`orjson.Fragment` travels as the JSON text it already is.
    """
    await conn.set_type_codec(
        "json", encoder=orjson.dumps, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )


async def _on_release(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool beyond what asyncpg always
    does first (roll back a transaction left open): ingestion keeps no session state (no
    SET, LISTEN, cursors or advisory locks), and the default reset query would cost a
    round trip per batch."""


async def create_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 2,
    statement_cache_size: int = 100,
    command_timeout: float = 60.0,
    connect_timeout: float = 10.0,
) -> asyncpg.Pool:
    """An asyncpg pool for ingestion. ``statement_cache_size=0`` for PgBouncer (transaction
    mode). ``command_timeout`` bounds every statement, so a black-holed connection turns into
    a retryable error instead of a hang."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            asyncpg_dsn(database_url),
            min_size=min_size,
            max_size=max_size,
            statement_cache_size=statement_cache_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            init=init_connection,
            reset=_on_release,
            server_settings={"application_name": "prompter-worker"},
        )
    except Exception as exc:
        raise classify(exc) from exc
    return pool


@contextlib.asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection outside a pool, for the commands other than ``run``: the pool's
    codecs and statement-cache setting. Raises :class:`DatabaseUnavailable` naming the
    server (password masked) when it cannot connect."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            asyncpg_dsn(settings.database_url),
            timeout=10,
            statement_cache_size=settings.statement_cache_size,
        )
    except Exception as exc:
        raise unreachable(settings.database_url, classify(exc)) from None
    try:
        await init_connection(conn)
        yield conn
    finally:
        await conn.close()


def unreachable(database_url: str, reason: BaseException) -> DatabaseUnavailable:
    """The error for a database that cannot be reached."""
    return DatabaseUnavailable(f"cannot reach PostgreSQL at {mask_url(database_url)}: {reason}")
