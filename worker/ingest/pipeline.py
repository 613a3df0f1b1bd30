"""One batch, from deliveries to settled: the only place that decides acknowledgements.

::

    deliveries ─► intake: what the message itself says (no body read yet)
                    body over half the byte budget      ─► refused unread (basic.reject:
                    (PROMPTER_MAX_HELD_BYTES / 2)           the queue dead-letters it)
                    properties that do not parse        ─► invalid_properties
                    delivered PROMPTER_DELIVERY_LIMIT
                      times without being settled       ─► delivery_limit
                    content type or encoding not JSON   ─► unsupported_content_type
               ─► decode + validate (worker.events)     ─► the contract's reasons
               ─► Store.ingest, one transaction          ─► unknown_template, ...
                    (retried while the database fails; consumers held meanwhile)
               ─► dead-letter copies, confirmed (worker.ingest.deadletter)
               ─► settle: ack what is committed or dead-lettered, reject what is refused
                  unread, leave the rest unacked (its channel closed: the broker
                  redelivers it)

Every delivery of a batch ends in exactly one of those three. The delivery limit is
counted by the worker itself, from the broker's counters (``worker.amqp.protocol.Delivery``):
RabbitMQ before 4.3 counts every return in ``x-delivery-count`` and dead-letters a message
returned more than the queue's ``x-delivery-limit`` times; 4.3 and later count only
explicit failures there and every acquisition in ``x-acquired-count``, so a message that
crashes the worker might never reach the queue's limit. The worker dead-letters a delivery
whose previous deliveries exceed the same limit, so the protection holds on every version
(on older ones the broker gets there first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from worker import events, tracing
from worker.amqp.frames import Malformed
from worker.amqp.protocol import AMQPError, Delivery
from worker.config import Settings
from worker.errors import Rejection, TransientError
from worker.events import Event
from worker.ingest.acks import Source
from worker.ingest.batching import Dispatcher, Held
from worker.ingest.database import DatabaseHealth
from worker.ingest.deadletter import DeadLetters
from worker.ingest.session import Session
from worker.metrics import Metrics
from worker.retry import Backoff
from worker.store import ingest as store

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)


class Pipeline:
    """Processes batches (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: store.Store,
        session: Session,
        dispatcher: Dispatcher,
        dead_letters: DeadLetters,
        database: DatabaseHealth,
        metrics: Metrics,
        forced: asyncio.Event,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer  # None: tracing off, no span and no header read
        self._link_limit = tracing.link_limit()
        self.store = store
        self.session = session
        self.dispatcher = dispatcher
        self.dead_letters = dead_letters
        self.database = database
        self.metrics = metrics
        self.forced = forced
        self.backoff = Backoff(cap=settings.retry_max_seconds)

    async def process(self, batch: list[Held]) -> None:
        if self.tracer is None:
            await self._process(batch, None)
            return
        from opentelemetry.trace import SpanKind  # noqa: PLC0415 - tracing is on

        queues = sorted({h.source.queue for h in batch})
        links = tracing.links((h.delivery.header for h in batch), self._link_limit)
        with self.tracer.start_as_current_span(
            tracing.BATCH,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": ",".join(queues),
                "messaging.batch.message_count": len(batch),
                "prompter.links": len(links),
            },
            record_exception=False,  # an exception's message may quote the data
            set_status_on_exception=False,
        ) as span:
            await self._process(batch, span)

    async def _process(self, batch: list[Held], span: Span | None) -> None:
        now = datetime.now(UTC)
        valid: list[Event] = []
        valid_at: list[int] = []
        rejected: list[tuple[int, Rejection]] = []
        unread: set[int] = set()
        for i, held in enumerate(batch):
            verdict = intake(held.delivery, self.settings, now)
            if verdict is None:
                unread.add(i)
            elif isinstance(verdict, Event):
                valid.append(verdict)
                valid_at.append(i)
            else:
                rejected.append((i, verdict))
        ingested = (
            await self._ingest(valid, batch) if valid else (store.IngestResult(outcomes=[]), 0.0)
        )
        if ingested is None:  # abandoned: its channels closed, or a forced stop
            if span is not None:
                span.set_attribute("prompter.abandoned", True)
            return
        result, commit_seconds = ingested
        stored = duplicates = 0
        oldest: float | None = None
        for j, outcome in enumerate(result.outcomes):
            if outcome is store.Outcome.STORED:
                stored += 1
                at = valid[j].occurred_at.timestamp()
                oldest = at if oldest is None or at < oldest else oldest
            elif outcome is store.Outcome.DUPLICATE:
                duplicates += 1
            else:
                rejected.append((valid_at[j], outcome))
        unconfirmed: set[int] = set()
        if rejected:
            with tracing.span(
                self.tracer, tracing.DEAD_LETTER, {"prompter.rejected": len(rejected)}
            ):
                unconfirmed = await self.dead_letters.publish(batch, rejected)
        self.settle(batch, skip=unconfirmed, unread=unread)
        m = self.metrics
        m.batches.inc()
        m.batch_size.observe(len(batch))
        if stored:
            m.stored.inc(stored)
        if duplicates:
            m.duplicates.inc(duplicates)
        if oldest is not None:
            m.lag_seconds.observe(max(time.time() - oldest, 0.0))
        sizes = [h.delivery.size for h in batch]
        m.bytes.inc(sum(sizes))
        self.session.adapt_prefetch(sizes)
        if span is not None:
            span.set_attributes(
                {
                    "prompter.events": len(valid),
                    "prompter.bytes": sum(sizes),
                    "prompter.stored": stored,
                    "prompter.duplicates": duplicates,
                    "prompter.rejected": len(rejected) + len(unread),
                    "prompter.commit_seconds": commit_seconds,
                }
            )

    async def _ingest(
        self, valid: list[Event], batch: list[Held]
    ) -> tuple[store.IngestResult, float] | None:
        """Ingest, retrying transient faults: the result and the seconds its transaction
        took; None if the batch was abandoned."""
        attempt = 0
        while True:
            if all(not h.source.open for h in batch):
                return None
            started = time.perf_counter()
            try:
                result = await self.store.ingest(valid)
            except TransientError as exc:
                await self.database.failed(exc, batch=len(batch), attempt=attempt + 1)
                if self.forced.is_set():
                    return None
                try:
                    async with asyncio.timeout(self.backoff.delay(attempt)):
                        await self.forced.wait()
                    return None
                except TimeoutError:
                    attempt += 1
                    continue
            took = time.perf_counter() - started
            self.metrics.commit_seconds.observe(took)
            await self.database.succeeded()
            return result, took

    def settle(self, batch: list[Held], *, skip: set[int], unread: set[int]) -> None:
        """The ack decision: ack every delivery of ``batch`` but those in ``skip`` (left
        unacked) and ``unread`` (rejected without requeue: the queue dead-letters them)."""
        by_source: dict[Source, list[int]] = {}
        for i, held in enumerate(batch):
            if i in skip:
                continue
            source, tag = held.source, held.delivery.delivery_tag
            if i in unread:
                self._refuse_unread(source, held.delivery)
                continue
            by_source.setdefault(source, []).append(tag)
        for source, tags in by_source.items():
            connection = source.connection
            if not source.open or connection is None:
                continue  # that channel is gone: never ack on another one
            mark = source.complete(tags)
            # A suspect holds the watermark back, maybe across crashes: ack what completed
            # behind it one by one, or a crasher takes it to the delivery limit with itself.
            behind = (
                source.settle_stranded() if source.completed and self.dispatcher.suspects else []
            )
            try:
                if mark is not None:
                    connection.ack(source.channel, mark, multiple=True)
                for tag in behind:
                    connection.ack(source.channel, tag, multiple=False)
            except AMQPError:
                source.open = False  # redelivered by the broker; idempotent ingestion

    def _refuse_unread(self, source: Source, delivery: Delivery) -> None:
        connection = source.connection
        if not source.open or connection is None:
            return
        try:
            connection.reject(source.channel, delivery.delivery_tag, requeue=False)
        except AMQPError:
            source.open = False
            return
        source.settle_alone(delivery.delivery_tag)
        self.metrics.rejected.labels(reason=events.PAYLOAD_TOO_LARGE).inc()
        log.warning(
            "event rejected unread: %s",
            events.PAYLOAD_TOO_LARGE,
            extra={
                "event_id": delivery.message_id,
                "reason": events.PAYLOAD_TOO_LARGE,
                "detail": f"body is {delivery.oversize} bytes, more than half the byte budget "
                f"(PROMPTER_MAX_HELD_BYTES): rejected to the queue's dead-lettering unread",
                "routing_key": delivery.routing_key,
            },
        )


def intake(delivery: Delivery, settings: Settings, now: datetime) -> Event | Rejection | None:
    """An event, a rejection, or None: refused unread (a body too large to hold)."""
    if delivery.oversize:
        return None
    if delivery.invalid is not None:
        return _invalid_properties(delivery.invalid)
    if delivery.delivery_count > settings.delivery_limit:
        return Rejection(
            events.DELIVERY_LIMIT,
            f"delivered {delivery.delivery_count + 1} times without being settled (each "
            "time the worker holding it stopped): dead-lettered unprocessed, in case it is "
            "what stops the workers",
        )
    if not delivery.plain_json:
        try:
            props = delivery.properties
        except Malformed as exc:
            return _invalid_properties(str(exc))
        refusal = events.check_properties(
            props.text("content_type"), props.text("content_encoding")
        )
        if refusal is not None:
            return refusal
    return events.decode(
        delivery.body,
        settings.max_event_bytes,
        max_future_seconds=settings.max_future_seconds,
        now=now,
    )


def _invalid_properties(why: str) -> Rejection:
    return Rejection(events.INVALID_PROPERTIES, f"the message properties cannot be read: {why}")
