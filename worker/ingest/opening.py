"""Opening the worker's database: the schema checked, then the pool; retried with the
one backoff policy while the database is unavailable; a stop interrupts it at once."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from worker.config import Settings
from worker.errors import TransientError
from worker.ingest.database import DatabaseHealth
from worker.retry import Backoff
from worker.store import schema
from worker.store.pool import create_pool


async def open_database(
    settings: Settings, database: DatabaseHealth, stopping: asyncio.Event
) -> asyncpg.Pool | None:
    """The pool, once the database answers (``database`` is told of each failure and of
    the success); None if ``stopping`` is set first. A :class:`~worker.errors.SchemaError`
    is raised (the worker exits 2)."""
    attempt = 0
    backoff = Backoff(cap=settings.retry_max_seconds)
    while not stopping.is_set():
        opening = asyncio.ensure_future(_open_pool(settings))
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({opening, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            return None
        try:
            pool = opening.result()
        except TransientError as exc:
            await database.failed(exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.delay(attempt)):
                    await stopping.wait()
            attempt += 1
            continue
        database.pool = pool
        await database.succeeded()
        return pool
    return None


async def _open_pool(settings: Settings) -> asyncpg.Pool:
    """The schema checked (a SchemaError stops the worker: exit 2), then the pool."""
    await schema.require_database(settings)
    return await create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.db_pool_size + 1,  # one spare for the probe
        statement_cache_size=settings.statement_cache_size,
    )
