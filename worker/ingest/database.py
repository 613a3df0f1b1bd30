"""What the worker knows of its database's health, and what follows from it.

Readiness (``database_ok``) follows every batch and, while idle, a probe; the first
failure and the recovery are logged once each (:class:`~worker.retry.Retrying`); and the
session is told (``on_change``) so that the worker stops taking deliveries while the
database is down (:meth:`worker.ingest.session.Session.allow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import asyncpg

from worker.errors import TransientError
from worker.metrics import Health, Metrics
from worker.retry import Retrying
from worker.store.classify import classify

log = logging.getLogger(__name__)

PROBE_SECONDS: Final = 5.0


class DatabaseHealth:
    """See the module docstring. ``on_change(True | False)`` is awaited on each change."""

    def __init__(
        self,
        *,
        health: Health,
        metrics: Metrics,
        on_change: Callable[[bool], Awaitable[None]],
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.on_change = on_change
        self.pool: asyncpg.Pool | None = None
        self.retrying = Retrying(
            failing="database unavailable", recovered="database available again", logger=log
        )
        self._last_success = 0.0

    async def failed(self, exc: TransientError, **context: int) -> None:
        """A statement or a connection failed for a reason that is not the data's;
        ``context`` (a batch's ``batch=`` deliveries and ``attempt=``) goes into the log
        line, when one is written."""
        self.metrics.retries.labels(kind=type(exc).__name__).inc()
        self.health.problems["database"] = str(exc)
        self.retrying.failed(exc, **context)
        if self.health.database_ok:
            self.health.database_ok = False
            await self.on_change(False)

    async def succeeded(self) -> None:
        self._last_success = time.monotonic()
        self.health.problems.pop("database", None)
        if self.retrying.succeeded():
            self.metrics.reconnects.labels(server="database").inc()
        if not self.health.database_ok:
            self.health.database_ok = True
            await self.on_change(True)

    async def probe(self, stopping: asyncio.Event) -> None:
        """Keep readiness honest while idle: a cheap query when nothing else asked lately,
        and at once while the database is down (so consuming resumes when it answers)."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_SECONDS):
                    await stopping.wait()
            recent = time.monotonic() - self._last_success < PROBE_SECONDS
            if self.pool is None or (recent and self.health.database_ok):
                continue
            try:
                async with asyncio.timeout(PROBE_SECONDS):
                    await self.pool.fetchval("SELECT 1")
            except Exception as exc:
                await self.failed(classify(exc))
            else:
                await self.succeeded()
