"""The batch side of a running worker: the pipeline assembled from the worker's parts, and
the processors, one per pooled connection, each running the dispatcher's next batch
through it (so the next batch is decoded while one commits)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from worker.config import Settings
from worker.ingest.batching import Dispatcher
from worker.ingest.database import DatabaseHealth
from worker.ingest.deadletter import DeadLetters
from worker.ingest.pipeline import Pipeline
from worker.ingest.session import Session
from worker.metrics import Health, Metrics
from worker.retry import Backoff
from worker.store.ingest import Store

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


def assemble_pipeline(
    settings: Settings,
    *,
    store: Store,
    session: Session,
    dispatcher: Dispatcher,
    database: DatabaseHealth,
    metrics: Metrics,
    health: Health,
    forced: asyncio.Event,
    tracer: Tracer | None,
) -> Pipeline:
    """The pipeline, its dead-letter copies published on the session's confirm channel."""
    return Pipeline(
        settings,
        store=store,
        session=session,
        dispatcher=dispatcher,
        dead_letters=DeadLetters(
            exchange=settings.dead_letter_exchange,
            publisher=session.publishing,
            redeclare=session.redeclare,
            renew=session.renew_publishing,
            metrics=metrics,
            health=health,
            backoff=Backoff(cap=settings.retry_max_seconds),
            forced=forced,
        ),
        database=database,
        metrics=metrics,
        forced=forced,
        tracer=tracer,
    )


async def process_batches(dispatcher: Dispatcher, pipeline: Pipeline) -> None:
    """One processor: batches through the pipeline until the dispatcher closes."""
    while (batch := await dispatcher.next_batch()) is not None:
        try:
            await pipeline.process(batch)
        finally:
            dispatcher.done()
            dispatcher.release(batch)
