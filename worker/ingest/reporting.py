"""What a running worker reports on its own: liveness and the gauges of what it holds,
every second; and, every ``PROMPTER_LOG_SUMMARY_SECONDS``, one log line of what happened."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from worker.config import Settings
from worker.ingest.batching import Dispatcher
from worker.ingest.session import Session
from worker.metrics import Health, Metrics, Totals, summary_text

log = logging.getLogger("worker.ingest.worker")  # the lines are the worker's, as before


class Reporting:
    """The worker's periodic reports (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        health: Health,
        session: Session,
        dispatcher: Dispatcher,
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.session = session
        self.dispatcher = dispatcher
        self.stopping = stopping

    async def tick(self) -> None:
        """Liveness and the gauges, every second until the worker stops."""
        while not self.stopping.is_set():
            self.health.tick()
            self.metrics.inflight.set(sum(s.held for s in self.session.sources))
            self.metrics.bytes_held.set(self.dispatcher.held_bytes)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.stopping.wait()

    async def summarize(self) -> None:
        """Every PROMPTER_LOG_SUMMARY_SECONDS, one line of what happened, from the
        metrics' counters (:meth:`Metrics.totals`); nothing when nothing happened. The
        last stretch is summarized when the worker closes (this task is cancelled)."""
        clock = asyncio.get_running_loop().time
        before = self.metrics.totals(clock())
        try:
            while True:
                await asyncio.sleep(self.settings.log_summary_seconds)
                before = self._summary(before, clock())
        finally:
            self._summary(before, clock())

    def _summary(self, before: Totals, now: float) -> Totals:
        totals = self.metrics.totals(now)
        fields = totals.since(before)
        if fields is not None:
            fields["held"] = sum(s.held for s in self.session.sources)
            log.info(summary_text(fields), extra=fields)
        return totals
