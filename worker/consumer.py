"""The run loop: RabbitMQ deliveries to PostgreSQL rows, at least once, acked after commit.

::

    broker task ── connect, declare, consume ──► Dispatcher (buffers, bounded by prefetch)
                                                   │ next_batch(): size or wait, live first
                          processors (one per pooled connection) ◄┘
                            decode ─► Store.ingest (one transaction) ─► dead-letter rejects
                                                   │ (publisher confirms)
                                                   ▼
                                  Source: multiple-ack up to the highest tag below which
                                  every delivery is committed or dead-lettered

Invariants this module keeps (each has a test): a delivery is acked only after its rows
committed or its dead-letter copy was confirmed; transient faults keep the batch unacked
and are retried with capped exponential backoff and jitter, never dead-lettered;
deliveries from a channel that closed are dropped, never acked on another channel (the
broker redelivers them, and ingestion is idempotent); what the worker holds is bounded by
the prefetch counts.

Deliveries arrive on a dedicated consumer connection (:mod:`worker.amqp`, the least CPU
per message); the topology and dead-letter publishing (with confirms) use an aiormq
connection to the same node. Batching and ack bookkeeping live in :mod:`worker.batching`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiormq
import aiormq.abc
import aiormq.exceptions
import asyncpg

from worker import __version__, amqp, broker, events, store
from worker.batching import Dispatcher, Held, Source
from worker.config import Settings, mask_url
from worker.errors import (
    BrokerUnavailable,
    ConfigError,
    PublishError,
    Rejection,
    TransientError,
    UnroutableError,
)
from worker.events import Event
from worker.metrics import Health, Metrics, MetricsServer
from worker.publisher import publish_confirmed
from worker.signals import handle_signals
from worker.store import Store, backoff

log = logging.getLogger(__name__)

DB_PROBE_SECONDS: Final = 5.0


# --- the worker -------------------------------------------------------------------------


@dataclass
class _Connection:
    connection: aiormq.Connection  # topology and dead-letter publishing
    publisher: aiormq.abc.AbstractChannel
    consumer: amqp.ConsumerProtocol  # deliveries and acks
    sources: list[Source]


class Worker:
    """``prompter-worker run``: consume, batch, store, dead-letter, ack; until stopped."""

    def __init__(self, settings: Settings, *, name: str = "prompter-worker") -> None:
        self.settings = settings
        self.name = name
        self.topology = broker.Topology.from_settings(settings)
        self.metrics = Metrics()
        self.health = Health()
        self.dispatcher = Dispatcher(settings.batch_size, settings.batch_wait_ms / 1000)
        self.pool: asyncpg.Pool | None = None
        self.store: Store | None = None
        self.current: _Connection | None = None
        self.metrics_server: MetricsServer | None = None
        self._stop = asyncio.Event()
        self._stopped_consuming = asyncio.Event()
        self._fatal: BaseException | None = None
        self._signals = 0
        self._next_node = 0
        self._last_db_success = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop: stop consuming, finish what is held, close."""
        self.health.stopping = True
        self._stop.set()
        self.dispatcher.wake()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: finishing the deliveries held", extra={"signal": signum})
            self.stop()
        else:
            log.warning("second signal: stopping now, unacked deliveries go back to the queue")
            self.dispatcher.closed = True
            self.dispatcher.wake()

    async def run(self) -> int:
        """Run until stopped. Returns the process exit code."""
        for warning in broker.check_tls(self.settings.amqp_url):
            log.warning(warning)
        if self.settings.metrics_port:
            self.metrics_server = MetricsServer(
                self.metrics, self.health, self.settings.metrics_host, self.settings.metrics_port
            )
            self.metrics_server.start()
            log.info(
                "metrics on http://%s:%d/metrics",
                self.settings.metrics_host,
                self.metrics_server.port,
            )
        with handle_signals(self._on_signal):
            try:
                return await self._run()
            finally:
                if self.metrics_server is not None:
                    self.metrics_server.close()

    async def _run(self) -> int:
        log.info(
            "starting",
            extra={
                "version": __version__,
                "database": mask_url(self.settings.database_url),
                "broker": mask_url(self.settings.amqp_url),
                "queue": self.settings.queue,
                "replay_queue": self.settings.replay_queue,
                "prefetch": self.settings.prefetch,
                "batch_size": self.settings.batch_size,
            },
        )
        if not await self._open_database():
            return 0
        # Everything made so far (modules, settings, the pool) lives as long as the process:
        # out of the collector's sight, full collections stay short (fewer latency spikes).
        gc.collect()
        gc.freeze()
        tasks = [
            asyncio.create_task(self._broker_loop(), name="broker"),
            asyncio.create_task(self._probe_database(), name="db-probe"),
            asyncio.create_task(self._tick(), name="tick"),
        ]
        processors = [
            asyncio.create_task(self._processor(), name=f"processor-{i}")
            for i in range(self.settings.db_pool_size)
        ]
        for task in (*tasks, *processors):
            task.add_done_callback(self._on_task_done)
        try:
            await self._stop.wait()
            await self._shutdown(processors)
        finally:
            for task in (*tasks, *processors):
                task.cancel()
            await asyncio.gather(*tasks, *processors, return_exceptions=True)
            await self._close_broker()
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pool.close(), timeout=5)
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
        self.dispatcher.closed = True
        self.stop()

    async def _shutdown(self, processors: list[asyncio.Task[None]]) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        await self._cancel_consumers()
        self.dispatcher.draining = True
        self.dispatcher.wake()
        remaining = deadline - asyncio.get_running_loop().time()
        _, pending = await asyncio.wait(processors, timeout=max(remaining, 0))
        if pending:
            held = self._held()
            log.warning(
                "shutdown timeout: %d deliveries left unacked; the broker redelivers them",
                held,
            )

    async def _cancel_consumers(self) -> None:
        """Stop the broker sending more; what is already buffered is still processed."""
        current = self.current
        if current is None:
            return
        for source in current.sources:
            if source.open and source.consumer_tag:
                with contextlib.suppress(Exception):
                    await current.consumer.cancel(source.consumer_tag, timeout=5)
        # Deliveries sent before the CancelOk were handed over, in order, before it.
        self._set_consumers(0)

    # -- PostgreSQL ------------------------------------------------------------------------

    async def _open_database(self) -> bool:
        attempt = 0
        while not self._stop.is_set():
            try:
                self.pool = await store.create_pool(
                    self.settings.database_url,
                    min_size=1,
                    max_size=self.settings.db_pool_size + 1,  # one spare for the probe
                    statement_cache_size=self.settings.statement_cache_size,
                )
            except TransientError as exc:
                self._database_down(exc, attempt)
                await self._sleep(backoff(attempt, self.settings.retry_max_seconds))
                attempt += 1
                continue
            self.store = Store(self.pool)
            self._database_up()
            return True
        return False

    def _database_down(self, exc: TransientError, attempt: int) -> None:
        was_ok = self.health.database_ok
        self.health.database_ok = False
        self.health.problems["database"] = str(exc)
        self.metrics.retries.labels(kind=type(exc).__name__).inc()
        if was_ok or attempt == 0:
            log.warning("database unavailable, retrying: %s", exc)
        elif attempt % 10 == 0:
            log.warning("database still unavailable after %d attempts: %s", attempt, exc)

    def _database_up(self) -> None:
        self._last_db_success = time.monotonic()
        if not self.health.database_ok:
            if "database" in self.health.problems:
                log.info("database available again")
                self.metrics.reconnects.labels(server="database").inc()
            self.health.database_ok = True
            self.health.problems.pop("database", None)

    async def _probe_database(self) -> None:
        """Keep readiness honest while idle: a cheap query when nothing else asked lately."""
        while not self._stop.is_set():
            await self._sleep(DB_PROBE_SECONDS)
            recent = time.monotonic() - self._last_db_success < DB_PROBE_SECONDS
            if self.pool is None or (recent and self.health.database_ok):
                continue
            try:
                async with asyncio.timeout(DB_PROBE_SECONDS):
                    await self.pool.fetchval("SELECT 1")
            except Exception as exc:
                self._database_down(store.classify(exc), 1)
            else:
                self._database_up()

    async def _tick(self) -> None:
        while not self._stop.is_set():
            self.health.tick()
            self.metrics.inflight.set(self._held())
            await self._sleep(1.0)

    # -- RabbitMQ ----------------------------------------------------------------------------

    def _held(self) -> int:
        """Deliveries received and not yet acked, over the current connection's sources."""
        return sum(s.held for s in self.current.sources) if self.current else 0

    def _set_consumers(self, count: int) -> None:
        self.health.consumers = count
        self.metrics.consumers.set(count)

    async def _broker_loop(self) -> None:
        attempt = 0
        connected_before = False
        while not self._stop.is_set():
            try:
                current = await self._connect()
            except BrokerUnavailable as exc:
                self.health.problems["broker"] = str(exc)
                self.metrics.retries.labels(kind="BrokerUnavailable").inc()
                if attempt == 0 or attempt % 10 == 0:
                    log.warning("broker unavailable, retrying: %s", exc)
                self._next_node += 1
                await self._sleep(backoff(attempt, self.settings.retry_max_seconds))
                attempt += 1
                continue
            attempt = 0
            self.current = current
            self.health.broker_connected = True
            self.health.problems.pop("broker", None)
            if connected_before:
                self.metrics.reconnects.labels(server="broker").inc()
                log.info("reconnected to the broker, consuming again")
            connected_before = True
            await self._wait_until_closed(current)
            self.health.broker_connected = False
            self._set_consumers(0)
            dropped = 0
            for source in current.sources:
                source.open = False
                dropped += self.dispatcher.drop(source)
            if dropped:
                self.metrics.dropped.inc(dropped)
            if self._stop.is_set():
                return
            log.warning(
                "broker connection lost; %d buffered deliveries dropped (redelivered later)",
                dropped,
            )
            await _close_quietly(current.connection, current.consumer)

    async def _connect(self) -> _Connection:
        connection = await broker.connect(
            self.settings.amqp_url, name=self.name, start=self._next_node
        )
        consumer: amqp.ConsumerProtocol | None = None
        try:
            await broker.open_topology(connection, self.topology, passive=not self.settings.declare)
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            sources = [
                Source(None, 1, self.settings.queue, replay=False),
                Source(None, 2, self.settings.replay_queue, replay=True),
            ]
            by_channel = {s.channel: s for s in sources}
            add = self.dispatcher.add
            clock = asyncio.get_running_loop().time

            def on_delivery(delivery: amqp.Delivery) -> None:
                source = by_channel[delivery.channel]
                if source.open:
                    add(source, delivery, clock())

            # Same node as the aiormq connection (its URL carries the node that answered).
            consumer = await amqp.connect(
                str(connection.url), on_delivery, name=f"{self.name}-consumer"
            )
            for source, prefetch in zip(
                sources, (self.settings.prefetch, self.settings.replay_prefetch), strict=True
            ):
                source.protocol = consumer
                await consumer.open_channel(source.channel, prefetch)
                source.consumer_tag = await consumer.consume(source.channel, source.queue)
        except ConfigError:
            await _close_quietly(connection, consumer)
            raise
        except (
            aiormq.exceptions.AMQPError,
            amqp.AMQPError,
            OSError,
            ConnectionError,
            TimeoutError,
        ) as exc:
            await _close_quietly(connection, consumer)
            raise BrokerUnavailable(f"setting up the channels failed: {exc}") from exc
        self._set_consumers(len(sources))
        return _Connection(connection, publisher, consumer, sources)

    async def _wait_until_closed(self, current: _Connection) -> None:
        while True:
            publisher = current.publisher
            waits: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(current.connection.closing),
                asyncio.ensure_future(publisher.closing),
                asyncio.ensure_future(_settled(current.consumer.closed)),
                asyncio.ensure_future(self._stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if done != {waits[1]} or current.publisher is publisher:
                break
            # Only a dead-letter channel closed, one replaced after a nack: watch the new one.
        if self._stop.is_set() and not current.consumer.closed.done():
            # Graceful stop: keep the connections until the processors have drained.
            await self._stopped_consuming.wait()

    async def _close_broker(self) -> None:
        self._stopped_consuming.set()
        current = self.current
        if current is None:
            return
        for source in current.sources:
            source.open = False
        await _close_quietly(current.connection, current.consumer)

    # -- processing ----------------------------------------------------------------------------

    async def _processor(self) -> None:
        while True:
            batch = await self.dispatcher.next_batch()
            if batch is None:
                return
            try:
                await self._process(batch)
            finally:
                self.dispatcher.done()

    async def _process(self, batch: list[Held]) -> None:
        max_bytes = self.settings.max_event_bytes
        valid: list[Event] = []
        valid_at: list[int] = []
        rejected: list[tuple[int, Rejection]] = []
        check, decode = events.check_properties, events.decode
        for i, (_, delivery, _) in enumerate(batch):
            if delivery.plain_json:
                refusal = None
            else:  # the header decoded once for both properties
                props = delivery.properties
                refusal = check(props.content_type, props.content_encoding)
            decoded = refusal or decode(delivery.body, max_bytes)
            if isinstance(decoded, Event):
                valid.append(decoded)
                valid_at.append(i)
            else:
                rejected.append((i, decoded))
        result = await self._ingest(valid, batch) if valid else store.IngestResult(outcomes=[])
        if result is None:  # abandoned: every channel it came from closed meanwhile
            return
        now = time.time()
        oldest: float | None = None
        stored = duplicates = 0
        for j, outcome in enumerate(result.outcomes):
            if outcome is store.Outcome.STORED:
                stored += 1
                at = valid[j].occurred_at.timestamp()
                oldest = at if oldest is None or at < oldest else oldest
            elif outcome is store.Outcome.DUPLICATE:
                duplicates += 1
            else:
                rejected.append((valid_at[j], outcome))
        unconfirmed = await self._dead_letter(batch, rejected) if rejected else set()
        self._ack(batch, skip=unconfirmed)
        m = self.metrics
        m.batches.inc()
        m.batch_size.observe(len(batch))
        if stored:
            m.stored.inc(stored)
        if duplicates:
            m.duplicates.inc(duplicates)
        if oldest is not None:
            m.lag_seconds.observe(max(now - oldest, 0.0))

    async def _ingest(self, valid: list[Event], batch: list[Held]) -> store.IngestResult | None:
        """Ingest with retries; None if the batch was abandoned (its channels closed)."""
        assert self.store is not None
        attempt = 0
        while True:
            if all(not d[0].open for d in batch):
                return None
            started = time.perf_counter()
            try:
                result = await self.store.ingest(valid)
            except TransientError as exc:
                self._database_down(exc, attempt)
                if self.dispatcher.closed:
                    return None
                await self._sleep(backoff(attempt, self.settings.retry_max_seconds), hard=True)
                attempt += 1
                continue
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self._database_up()
            return result

    async def _dead_letter(
        self, batch: list[Held], rejected: list[tuple[int, Rejection]]
    ) -> set[int]:
        """Publish a copy of each rejected delivery to the dead-letter exchange and wait for
        the confirms, retrying until each is confirmed or its channel has closed (the broker
        then redelivers it). Returns the batch positions left unconfirmed: never acked."""
        failed_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        attempt = 0
        todo = rejected
        while True:
            todo = [(i, r) for i, r in todo if batch[i][0].open]
            if not todo:
                return set()
            if self.dispatcher.closed:
                return {i for i, _ in todo}
            current = self.current
            if current is None or current.connection.is_closed:
                await self._sleep(backoff(attempt, self.settings.retry_max_seconds), hard=True)
                attempt += 1
                continue
            channel = current.publisher
            results = await asyncio.gather(
                *(self._publish_dead(current, batch[i][1], r, failed_at) for i, r in todo),
                return_exceptions=True,
            )
            if any(isinstance(outcome, PublishError) for outcome in results):
                await self._renew_publisher(current, channel)
            retry = []
            for (i, r), outcome in zip(todo, results, strict=True):
                if isinstance(outcome, BaseException):
                    retry.append((i, r))
                    if isinstance(outcome, (UnroutableError, PublishError)):
                        log.error("dead-lettering failed, will retry: %s", outcome)
                    elif not isinstance(outcome, BrokerUnavailable):
                        log.error("dead-lettering failed, will retry", exc_info=outcome)
                    self.metrics.retries.labels(kind="dead_letter").inc()
                else:
                    self.metrics.rejected.labels(reason=r.reason).inc()
            todo = retry
            if todo:
                await self._sleep(backoff(attempt, self.settings.retry_max_seconds), hard=True)
                attempt += 1

    async def _renew_publisher(
        self, current: _Connection, channel: aiormq.abc.AbstractChannel
    ) -> None:
        """A new channel for the dead-letter copies after ``channel`` nacked one (or never
        confirmed it); the old one is closed. RabbitMQ 3.10 nacks every publish to a quorum
        queue, for the life of the channel, once the channel's first publish to it met a
        leader that had just died: retried there, a copy would never be confirmed."""
        if current.publisher is not channel:
            return  # another processor renewed it already
        try:
            fresh = await current.connection.channel(publisher_confirms=True, on_return_raises=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError):
            return  # the connection is going: the broker task starts over
        if current.publisher is not channel:
            await _close_channel_quietly(fresh)
            return
        current.publisher = fresh
        await _close_channel_quietly(channel)

    async def _publish_dead(
        self,
        current: _Connection,
        delivery: amqp.Delivery,
        rejection: Rejection,
        failed_at: str,
    ) -> None:
        props = delivery.properties
        routing_key = delivery.routing_key
        headers = dict(props.headers or {})
        headers.update(
            {
                "x-error-reason": rejection.reason,
                "x-error-detail": rejection.detail[:1000],
                "x-failed-at": failed_at,
                "x-worker-version": __version__,
                "x-original-exchange": delivery.exchange,
                "x-original-routing-key": routing_key,
            }
        )
        copy = broker.republished_properties(props, headers)
        await publish_confirmed(
            current.publisher,
            delivery.body,
            exchange=self.topology.dead_letter_exchange,
            routing_key=routing_key or broker.LIVE_ROUTING_KEY,
            props=copy,
        )
        log.warning(
            "event rejected: %s",
            rejection.reason,
            extra={
                "event_id": props.message_id,
                "reason": rejection.reason,
                "detail": rejection.detail,
                "routing_key": routing_key,
            },
        )

    def _ack(self, batch: list[Held], *, skip: set[int]) -> None:
        by_source: dict[Source, list[int]] = {}
        for i, (source, delivery, _) in enumerate(batch):
            if i not in skip:
                by_source.setdefault(source, []).append(delivery.delivery_tag)
        for source, tags in by_source.items():
            if not source.open or source.protocol is None:
                continue  # that channel is gone: never ack on another one
            mark = source.complete(tags)
            # A suspect holds the watermark back, maybe across crashes: ack what completed
            # behind it one by one, or a crasher takes it to the delivery limit with itself.
            behind = source.strand() if source.done and self.dispatcher.suspects else []
            try:
                if mark is not None:
                    source.protocol.ack(source.channel, mark, multiple=True)
                for tag in behind:
                    source.protocol.ack(source.channel, tag, multiple=False)
            except amqp.AMQPError:
                source.open = False  # redelivered by the broker; idempotent ingestion

    # -- helpers ---------------------------------------------------------------------------

    async def _sleep(self, seconds: float, *, hard: bool = False) -> None:
        """Sleep, waking early on stop (or, with ``hard``, only on a forced stop)."""
        if hard:
            end = asyncio.get_running_loop().time() + seconds
            while not self.dispatcher.closed:
                left = end - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                await asyncio.sleep(min(left, 0.2))
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()


def run(settings: Settings) -> int:
    """Run a worker to completion in a fresh event loop (uvloop where installed: about a
    sixth less CPU per message, bench/README.md); the process exit code."""
    try:
        import uvloop  # noqa: PLC0415 - optional: absent on Windows
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(Worker(settings).run())
    return uvloop.run(Worker(settings).run())


async def _settled(future: asyncio.Future[None]) -> None:
    """Wait for a future to finish, however it finishes."""
    with contextlib.suppress(BaseException):
        await asyncio.shield(future)


async def _close_channel_quietly(channel: aiormq.abc.AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(channel.close(), timeout=5)


async def _close_quietly(
    connection: aiormq.Connection, consumer: amqp.ConsumerProtocol | None
) -> None:
    if consumer is not None:
        with contextlib.suppress(Exception):
            await consumer.close(timeout=5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), timeout=5)
