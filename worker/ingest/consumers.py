"""Whether the session's consumers run: only while the database answers and the worker
is not stopping; started and cancelled without waiting for the broker's reply."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence

from worker.amqp import protocol as amqp
from worker.config import Settings
from worker.ingest.acks import Source
from worker.ingest.prefetch import Prefetch
from worker.metrics import Health, Metrics

log = logging.getLogger(__name__)


class ConsumerControl:
    """The consumers on one consumer connection's channels (one per :class:`Source`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        health: Health,
        metrics: Metrics,
        prefetch: Prefetch,
    ) -> None:
        self.settings = settings
        self.name = name
        self.health = health
        self.metrics = metrics
        self.prefetch = prefetch
        self.allowed = False  # the database answers: consuming is allowed
        self.running = False
        self._tags = itertools.count(1)

    def start(
        self, consumer: amqp.Connection | None, sources: Sequence[Source], *, stopping: bool
    ) -> None:
        """Consume on every source's channel, if allowed and not running already."""
        if (
            not self.allowed
            or self.running
            or consumer is None
            or consumer.closed.done()
            or stopping
        ):
            return
        try:
            for source in sources:
                tag = f"{self.name}.{source.channel}.{next(self._tags)}"
                consumer.consume_nowait(source.channel, source.queue, tag)
                source.consumer_tag = tag
        except amqp.AMQPError:
            return  # the connection is closing: the session reconnects
        self.running = True
        self.count(len(sources))
        log.info(
            "consuming",
            extra={
                "queues": [source.queue for source in sources],
                "prefetch": [self.prefetch.by_channel.get(source.channel) for source in sources],
                "max_held_bytes": self.settings.max_held_bytes,
                "db_pool_size": self.settings.db_pool_size,
                "batch_size": self.settings.batch_size,
            },
        )

    def cancel_nowait(self, consumer: amqp.Connection | None, sources: Sequence[Source]) -> None:
        """Cancel every consumer without waiting for the broker (a reply could sit behind
        deliveries while reading is paused)."""
        for connection, tag in self._stopped(consumer, sources):
            connection.cancel_nowait(tag)

    async def cancel(self, consumer: amqp.Connection | None, sources: Sequence[Source]) -> None:
        """Cancel every consumer and wait for the broker's CancelOk (each within 5 s):
        deliveries sent before it were handed over, in order, before it."""
        self.allowed = False
        for connection, tag in self._stopped(consumer, sources):
            with contextlib.suppress(amqp.AMQPError, TimeoutError):
                await connection.cancel(tag, timeout=5)

    def _stopped(
        self, consumer: amqp.Connection | None, sources: Sequence[Source]
    ) -> list[tuple[amqp.Connection, str]]:
        """Count no consumers from now on; the consumers to cancel (their tags taken from
        the sources), none if the connection is gone."""
        self.running = False
        self.count(0)
        if consumer is None or consumer.closed.done():
            return []
        tags = [source.consumer_tag for source in sources]
        for source in sources:
            source.consumer_tag = None
        return [(consumer, tag) for tag in tags if tag is not None]

    def count(self, consumers: int) -> None:
        """Report how many consumers run (readiness, and the metric)."""
        self.health.consumers = consumers
        self.metrics.consumers.set(consumers)
