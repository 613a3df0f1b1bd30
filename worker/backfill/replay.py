"""Bulk publishing and backfill from JSONL files: ``publish``, ``replay``, ``replay --direct``.

::

    ReplayOptions (built once by the command line)
       │
    files ─► jsonl.Reader (plain or gzip) ─► decode each line (the worker's own rules)
       │ invalid: reported with its line number, reason and detail; never sent
       ▼
    run.replay_files: one loop (pacing, checkpoint, progress, stopping, report)
       │
       ├─ BrokerSink: Publisher (confirms pipelined) ─► prompter.events
       │                routing key prompt_run.v1 (publish) or prompt_run.v1.replay (replay)
       └─ DirectSink (--direct): batches ─► Store.ingest (one transaction each, two at a time)

Both sinks keep the original ``occurred_at``: history lands at its own time.

**Checkpoints** (``--checkpoint PATH``, :mod:`worker.backfill.checkpoint`) make a run resumable:
only settled lines count, and the checkpoint is saved about once a second, when a file is
finished, and when the run stops for any reason. What a run did is a
:class:`~worker.backfill.reports.Report` (:mod:`worker.backfill.reports`).

**Pacing** (``rate``) follows a schedule (GCRA, a token bucket's twin), not a sleep after
each event: the long-run rate is exact whatever the sleeps' jitter, and bursts are bounded.

**Stopping**: the first SIGINT or SIGTERM stops reading, waits for the confirms (or batches)
in flight, saves the checkpoint and reports; a second one stops at once (the checkpoint
still holds only settled lines).
"""

from __future__ import annotations

import asyncio

import asyncpg

from worker import tracing
from worker.backfill.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_REJECTS_PATH,
    ReplayOptions,
)
from worker.backfill.pacing import Stop, stop_on_signals
from worker.backfill.reports import Report
from worker.backfill.run import Checked, replay_files
from worker.backfill.sinks import DIRECT_ATTEMPTS, BrokerSink, DirectSink
from worker.config import Settings
from worker.errors import WorkerError
from worker.publisher import Publisher
from worker.retry import Backoff
from worker.store import schema
from worker.store.ingest import Store
from worker.store.pool import create_pool, unreachable

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_REJECTS_PATH",
    "DIRECT_ATTEMPTS",
    "ReplayOptions",
    "replay_files",
    "run",
]


async def run(settings: Settings, options: ReplayOptions) -> Report:
    """A ``publish`` or ``replay`` command: ``options.paths`` through the broker, or (with
    ``mode="direct"``) straight into PostgreSQL, stopped gracefully by SIGINT or SIGTERM.
    Raises only for what is wrong before anything is sent (an unreadable input, a changed
    file, a bad checkpoint, a database without the schema); everything later is in the
    report."""
    checked = Checked.of(options)
    stop = Stop()
    if options.direct:
        return await _run_direct(settings, options, stop, checked)
    # The publisher connects on its first send, after the inputs were checked.
    publisher = None
    if not options.dry_run:
        publisher = Publisher.from_settings(
            settings,
            window=options.window,
            name=options.connection_name,
            app_id="prompter-worker",
        )
    try:
        sink = BrokerSink(publisher, routing_key=options.routing_key) if publisher else None
        with stop_on_signals(stop):
            return await replay_files(
                options, sink, max_bytes=settings.max_event_bytes, stop=stop, checked=checked
            )
    finally:
        if publisher is not None:
            await publisher.close(grace=0 if stop.now.is_set() else None)


async def _run_direct(
    settings: Settings, options: ReplayOptions, stop: Stop, checked: Checked
) -> Report:
    """``replay --direct``: a pool of ``options.concurrency`` connections, one batch in
    flight on each."""
    pool = None
    try:
        sink = None
        if not options.dry_run:
            pool = await _open_pool(settings, options.concurrency)
            sink = direct_sink(Store(pool, tracer=tracing.current()), settings, options)
        with stop_on_signals(stop):
            return await replay_files(
                options, sink, max_bytes=settings.max_event_bytes, stop=stop, checked=checked
            )
    finally:
        if pool is not None:
            await asyncio.wait_for(pool.close(), timeout=30)


def direct_sink(store: Store, settings: Settings, options: ReplayOptions) -> DirectSink:
    """The sink of ``replay --direct`` on ``store``, sized by ``options`` and ``settings``."""
    return DirectSink(
        store,
        batch_size=options.batch_size,
        batch_bytes=settings.batch_max_bytes,
        concurrency=options.concurrency,
        backoff=Backoff(cap=settings.retry_max_seconds),
    )


async def _open_pool(settings: Settings, size: int) -> asyncpg.Pool:
    url = settings.database_url
    try:
        pool = await create_pool(
            url,
            min_size=size,
            max_size=size,
            statement_cache_size=settings.statement_cache_size,
        )
    except WorkerError as exc:
        raise unreachable(url, exc) from None
    try:
        async with pool.acquire() as conn:
            await schema.require(conn, database_url=url)  # SchemaError: exit 2
    except BaseException:
        await pool.close()
        raise
    return pool
