"""``prompter-worker run``: the worker's lifecycle. RabbitMQ deliveries to PostgreSQL rows,
at least once, acked after commit.

::

    Session (worker.ingest.session) ── consumer connection ──► Dispatcher (worker.ingest.batching)
        │ publishing connection                           │ next_batch(): size, bytes, wait
        ▼                                                 ▼
    dead-letter copies ◄── Pipeline (worker.ingest.pipeline): intake, decode, Store.ingest,
                           dead-letter, settle (ack / reject / leave) ── one per pooled
                           connection, so the next batch is decoded while one commits

This module only starts the parts (the database: :mod:`~worker.ingest.opening`; the
processors: :mod:`~worker.ingest.processors`; periodic reports:
:mod:`~worker.ingest.reporting`), supervises them and stops them: a side task that dies
stops the worker (the broker redelivers what it held to a healthy replica); the first
SIGTERM or SIGINT stops consuming, lets the pipeline settle what is held within
``PROMPTER_SHUTDOWN_TIMEOUT``, then closes everything in reverse order, each with a
timeout; a second signal stops at once (unacked deliveries go back to the queue).

Invariants kept by the parts (each has a test): a delivery is acked only after its rows
committed or its dead-letter copy was confirmed; transient faults keep the batch unacked
and are retried with the one backoff policy (:mod:`worker.retry`), never dead-lettered;
deliveries from a channel that closed are never acked on another; what the worker holds
is bounded in bytes (``PROMPTER_MAX_HELD_BYTES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from typing import TYPE_CHECKING, Any

import asyncpg

from worker import __version__, tracing
from worker.amqp import broker
from worker.config import Settings
from worker.errors import ConfigError, SchemaError
from worker.ingest.batching import Dispatcher
from worker.ingest.database import DatabaseHealth
from worker.ingest.opening import open_database
from worker.ingest.processors import assemble_pipeline, process_batches
from worker.ingest.reporting import Reporting
from worker.ingest.session import Session
from worker.metrics import Health, Metrics, MetricsServer
from worker.security import mask_url
from worker.signals import handle_signals
from worker.store.ingest import Store

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)


class Worker:
    """``prompter-worker run``: consume, batch, store, dead-letter, ack; until stopped."""

    def __init__(
        self, settings: Settings, *, name: str = "prompter-worker", tracer: Tracer | None = None
    ) -> None:
        self.settings = settings
        self.name = name
        # Spans when tracing is on (worker.tracing): given, or the process's own.
        self.tracer = tracer if tracer is not None else tracing.current()
        self.metrics = Metrics()
        self.health = Health()
        self.dispatcher = Dispatcher(
            settings.batch_size,
            settings.batch_wait_ms / 1000,
            batch_bytes=settings.batch_max_bytes,
            budget=settings.max_held_bytes,
        )
        self.stopping = asyncio.Event()  # the first signal: drain and stop
        self.forced = asyncio.Event()  # the second: stop at once
        self.session = Session(
            settings,
            self.dispatcher,
            name=name,
            metrics=self.metrics,
            health=self.health,
            stopping=self.stopping,
        )
        self.database = DatabaseHealth(
            health=self.health, metrics=self.metrics, on_change=self.session.allow
        )
        self.reporting = Reporting(
            settings,
            metrics=self.metrics,
            health=self.health,
            session=self.session,
            dispatcher=self.dispatcher,
            stopping=self.stopping,
        )
        self.pool: asyncpg.Pool | None = None
        self.store: Store | None = None
        self.metrics_server: MetricsServer | None = None
        self._fatal: BaseException | None = None
        self._signals = 0

    # -- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop: stop consuming, finish what is held, close."""
        self.health.stopping = True
        self.stopping.set()
        self.dispatcher.wake()

    def stop_now(self) -> None:
        """Stop without finishing what is held (it goes back to the queue)."""
        self.stop()
        self.forced.set()
        self.dispatcher.close()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: finishing the deliveries held", extra={"signal": signum})
            self.stop()
        else:
            log.warning("second signal: stopping now, unacked deliveries go back to the queue")
            self.stop_now()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped. Returns the process exit code (0 stopped, 1 a task failed,
        2 a configuration the servers or the machine refuse)."""
        for warning in broker.check_tls(self.settings.amqp_url):
            log.warning(warning)
        try:
            self._start_metrics_server()
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
        with handle_signals(self._on_signal):
            try:
                return await self._run()
            finally:
                if self.metrics_server is not None:
                    self.metrics_server.close()

    def _start_metrics_server(self) -> None:
        s = self.settings
        if not s.metrics_port:
            return
        try:
            self.metrics_server = MetricsServer(
                self.metrics, self.health, s.metrics_host, s.metrics_port
            )
        except (OSError, socket.gaierror) as exc:
            raise ConfigError(
                f"cannot serve metrics on {s.metrics_host}:{s.metrics_port} "
                f"(PROMPTER_METRICS_HOST, PROMPTER_METRICS_PORT): {exc.strerror or exc}"
            ) from None
        self.metrics_server.start()
        log.info("metrics on http://%s:%d/metrics", s.metrics_host, self.metrics_server.port)

    async def _run(self) -> int:
        s = self.settings
        log.info(
            "starting",
            extra={
                "version": __version__,
                "database": mask_url(s.database_url),
                "broker": mask_url(s.amqp_url),
                "queue": s.queue,
                "replay_queue": s.replay_queue,
                "prefetch": s.prefetch,
                "batch_size": s.batch_size,
                "max_held_bytes": s.max_held_bytes,
            },
        )
        # Liveness ticks from the start: a worker waiting for its database is alive.
        tick = asyncio.create_task(self.reporting.tick(), name="tick")
        try:
            self.pool = await open_database(s, self.database, self.stopping)
        except SchemaError as exc:  # one line: what is missing, and the command that fixes it
            log.error("cannot start: %s", exc)
            return 2
        finally:
            if self.pool is None:
                tick.cancel()
                await asyncio.gather(tick, return_exceptions=True)
        if self.pool is None:  # stopped first
            return 0
        self.store = Store(self.pool, tracer=self.tracer)
        # Everything made so far (modules, settings, the pool) lives as long as the process:
        # out of the collector's sight, full collections stay short (fewer latency spikes).
        gc.collect()
        gc.freeze()
        pipeline = assemble_pipeline(
            s,
            store=self.store,
            session=self.session,
            dispatcher=self.dispatcher,
            database=self.database,
            metrics=self.metrics,
            health=self.health,
            forced=self.forced,
            tracer=self.tracer,
        )
        await self.session.allow(True)
        side = [
            asyncio.create_task(self.session.run(), name="broker"),
            asyncio.create_task(self.database.probe(self.stopping), name="db-probe"),
            tick,
        ]
        if s.log_summary_seconds > 0:
            side.append(asyncio.create_task(self.reporting.summarize(), name="summary"))
        processors = [
            asyncio.create_task(process_batches(self.dispatcher, pipeline), name=f"processor-{i}")
            for i in range(s.db_pool_size)
        ]
        for task in (*side, *processors):
            task.add_done_callback(self._on_task_done)
        try:
            await self.stopping.wait()
            await self._drain(processors)
        finally:
            await self._close(side, processors)
        if isinstance(self._fatal, ConfigError):
            log.error("stopped: %s", self._fatal)
            return 2
        if self._fatal is not None:
            return 1
        log.info("stopped")
        return 0

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        # A side task died: the worker cannot keep its promises any more. Stop; the broker
        # redelivers whatever is unacked to a healthy replica.
        self._fatal = exc
        if not isinstance(exc, ConfigError):
            log.error("task %s failed, stopping", task.get_name(), exc_info=exc)
        self.stop_now()

    async def _drain(self, processors: list[asyncio.Task[None]]) -> None:
        """Stop consuming, then let the processors settle what is held: until they are
        done, the shutdown timeout passes, or a second signal."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        if not self.forced.is_set():
            await self.session.stop_consuming()
        self.dispatcher.draining = True
        self.dispatcher.wake()
        pending: set[asyncio.Future[Any]] = set(processors)
        forced = asyncio.ensure_future(self.forced.wait())
        try:
            while pending and not self.forced.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait(
                    pending | {forced}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            forced.cancel()
        if pending:
            held = sum(s.held for s in self.session.sources)
            log.warning(
                "stopped before settling everything: %d deliveries left unacked; the broker "
                "redelivers them",
                held,
            )

    async def _close(
        self, side: list[asyncio.Task[Any]], processors: list[asyncio.Task[None]]
    ) -> None:
        """Close in reverse order of opening, each part with a timeout."""
        self.dispatcher.close()
        for task in processors:
            task.cancel()
        await asyncio.gather(*processors, return_exceptions=True)
        await self.session.close()
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), timeout=5)


def run(settings: Settings) -> int:
    """Run a worker to completion in a fresh event loop (uvloop where installed: about a
    sixth less CPU per message, bench/README.md); the process exit code."""
    try:
        try:
            import uvloop  # noqa: PLC0415 - optional: absent on Windows
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            return asyncio.run(Worker(settings).run())
        return uvloop.run(Worker(settings).run())
    finally:
        tracing.flush()  # the last batches' spans, before the process exits
