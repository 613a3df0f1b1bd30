"""The run loop: RabbitMQ deliveries to PostgreSQL rows, at least once, acked after commit.

::

    broker task ── connect, declare, consume ──► Dispatcher (buffers, bounded by prefetch)
                                                   │ next_batch(): size or wait, live first
                          processors (one per pooled connection) ◄┘
                            decode ─► Store.ingest (one transaction) ─► dead-letter rejects
                                                   │ (publisher confirms)
                                                   ▼
                                  AckTracker: multiple-ack up to the highest tag below
                                  which every delivery is committed or dead-lettered

Invariants this module keeps (each has a test): a delivery is acked only after its rows
committed or its dead-letter copy was confirmed; transient faults keep the batch unacked
and are retried with capped exponential backoff and jitter, never dead-lettered;
deliveries from a channel that closed are dropped, never acked on another channel (the
broker redelivers them, and ingestion is idempotent); what the worker holds is bounded by
the prefetch counts.

Suspects: a delivery the broker has handed out at least twice before
(``x-delivery-count >= 2``) may be the one that killed its previous consumers. It is
processed alone, with nothing else in flight, lowest delivery count first, so a message
that crashes the process takes no innocent neighbour's commit with it; the broker's
delivery limit then dead-letters it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

import aiormq
import aiormq.abc
import aiormq.exceptions
import asyncpg
from pamqp import commands as spec

from worker import __version__, broker, events, store
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
from worker.store import Store

log = logging.getLogger(__name__)

SUSPECT_AFTER: Final = 2  # x-delivery-count from which a delivery is processed alone
BACKOFF_BASE_SECONDS: Final = 0.1
DB_PROBE_SECONDS: Final = 5.0


# --- deliveries and acknowledgements ------------------------------------------------------


class Source:
    """One consuming channel: its queue, and the acknowledgements owed on it.

    Delivery tags on a channel count up from 1. ``acked`` is the watermark: every tag up to
    it has been acknowledged (multiple-ack). Completed tags above a gap wait in ``done``.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, queue: str, *, replay: bool) -> None:
        self.channel = channel
        self.queue = queue
        self.replay = replay
        self.open = True
        self.acked = 0
        self.received = 0
        self.done: set[int] = set()
        self.consumer_tag: str | None = None

    def complete(self, tags: Sequence[int]) -> int | None:
        """Mark tags committed; return the new watermark if it moved."""
        self.done.update(tags)
        mark = self.acked
        done = self.done
        while mark + 1 in done:
            mark += 1
            done.discard(mark)
        if mark == self.acked:
            return None
        self.acked = mark
        return mark

    @property
    def held(self) -> int:
        return self.received - self.acked


# A delivery in the buffers: (source, message, arrival time on the loop clock).
Delivery = tuple[Source, aiormq.abc.DeliveredMessage, float]


def deliver_frame(message: aiormq.abc.DeliveredMessage) -> spec.Basic.Deliver:
    """The Basic.Deliver frame of a consumed message (aiormq types it as a union)."""
    return cast(spec.Basic.Deliver, message.delivery)


def delivery_count(message: aiormq.abc.DeliveredMessage) -> int:
    headers = message.header.properties.headers
    if not headers:
        return 0
    count = headers.get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


