"""The public :class:`Publisher`: connecting and closing for good, publishing one event or
many, and the window of messages awaiting their confirm (by count and by bytes). The
contract it keeps (what raises what, the deadline, close) is :mod:`worker.publisher`'s.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import aiormq.abc

from worker import events, tracing
from worker.amqp import broker
from worker.config import Settings
from worker.errors import (
    BrokerUnavailable,
    ConfigError,
    PublishError,
    Rejection,
    UnroutableError,
    WorkerError,
)
from worker.publisher.connection import CLOSE_TIMEOUT, Connector, closed_error
from worker.publisher.inflight import InFlight, Tally, publish_one, traced
from worker.publisher.prepare import EventInput, Prepared, prepare

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

#: Messages awaiting their confirm at once. Measured with ``python -m bench --only publish``
#: (bench/publish.py) on a local broker: throughput rises steeply from 1 to a few dozen
#: outstanding confirms and is flat from there to thousands. 256 leaves room for the longer
#: round trips of a replicated cluster, for at most 256 events held in memory.
DEFAULT_WINDOW: Final = 256
#: Bytes of message bodies awaiting their confirm at once (besides ``window``): a window of
#: 256 events of 16 MiB would otherwise hold 4 GiB.
DEFAULT_BYTES_IN_FLIGHT: Final = 64 * 1_048_576
#: The deadline of one publish: window slot, connection and confirm together.
DEFAULT_TIMEOUT: Final = 30.0


class Publisher:
    """Publishes events to the topic exchange with publisher confirms. Use as an async
    context manager, or call :meth:`connect` and :meth:`close`.

    ``amqp_url`` may list the nodes of a cluster, comma-separated; the first that answers
    is used, and a lost connection is re-established by the next call. ``timeout`` is each
    message's deadline (window slot, connection, confirm); ``connect_timeout`` bounds one
    connection attempt to one node (and the topology declaration after it).
    """

    def __init__(
        self,
        amqp_url: str,
        topology: broker.Topology | None = None,
        *,
        declare: bool = True,
        window: int = DEFAULT_WINDOW,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = broker.CONNECT_TIMEOUT_SECONDS,
        max_event_bytes: int = events.DEFAULT_MAX_EVENT_BYTES,
        max_bytes_in_flight: int = DEFAULT_BYTES_IN_FLIGHT,
        name: str = "prompter-publisher",
        app_id: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeout and connect_timeout must be positive")
        self.amqp_url = amqp_url
        self.topology = topology or broker.Topology.from_settings(Settings())
        self.declare = declare
        self.window = window
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_event_bytes = max_event_bytes
        self.max_bytes_in_flight = max_bytes_in_flight
        self.name = name
        self.app_id = app_id or name
        # With tracing on (worker.tracing.current(), or a tracer given), each message gets
        # a PRODUCER span and carries its context in W3C traceparent/tracestate headers.
        self.tracer = tracer if tracer is not None else tracing.current()
        self._link = Connector(
            amqp_url,
            self.topology,
            declare=declare,
            timeout=timeout,
            connect_timeout=connect_timeout,
            name=name,
        )
        self._slots = asyncio.Semaphore(window)
        self._bytes_in_flight = 0
        self._bytes_freed = asyncio.Event()
        # Each message in flight: its task, and the future its sender awaits.
        self._outstanding: dict[asyncio.Task[None], InFlight] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Publisher:
        """A publisher on the broker, names and limits of ``settings``."""
        kwargs.setdefault("declare", settings.declare)
        kwargs.setdefault("max_event_bytes", settings.max_event_bytes)
        kwargs.setdefault("max_bytes_in_flight", settings.max_held_bytes)
        return cls(settings.amqp_url, broker.Topology.from_settings(settings), **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Publisher:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (if not connected) and declare or check the topology, within
        ``timeout``."""
        await self._link.channel_by(asyncio.get_running_loop().time() + self.timeout)

    async def close(self, *, grace: float | None = None) -> None:
        """Close for good. Publishing stops at once (later calls raise
        :class:`BrokerUnavailable`); the confirms in flight get up to ``grace`` seconds (by
        default ``timeout``); then whatever is still unconfirmed, or waiting for a window
        slot or the connection, fails with BrokerUnavailable, and the connection closes."""
        self._link.shut()
        wait = self.timeout if grace is None else grace
        if self._outstanding and wait > 0:
            await asyncio.wait(set(self._outstanding), timeout=wait)
        await self._link.stop_opening()
        for task, flight in list(self._outstanding.items()):
            flight.fail(closed_error(f"before message {flight.event_id} was confirmed"))
            task.cancel()
        if self._outstanding:
            await asyncio.wait(set(self._outstanding), timeout=CLOSE_TIMEOUT)
        await self._link.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._link.closed

    @property
    def outstanding(self) -> int:
        """Messages sent and not yet confirmed (or failed)."""
        return len(self._outstanding)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self, event: EventInput, *, routing_key: str = broker.LIVE_ROUTING_KEY
    ) -> str:
        """Validate, publish and wait for the broker's confirm, all within ``timeout``;
        return the event id."""
        prepared = prepare(event, max_bytes=self.max_event_bytes)
        await (await self.send(prepared, routing_key=routing_key))
        return prepared.event_id

    async def publish_many(
        self, events_: Iterable[EventInput], *, routing_key: str = broker.LIVE_ROUTING_KEY
    ) -> int:
        """Validate every event, then publish them all with pipelined confirms; return how
        many were confirmed: all of them, or it raises.

        Validation comes first: if any event is invalid, :class:`Rejection` is raised
        naming its position (``event #i``, from 0) and nothing at all is sent. Until they
        are sent the events are held as their JSON bytes, at their exact size. If a publish
        fails (or the publisher is closed), no further event is sent, the confirms already
        outstanding are awaited, and the first failure is raised, of its own class, its
        message starting ``"N of M events confirmed; then: "``; publishing the same events
        again is safe.
        """
        pending: deque[Prepared] = deque()
        for i, event in enumerate(events_):
            try:
                pending.append(prepare(event, max_bytes=self.max_event_bytes))
            except Rejection as exc:
                raise Rejection(exc.reason, f"event #{i}: {exc.detail}") from None
        total = len(pending)
        tally = Tally()
        try:
            while pending and not tally.failures:
                future = await self.send(pending.popleft(), routing_key=routing_key)
                tally.follow(future)
        except WorkerError as exc:
            tally.failures.append(exc)
        await tally.settled()
        if tally.confirmed == total:
            return total
        first = tally.failures[0] if tally.failures else None
        said = f"{tally.confirmed} of {total} events confirmed; then: "
        if isinstance(first, (BrokerUnavailable, PublishError, UnroutableError, ConfigError)):
            raise type(first)(said + str(first)) from first
        raise BrokerUnavailable(said + (f"{type(first).__name__}: {first}" if first else "?"))

    async def send(
        self, prepared: Prepared, *, routing_key: str = broker.LIVE_ROUTING_KEY
    ) -> asyncio.Future[None]:
        """Send one prepared event without waiting for its confirm; return a future that
        resolves when the broker confirms it, or raises as :meth:`publish` does.

        Waits first while ``window`` messages are outstanding; that wait is the
        back-pressure. The message's deadline (``timeout``) starts now and covers that
        wait, the connection and the confirm. Raises :class:`BrokerUnavailable` (or
        :class:`ConfigError`) if no channel can be opened, or the publisher is closed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._link.refuse_if_closed()
        size = len(prepared.body)
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
                try:
                    # Bytes too: a message that would take those in flight past the bound
                    # waits (one alone always goes).
                    while self._bytes_in_flight and (
                        self._bytes_in_flight + size > self.max_bytes_in_flight
                    ):
                        self._bytes_freed.clear()
                        await self._bytes_freed.wait()
                except BaseException:
                    self._slots.release()
                    raise
        except TimeoutError:
            raise PublishError(
                f"message {prepared.event_id} was not sent: the messages before it were not "
                f"confirmed within {self.timeout:g}s"
            ) from None
        self._bytes_in_flight += size
        try:
            channel = await self._link.channel_by(deadline)  # refuses if closed meanwhile
        except BaseException:
            self._slots.release()
            self._release_bytes(size)
            raise
        flight = InFlight(prepared.event_id, loop.create_future(), size)
        exchange = self.topology.exchange
        headers = None
        if self.tracer is not None:
            headers = traced(
                self.tracer, prepared, flight, exchange=exchange, routing_key=routing_key
            )
        task = loop.create_task(
            publish_one(
                channel,
                prepared,
                flight,
                exchange=exchange,
                routing_key=routing_key,
                app_id=self.app_id,
                deadline=deadline,
                timeout=self.timeout,
                headers=headers,
                retire=self._retire,
            )
        )
        self._outstanding[task] = flight
        task.add_done_callback(self._settled)
        return flight.done

    async def flush(self) -> None:
        """Wait until every message sent so far is confirmed or has failed."""
        while self._outstanding:
            await asyncio.wait(set(self._outstanding))

    def _release_bytes(self, size: int) -> None:
        self._bytes_in_flight -= size
        self._bytes_freed.set()

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._slots.release()
        flight = self._outstanding.pop(task)
        self._release_bytes(flight.size)
        # Cancelled before it could say why (close() cancels): its sender learns it here.
        flight.fail(closed_error(f"before message {flight.event_id} was confirmed"))

    def _retire(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Called by the message task whose publish nacked or timed out: no more sends on
        ``channel``, closed once the other messages in flight have settled."""
        self._link.retire(channel, set(self._outstanding) - {asyncio.current_task()})
