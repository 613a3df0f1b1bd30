"""The worker's broker session: connections, consumers, and what flows through them.

::

    node (first of AMQP_URL that answers) ── aiormq: declare the topology, then close
      ├─ consumer connection (worker.amqp.protocol): channel 1 live queue, channel 2 replay queue,
      │    deliveries ─► Dispatcher; acks and rejects go back on the channel they came on
      └─ publishing connection (worker.amqp.protocol): channel 1 in confirm mode, dead-letter copies

Consuming and publishing use separate connections, as RabbitMQ recommends: a broker
under a resource alarm blocks the connections that publish, and a blocked consumer
connection could not acknowledge the very messages whose removal ends the alarm.

What the session controls, besides reconnecting (nodes of a cluster in turn, with the
one backoff policy):

- **consuming only while the database answers** (:meth:`allow`): after a batch fails
  for a database fault the consumers are cancelled, and after a reconnection they are
  not started, until the database is back. Deliveries the worker holds meanwhile go back
  to the queue once if the connection drops, and are not handed out again while the
  database is down: no outage, however long and however often the broker connection
  flaps, walks a valid event up to the delivery limit.
- **bytes held** (:meth:`pause_reading`): when the dispatcher holds its byte budget the
  consumer connection stops reading from the socket, and resumes when there is room. The
  prefetch count follows the average message size (:meth:`adapt_prefetch`), so the
  broker does not hand this worker far more than it can hold.
- deliveries buffered from a connection that closed are dropped, never acked on another
  one: the broker redelivers them, and ingestion is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from worker.amqp import broker
from worker.amqp import protocol as amqp
from worker.config import Settings
from worker.errors import BrokerUnavailable
from worker.ingest.acks import Source
from worker.ingest.batching import Dispatcher
from worker.ingest.connections import PUBLISH_CHANNEL, close, open_connections
from worker.ingest.consumers import ConsumerControl
from worker.ingest.prefetch import Prefetch
from worker.metrics import Health, Metrics
from worker.retry import Backoff, Retrying
from worker.security import mask_url

log = logging.getLogger(__name__)

#: Confirm channels are numbered from 1 up to this, then from 1 again (a retired one is
#: closed long before its number comes round).
MAX_PUBLISH_CHANNEL: Final = 1000


class Session:
    """The broker side of a running worker (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        *,
        name: str,
        metrics: Metrics,
        health: Health,
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.name = name
        self.metrics = metrics
        self.health = health
        self.stopping = stopping
        self.topology = broker.Topology.from_settings(settings)
        self.backoff = Backoff(cap=settings.retry_max_seconds)
        self.consumer: amqp.Connection | None = None
        self.publisher: amqp.Connection | None = None
        self.sources: list[Source] = []
        self.url: str | None = None
        self.connected = asyncio.Event()
        self.drained = asyncio.Event()  # set by the worker once what was held is settled
        self._next_node = 0
        self.prefetch = Prefetch(settings)
        self.consuming = ConsumerControl(
            settings, name=name, health=health, metrics=metrics, prefetch=self.prefetch
        )
        self.publish_channel = PUBLISH_CHANNEL
        self._retiring: set[asyncio.Task[None]] = set()
        self._retrying = Retrying(
            failing="broker unavailable", recovered="broker available again", logger=log
        )
        dispatcher.on_full = self.pause_reading
        dispatcher.on_room = self.resume_reading

    # -- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        """Connect, consume, reconnect; until the worker stops. Raises ConfigError for a
        topology the broker refuses (the worker exits 2)."""
        attempt = 0
        connected_before = False
        while not self.stopping.is_set():
            try:
                await self._connect()
            except BrokerUnavailable as exc:
                self.health.problems["broker"] = str(exc)
                self.metrics.retries.labels(kind="BrokerUnavailable").inc()
                self._retrying.failed(exc)
                self._next_node += 1
                await self._back_off(self.backoff.delay(attempt))
                attempt += 1
                continue
            attempt = 0
            self.health.broker_connected = True
            self.health.problems.pop("broker", None)
            if connected_before:
                self.metrics.reconnects.labels(server="broker").inc()
            self._retrying.succeeded()
            log.info(
                "%s to the broker at %s%s",
                "reconnected" if connected_before else "connected",
                mask_url(self.url or ""),
                "" if self.consuming.allowed else "; not consuming until the database answers",
            )
            connected_before = True
            self._consume_if_allowed()
            reason = await self._wait_until_closed()
            if reason == "stopping":
                # A graceful stop: keep the channels until what they hold is acked.
                await self._wait_until_closed(self.drained)
                return
            self._lost(reason)
            await close(self.consumer, self.publisher)
            self._next_node += 1

    async def _connect(self) -> None:
        """Both connections to the next node that answers (:mod:`worker.ingest.connections`)."""
        opened = await open_connections(
            self.settings,
            self.topology,
            self.dispatcher,
            self.prefetch,
            name=self.name,
            node=self._next_node,
        )
        consumer = opened.consumer
        self.url, self.consumer, self.publisher = opened.url, consumer, opened.publisher
        self.sources = opened.sources
        self.publish_channel = PUBLISH_CHANNEL
        self.consuming.running = False
        if self.dispatcher.full:
            consumer.pause()
        self.connected.set()

    async def _wait_until_closed(self, until: asyncio.Event | None = None) -> str:
        """Wait until a connection closes (its reason) or ``until`` is set (default: the
        worker stopping; "stopping")."""
        consumer, publisher = self.consumer, self.publisher
        assert consumer is not None
        assert publisher is not None
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(_settled(consumer.closed)),
            asyncio.ensure_future(_settled(publisher.closed)),
            asyncio.ensure_future((until or self.stopping).wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        for connection in (consumer, publisher):
            if connection.closed.done():
                exc = connection.closed.exception()
                return str(exc) if exc else "closed"
        return "stopping"

    def _lost(self, reason: str) -> None:
        """The session ended: forget what its channels held (the broker redelivers it)."""
        self.connected.clear()
        self.health.broker_connected = False
        self.consuming.running = False
        self.consuming.count(0)
        dropped = 0
        for source in self.sources:
            source.open = False
            dropped += self.dispatcher.drop(source)
        if dropped:
            self.metrics.dropped.inc(dropped)
        if not self.stopping.is_set():
            self.health.problems["broker"] = f"connection lost: {reason}"
            log.warning(
                "broker connection lost (%s); %d buffered deliveries dropped (redelivered later)",
                reason,
                dropped,
            )

    async def close(self) -> None:
        """Close both connections (each with a timeout); their channels are done with."""
        self.drained.set()
        for source in self.sources:
            source.open = False
        self.connected.clear()
        await close(self.consumer, self.publisher)

    # -- consuming ---------------------------------------------------------------------

    async def allow(self, allowed: bool) -> None:
        """Consume (True: the database answers) or stop taking deliveries (False). Never
        waits for the broker: it is called from a batch, and a reply could sit behind
        deliveries while reading is paused at the byte budget."""
        if allowed == self.consuming.allowed:
            return
        self.consuming.allowed = allowed
        if allowed:
            log.info("the database answers")
            self._consume_if_allowed()
        else:
            self.consuming.cancel_nowait(self.consumer, self.sources)
            log.warning("the database is unavailable: consumers cancelled until it answers")

    async def stop_consuming(self) -> None:
        """Stop the broker sending more (a graceful stop); what is held is still processed.
        Deliveries sent before the CancelOk were handed over, in order, before it."""
        await self.consuming.cancel(self.consumer, self.sources)

    def _consume_if_allowed(self) -> None:
        self.consuming.start(self.consumer, self.sources, stopping=self.stopping.is_set())

    # -- bytes held --------------------------------------------------------------------

    def pause_reading(self) -> None:
        if self.consumer is not None:
            self.consumer.pause()
        self.metrics.reading_paused.set(1)

    def resume_reading(self) -> None:
        if self.consumer is not None:
            self.consumer.resume()
        self.metrics.reading_paused.set(0)

    def adapt_prefetch(self, sizes: list[int]) -> None:
        """Follow the average message size of the batches (see the module docstring)."""
        self.prefetch.adapt(sizes, self.consumer, self.sources)

    # -- the topology, again -------------------------------------------------------------

    async def redeclare(self) -> None:
        """Declare the topology again (or check it, with PROMPTER_DECLARE=false): a
        dead-letter copy came back unroutable."""
        connection = await broker.connect(
            self.url or self.settings.amqp_url, name=f"{self.name}-declare"
        )
        try:
            await broker.open_topology(connection, self.topology, passive=not self.settings.declare)
            log.info("topology declared again after an unroutable dead-letter copy")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=5)

    def publishing(self) -> tuple[amqp.Connection, int] | None:
        """The publishing connection and its confirm channel, while connected."""
        if not self.connected.is_set() or self.publisher is None:
            return None
        return self.publisher, self.publish_channel

    async def renew_publishing(self, failed: int) -> None:
        """Publish on a new confirm channel of the same connection from now on, and close
        ``failed`` once what is in flight on it settled. RabbitMQ 3.10 nacks every publish
        to a quorum queue, for the life of a channel, once the channel's first publish to it
        met a leader that had just died (the queue record still named it); a new channel
        looks the leader up again (fixed in 3.11)."""
        publisher = self.publisher
        if failed != self.publish_channel or publisher is None or publisher.closed.done():
            return  # renewed already, or the connection is going anyway
        fresh = failed % MAX_PUBLISH_CHANNEL + 1
        await publisher.open_publisher(fresh)
        self.publish_channel = fresh
        log.info("dead-lettering on a new channel (%d) after a nack or a missing confirm", fresh)
        task = asyncio.get_running_loop().create_task(publisher.retire_publisher(failed))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _back_off(self, seconds: float) -> None:
        """Wait ``seconds`` before the next attempt; no longer once the worker stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()


async def _settled(future: asyncio.Future[None]) -> None:
    """Wait for a future to finish, however it finishes."""
    with contextlib.suppress(BaseException):
        await asyncio.shield(future)