class Dispatcher:
    """Buffers deliveries and cuts them into batches: at most ``batch_size``, or whatever
    has waited ``batch_wait`` seconds. Live deliveries go before replayed ones, so backfill
    never starves live traffic. Suspects go alone (see the module docstring)."""

    def __init__(self, batch_size: int, batch_wait: float) -> None:
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.live: deque[Delivery] = deque()
        self.replay: deque[Delivery] = deque()
        self.suspects: list[tuple[int, int, Delivery]] = []
        self.inflight = 0
        self.exclusive = False
        self.draining = False
        self.closed = False
        self._suspect_turn = False
        self._seq = 0
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()

    def add(self, source: Source, message: aiormq.abc.DeliveredMessage) -> None:
        source.received += 1
        item = (source, message, asyncio.get_running_loop().time())
        count = delivery_count(message)
        if count >= SUSPECT_AFTER:
            self._seq += 1
            self.suspects.append((count, self._seq, item))
            self._arrived.set()
            return
        queue = self.replay if source.replay else self.live
        queue.append(item)
        n = len(queue)
        if n == 1 or n >= self.batch_size:
            self._arrived.set()

    @property
    def buffered(self) -> int:
        return len(self.live) + len(self.replay) + len(self.suspects)

    def wake(self) -> None:
        self._arrived.set()

    def drop(self, source: Source) -> int:
        """Forget buffered deliveries of a closed channel; the broker redelivers them."""
        before = self.buffered
        self.live = deque(d for d in self.live if d[0] is not source)
        self.replay = deque(d for d in self.replay if d[0] is not source)
        self.suspects = [s for s in self.suspects if s[2][0] is not source]
        self._arrived.set()
        return before - self.buffered

    def _pick_suspect(self) -> Delivery:
        # Lowest delivery count first: a repeat crasher has the highest count, so every
        # innocent exposed alongside it is handled before it is touched again. Among equal
        # counts the order alternates with the count's parity (FIFO, then LIFO), so a crasher
        # cannot stay in front of the same neighbours cycle after cycle.
        low = min(c for c, _, _ in self.suspects)
        tied = [s for s in self.suspects if s[0] == low]
        chosen = min(tied, key=lambda s: s[1]) if low % 2 else max(tied, key=lambda s: s[1])
        self.suspects.remove(chosen)
        return chosen[2]

    def _take(self) -> list[Delivery]:
        batch: list[Delivery] = []
        size = self.batch_size
        for queue in (self.live, self.replay):
            while queue and len(batch) < size:
                batch.append(queue.popleft())
        return batch

    async def next_batch(self) -> list[Delivery] | None:
        """The next batch to process, or None once closed (or drained while draining)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                if self.closed:
                    return None
                n = len(self.live) + len(self.replay)
                timeout: float | None = None
                if (
                    self.suspects
                    and self.inflight == 0
                    and (n == 0 or self._suspect_turn or self.draining)
                ):
                    self.inflight += 1
                    self.exclusive = True
                    self._suspect_turn = False
                    return [self._pick_suspect()]
                if n and not self.exclusive:
                    oldest = min(q[0][2] for q in (self.live, self.replay) if q)
                    due = oldest + self.batch_wait
                    now = loop.time()
                    if n >= self.batch_size or now >= due or self.draining:
                        self.inflight += 1
                        self._suspect_turn = bool(self.suspects)
                        return self._take()
                    timeout = due - now
                elif self.draining and n == 0 and not self.suspects:
                    return None
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()

    def done(self, batch: list[Delivery]) -> None:
        self.inflight -= 1
        self.exclusive = False
        self._arrived.set()


# --- the worker -------------------------------------------------------------------------


@dataclass
class _Connection:
    connection: aiormq.Connection
    publisher: aiormq.abc.AbstractChannel
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
        self._consumer_count = 0
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
        loop = asyncio.get_running_loop()
        with _signal_handlers(loop, self._on_signal):
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
            held = sum(s.held for s in self.current.sources) if self.current else 0
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
                    await asyncio.wait_for(
                        source.channel.basic_cancel(source.consumer_tag), timeout=5
                    )
        self._set_consumers(0)
        # Deliveries that arrived before the CancelOk are handed to us by tasks the AMQP
        # client already scheduled: let them run, so they are drained, not redelivered.
        await asyncio.sleep(0.05)

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
                await self._sleep(_backoff(attempt, self.settings.retry_max_seconds))
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
            held = sum(s.held for s in self.current.sources) if self.current else 0
            self.metrics.inflight.set(held)
            await self._sleep(1.0)

    # -- RabbitMQ ----------------------------------------------------------------------------

    def _set_consumers(self, count: int) -> None:
        self._consumer_count = count
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
                await self._sleep(_backoff(attempt, self.settings.retry_max_seconds))
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
            with contextlib.suppress(Exception):
                await current.connection.close()

    async def _connect(self) -> _Connection:
        connection = await broker.connect(
            self.settings.amqp_url, name=self.name, start=self._next_node
        )
        try:
            await broker.open_topology(connection, self.topology, passive=not self.settings.declare)
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            sources = [
                await self._subscribe(
                    connection, self.settings.queue, self.settings.prefetch, replay=False
                ),
                await self._subscribe(
                    connection,
                    self.settings.replay_queue,
                    self.settings.replay_prefetch,
                    replay=True,
                ),
            ]
        except ConfigError:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        except (aiormq.exceptions.AMQPError, OSError, ConnectionError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await connection.close()
            raise BrokerUnavailable(f"setting up the channels failed: {exc}") from exc
        self._set_consumers(len(sources))
        return _Connection(connection, publisher, sources)

    async def _subscribe(
        self, connection: aiormq.Connection, queue: str, prefetch: int, *, replay: bool
    ) -> Source:
        channel = await connection.channel(publisher_confirms=False)
        await channel.basic_qos(prefetch_count=prefetch)
        source = Source(channel, queue, replay=replay)
        dispatcher = self.dispatcher

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            if source.open:
                dispatcher.add(source, message)

        ok = await channel.basic_consume(queue, on_message, no_ack=False)
        source.consumer_tag = ok.consumer_tag
        return source

    async def _wait_until_closed(self, current: _Connection) -> None:
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(current.connection.closing),
            asyncio.ensure_future(current.publisher.closing),
            asyncio.ensure_future(self._stop.wait()),
        ]
        waits += [asyncio.ensure_future(s.channel.closing) for s in current.sources]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._stop.is_set() and not current.connection.is_closed:
            # Graceful stop: keep the connection until the processors have drained.
            await self._stopped_consuming.wait()

    async def _close_broker(self) -> None:
        self._stopped_consuming.set()
        current = self.current
        if current is None:
            return
        for source in current.sources:
            source.open = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(current.connection.close(), timeout=5)

    # -- processing ----------------------------------------------------------------------------

    async def _processor(self) -> None:
        while True:
            batch = await self.dispatcher.next_batch()
            if batch is None:
                return
            try:
                await self._process(batch)
            finally:
                self.dispatcher.done(batch)

    async def _process(self, batch: list[Delivery]) -> None:
        max_bytes = self.settings.max_event_bytes
        valid: list[Event] = []
        valid_at: list[int] = []
        rejected: list[tuple[int, Rejection]] = []
        for i, (_, message, _) in enumerate(batch):
            props = message.header.properties
            refusal = events.check_properties(props.content_type, props.content_encoding)
            decoded = refusal or events.decode(message.body, max_bytes)
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
        await self._ack(batch, skip=unconfirmed)
        m = self.metrics
        m.batches.inc()
        m.batch_size.observe(len(batch))
        if stored:
            m.stored.inc(stored)
        if duplicates:
            m.duplicates.inc(duplicates)
        if oldest is not None:
            m.lag_seconds.observe(max(now - oldest, 0.0))

    async def _ingest(self, valid: list[Event], batch: list[Delivery]) -> store.IngestResult | None:
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
                await self._sleep(_backoff(attempt, self.settings.retry_max_seconds), hard=True)
                attempt += 1
                continue
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self._database_up()
            return result

    async def _dead_letter(
        self, batch: list[Delivery], rejected: list[tuple[int, Rejection]]
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
                await self._sleep(_backoff(attempt, self.settings.retry_max_seconds), hard=True)
                attempt += 1
                continue
            results = await asyncio.gather(
                *(self._publish_dead(current, batch[i][1], r, failed_at) for i, r in todo),
                return_exceptions=True,
            )
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
                await self._sleep(_backoff(attempt, self.settings.retry_max_seconds), hard=True)
                attempt += 1

    async def _publish_dead(
        self,
        current: _Connection,
        message: aiormq.abc.DeliveredMessage,
        rejection: Rejection,
        failed_at: str,
    ) -> None:
        props = message.header.properties
        frame = deliver_frame(message)
        headers = dict(props.headers or {})
        headers.update(
            {
                "x-error-reason": rejection.reason,
                "x-error-detail": rejection.detail[:1000],
                "x-failed-at": failed_at,
                "x-worker-version": __version__,
                "x-original-exchange": frame.exchange or "",
                "x-original-routing-key": frame.routing_key or "",
            }
        )
        copy = _copy_properties(props, headers)
        await broker.publish(
            current.publisher,
            message.body,
            exchange=self.topology.dead_letter_exchange,
            routing_key=frame.routing_key or broker.LIVE_ROUTING_KEY,
            props=copy,
            mandatory=True,
        )
        log.warning(
            "event rejected: %s",
            rejection.reason,
            extra={
                "event_id": props.message_id,
                "reason": rejection.reason,
                "detail": rejection.detail,
                "routing_key": frame.routing_key,
            },
        )

    async def _ack(self, batch: list[Delivery], *, skip: set[int]) -> None:
        by_source: dict[Source, list[int]] = {}
        for i, (source, message, _) in enumerate(batch):
            if i not in skip:
                by_source.setdefault(source, []).append(deliver_frame(message).delivery_tag or 0)
        for source, tags in by_source.items():
            if not source.open:
                continue  # that channel is gone: never ack on another one
            mark = source.complete(tags)
            if mark is None:
                continue
            try:
                await source.channel.basic_ack(mark, multiple=True)
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError):
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


def _copy_properties(
    props: spec.Basic.Properties, headers: dict[str, Any]
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=None,  # a dead letter must not expire
        message_id=props.message_id,
        timestamp=props.timestamp,
        message_type=props.message_type,
        user_id=None,  # the broker checks user_id against the publishing user
        app_id=props.app_id,
    )


def _backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter: ~0.1, 0.2, 0.4 ... seconds, capped, times 0.5-1."""
    delay: float = min(cap, BACKOFF_BASE_SECONDS * 2.0 ** min(attempt, 30))
    return delay * random.uniform(0.5, 1.0)


@contextlib.contextmanager
def _signal_handlers(
    loop: asyncio.AbstractEventLoop, handler: Callable[[int], None]
) -> Iterator[None]:
    """Install SIGTERM and SIGINT handlers for the duration; restore the old ones after."""
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, handler, int(sig))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
