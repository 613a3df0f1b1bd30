"""Publishing prompt run events: the library other Python services import.

::

    from worker.publisher import Publisher, new_event_id

    async with Publisher("amqp://user:pass@rabbitmq/") as publisher:
        await publisher.publish(event)               # one event: a dict, or JSON bytes
        await publisher.publish_many(more_events)    # many, confirms pipelined

Every event is checked against the v1 contract (:func:`worker.events.decode`, the worker's
own decoder) before anything is sent: an invalid event raises
:class:`~worker.errors.Rejection` with its machine ``reason`` and a ``detail`` naming the
field, and nothing invalid ever reaches the broker. Each message is persistent,
``application/json``, ``mandatory``, with ``message_id`` = ``event_id``, and counts as
published only once the broker has confirmed it. Failures raise, from the tree in
:mod:`worker.errors`, and nothing else does (cancelling the caller aside):

- :class:`~worker.errors.UnroutableError`: the broker returned the message (no queue is
  bound for the routing key) or the exchange does not exist;
- :class:`~worker.errors.PublishError`: the broker nacked it (a full queue refuses
  publishes), or no confirm came before the publish's deadline (``timeout``); the next
  send goes out on a new channel (RabbitMQ 3.10 keeps nacking on a channel that first met a
  quorum queue's dead leader);
- :class:`~worker.errors.BrokerUnavailable`: no node could be reached (or none answered
  before the deadline), the connection was lost before the confirm (the next call
  reconnects), or the publisher is closed;
- :class:`~worker.errors.ConfigError`: the topology exists with other arguments, or (with
  ``declare=False``) does not exist.

A failed publish may still have reached the queue (the confirm was lost with the
connection): publish it again. Ingestion is idempotent by ``event_id``, so a repeat stores
nothing twice.

**One deadline per message.** ``timeout`` (default 30 s) bounds everything a publish
waits for: a window slot, the connection (shared, see below), the broker's confirm. A
broker that accepts TCP and never answers fails a publish after ``timeout`` at most, and
each connection attempt after ``connect_timeout`` per node.

**One connection attempt at a time.** Concurrent callers that find no connection wait for
the same attempt and share its outcome: against a dead broker they all fail together when
it fails, and the next call after that makes a new attempt.

**close() is final.** It waits (``grace``) for the confirms in flight, fails those still
unconfirmed and every caller still waiting (for a slot or the connection) with
BrokerUnavailable saying the publisher is closed, and closes the connection; every later
call raises the same way and nothing reconnects.

**Event ids.** :func:`new_event_id` makes time-ordered ids (UUIDv7): new rows then land at
the end of the results table's primary-key index instead of all over it. The contract
accepts any UUID.

The topology (:class:`worker.amqp.broker.Topology`) is declared on connect, idempotently, so
publishers and workers may start in any order; with ``declare=False`` it is only checked.

**Pipelining.** :meth:`Publisher.publish_many` (and the lower-level :meth:`Publisher.send`)
keep up to ``window`` messages awaiting their confirm instead of one round trip per
message; ``bench/publish.py`` measures both and chose :data:`DEFAULT_WINDOW`.

**Why aiormq and not aio-pika.** The worker already speaks aiormq directly, and this module
reuses its pieces unchanged: :func:`worker.amqp.broker.connect` (cluster URL lists, masked
passwords) and :func:`worker.amqp.broker.open_topology` both work on aiormq connections. aiormq
also gives the confirm of each publish as a future, which is all a window of outstanding
confirms needs, with no per-message ``Message`` object or robust-connection machinery on the
hot path: the publisher's CPU per message is what bounds its rate on a small machine. One
AMQP client in the code base means one set of failure modes to map onto
:mod:`worker.errors`. aiormq matches a returned message to its publish by ``message_id``;
:func:`publish_confirmed` makes that safe for any ids (see there), and
:func:`worker.logs.guard_amqp_loggers` (called on import) keeps aiormq from logging bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import aiormq
import aiormq.abc
import aiormq.exceptions
import orjson
import uuid_utils
from pamqp import commands as spec

from worker import events, logs, tracing
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
from worker.events import Event

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)
logs.guard_amqp_loggers()  # no message body in aiormq's log records, whoever set up logging

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
#: :func:`publish_confirmed`'s default (the worker's dead-letter copies, redrive).
DEFAULT_CONFIRM_TIMEOUT: Final = DEFAULT_TIMEOUT
#: How long close() waits for the broker to close the connection, and for cancelled work.
CLOSE_TIMEOUT: Final = 10.0
CONTENT_TYPE: Final = "application/json"
BROKER_ERRORS: Final = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

EventInput = Mapping[str, Any] | bytes | bytearray | memoryview


def new_event_id(at: datetime | None = None) -> str:
    """A new ``event_id``: a UUIDv7 (RFC 9562) as a canonical lowercase string.

    Its first 48 bits are the Unix time in milliseconds (now, or ``at``, which must be
    timezone-aware and not before 1970), the rest random; ids made in one process are
    strictly increasing. Time-ordered keys are appended at the right edge of the
    ``prompt_results`` primary-key index, where random (v4) keys land on any page of it, so
    that the pages an insert touches stay few and in memory as the table grows. The worker
    accepts any UUID: this is a recommendation, not a rule.
    """
    if at is None:
        return str(uuid_utils.uuid7())
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    delta = at - _EPOCH
    if delta.days < 0:
        raise ValueError("a UUIDv7 cannot hold a time before 1970")
    nanoseconds = (delta.days * 86_400 + delta.seconds) * 1_000_000_000
    return str(uuid_utils.uuid7(nanoseconds=nanoseconds + delta.microseconds * 1000))


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """An event checked against the contract and ready to send: its id and its bytes."""

    event_id: str
    body: bytes

    @classmethod
    def from_event(cls, event: Event) -> Prepared:
        """From an event :func:`worker.events.decode` accepted (its body is sent as is)."""
        return cls(event_id=event.event_id, body=event.body)


def prepare(event: EventInput, *, max_bytes: int = events.DEFAULT_MAX_EVENT_BYTES) -> Prepared:
    """Serialize (a dict, with orjson) and validate one event; raise
    :class:`~worker.errors.Rejection` if the worker would refuse it.

    Dict values may be ``str``, numbers, ``bool``, ``None``, lists, dicts, and also
    ``uuid.UUID`` and timezone-aware ``datetime`` (written as RFC 3339); a naive datetime is
    refused, since the contract needs an offset. orjson writes a float NaN or infinity as
    ``null``: send bytes to control that. Bytes are sent exactly as given.

    The body is kept at its exact size: orjson's output buffer is allocated for the worst
    case (about 16 KB for a 2 KB document), so it is copied once; ``bytes`` are kept as
    given (no copy), a ``bytearray`` or ``memoryview`` copied (it could change).
    """
    if isinstance(event, (bytes, bytearray, memoryview)):
        body = bytes(event)
    elif isinstance(event, Mapping):
        try:
            written = orjson.dumps(event if isinstance(event, dict) else dict(event))
        except TypeError as exc:
            raise Rejection(
                events.INVALID_JSON, f"the event cannot be written as JSON: {exc}"
            ) from None
        body = bytes(memoryview(written))  # exact size; ``bytes(written)`` is ``written``
    else:
        raise Rejection(
            events.NOT_AN_OBJECT,
            f"an event is a dict or JSON bytes, not {type(event).__name__}",
        )
    decoded = events.decode(body, max_bytes, columns=False)  # validated, sent as is
    if isinstance(decoded, Rejection):
        raise decoded
    return Prepared.from_event(decoded)


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
        self._connection: aiormq.Connection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._opening: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(window)
        self._bytes_in_flight = 0
        self._bytes_freed = asyncio.Event()
        # Each message in flight: its task, and the future its sender awaits.
        self._outstanding: dict[asyncio.Task[None], _InFlight] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # closing a channel that nacked
        self._closed = False
        self._next_node = 0

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
        await self._channel_by(asyncio.get_running_loop().time() + self.timeout)

    async def close(self, *, grace: float | None = None) -> None:
        """Close for good. Publishing stops at once (later calls raise
        :class:`BrokerUnavailable`); the confirms in flight get up to ``grace`` seconds (by
        default ``timeout``); then whatever is still unconfirmed, or waiting for a window
        slot or the connection, fails with BrokerUnavailable, and the connection closes."""
        self._closed = True
        wait = self.timeout if grace is None else grace
        if self._outstanding and wait > 0:
            await asyncio.wait(set(self._outstanding), timeout=wait)
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()  # it closes what it opened
            await asyncio.wait([opening], timeout=CLOSE_TIMEOUT)
        for task, flight in list(self._outstanding.items()):
            flight.fail(self._closed_error(f"before message {flight.event_id} was confirmed"))
            task.cancel()
        if self._outstanding:
            await asyncio.wait(set(self._outstanding), timeout=CLOSE_TIMEOUT)
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await _close_quietly(connection)
        for task in set(self._retiring):  # their channels closed with the connection
            task.cancel()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

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
        tally = _Tally()
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
        self._refuse_if_closed()
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
            channel = await self._channel_by(deadline)  # refuses if closed meanwhile
        except BaseException:
            self._slots.release()
            self._release_bytes(size)
            raise
        flight = _InFlight(prepared.event_id, loop.create_future(), size)
        headers = None if self.tracer is None else self._traced(prepared, routing_key, flight)
        task = loop.create_task(
            self._publish(channel, prepared, routing_key, deadline, flight, headers=headers)
        )
        self._outstanding[task] = flight
        task.add_done_callback(self._settled)
        return flight.done

    def _traced(self, prepared: Prepared, routing_key: str, flight: _InFlight) -> dict[str, Any]:
        """Start the message's PRODUCER span (a child of the caller's current span), ended
        when the message is confirmed or fails; the headers that carry its context."""
        assert self.tracer is not None
        from opentelemetry.trace import SpanKind  # noqa: PLC0415 - tracing is on

        span = self.tracer.start_span(
            f"publish {self.topology.exchange}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": self.topology.exchange,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": prepared.event_id,
                "messaging.message.body.size": len(prepared.body),
            },
        )
        headers: dict[str, Any] = {}
        tracing.inject(span, headers)
        flight.done.add_done_callback(lambda done: tracing.end(span, done))
        return headers

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
        flight.fail(self._closed_error(f"before message {flight.event_id} was confirmed"))

    async def _publish(
        self,
        channel: aiormq.abc.AbstractChannel,
        prepared: Prepared,
        routing_key: str,
        deadline: float,
        flight: _InFlight,
        *,
        headers: dict[str, Any] | None = None,
    ) -> None:
        props = spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=2,
            message_id=prepared.event_id,
            app_id=self.app_id,
            timestamp=datetime.now(UTC),
            headers=headers,
        )
        try:
            async with asyncio.timeout_at(deadline):
                await publish_confirmed(
                    channel,
                    prepared.body,
                    exchange=self.topology.exchange,
                    routing_key=routing_key,
                    props=props,
                    confirm_timeout=self.timeout,
                )
        except TimeoutError:
            self._retire(channel)
            flight.fail(
                PublishError(f"no confirm for message {prepared.event_id} within {self.timeout:g}s")
            )
        except WorkerError as exc:
            if isinstance(exc, PublishError):
                self._retire(channel)
            flight.fail(exc)
        except Exception as exc:  # publish_confirmed maps everything; never leak another
            flight.fail(BrokerUnavailable(f"publishing failed: {type(exc).__name__}: {exc}"))
        else:
            if not flight.done.done():
                flight.done.set_result(None)

    def _retire(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Send nothing more on a channel that nacked or never confirmed: the next send
        opens a new one. RabbitMQ 3.10 nacks every publish to a quorum queue, for the life of
        the channel, once the channel's first publish to it met a leader that had just died
        (the queue record still named it); a new channel looks the leader up again. The old
        channel is closed once the publishes still in flight on it have settled."""
        if self._channel is not channel:
            return
        self._channel = None
        inflight = set(self._outstanding) - {asyncio.current_task()}

        async def close_when_settled() -> None:
            if inflight:
                await asyncio.wait(inflight, timeout=self.timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), timeout=CLOSE_TIMEOUT)

        task = asyncio.get_running_loop().create_task(close_when_settled())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- connecting ------------------------------------------------------------------------

    async def _channel_by(self, deadline: float) -> aiormq.abc.AbstractChannel:
        """The open channel, connecting first if needed. Concurrent callers wait for one
        shared attempt (each until its own deadline) and share its outcome."""
        loop = asyncio.get_running_loop()
        while True:
            self._refuse_if_closed()
            channel = self._channel
            if channel is not None and not channel.is_closed:
                return channel
            opening = self._opening
            if opening is None or opening.done():
                opening = self._opening = loop.create_task(self._open())
                opening.add_done_callback(_observed)
            await asyncio.wait([opening], timeout=max(0.0, deadline - loop.time()))
            self._refuse_if_closed()
            if not opening.done():
                raise BrokerUnavailable(
                    f"not connected to RabbitMQ within {self.timeout:g}s (the publish deadline)"
                )
            if opening.cancelled():
                raise BrokerUnavailable("connecting to RabbitMQ was cancelled")
            failure = opening.exception()
            if failure is not None:
                raise _again(failure)

    async def _open(self) -> None:
        """One connection attempt: connect (unless the connection is still up), declare the
        topology, open the publishing channel. Everything it opened is closed on failure."""
        connection = self._connection
        fresh = connection is None or connection.is_closed
        if connection is None or connection.is_closed:
            self._connection = None
            connection = await broker.connect(
                self.amqp_url,
                name=self.name,
                start=self._next_node,
                timeout=self.connect_timeout,
            )
            self._next_node += 1
            self._connection = connection
        step = "declaring the topology" if fresh else "opening a channel"
        try:
            async with asyncio.timeout(self.connect_timeout):
                if fresh:
                    await broker.open_topology(connection, self.topology, passive=not self.declare)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException as exc:
            if self._connection is connection:
                self._connection = None
            await _close_quietly(connection)
            if isinstance(exc, WorkerError):
                raise
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable(
                    f"RabbitMQ did not answer within {self.connect_timeout:g}s while {step}"
                ) from None
            if isinstance(exc, Exception):
                raise BrokerUnavailable(f"{step} failed: {type(exc).__name__}: {exc}") from None
            raise
        self._channel = channel

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise self._closed_error("")

    def _closed_error(self, when: str) -> BrokerUnavailable:
        return BrokerUnavailable(" ".join(filter(None, ["the publisher was closed", when])))


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A message in flight: its id, and the future its sender awaits."""

    event_id: str
    done: asyncio.Future[None]
    size: int

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: a sender may drop its future


class _Tally:
    """Counts the confirms of publish_many without keeping its futures."""

    def __init__(self) -> None:
        self.sent = 0
        self.confirmed = 0
        self.failures: list[BaseException] = []
        self._open = 0
        self._all_settled = asyncio.Event()
        self._all_settled.set()

    def follow(self, future: asyncio.Future[None]) -> None:
        self.sent += 1
        self._open += 1
        self._all_settled.clear()
        future.add_done_callback(self._note)

    def _note(self, future: asyncio.Future[None]) -> None:
        self._open -= 1
        if future.cancelled():
            self.failures.append(BrokerUnavailable("the publish was cancelled"))
        elif (exc := future.exception()) is not None:
            self.failures.append(exc)
        else:
            self.confirmed += 1
        if not self._open:
            self._all_settled.set()

    async def settled(self) -> None:
        await self._all_settled.wait()


def _observed(task: asyncio.Task[None]) -> None:
    """Retrieve a task's exception: its waiters may all have given up on it."""
    if not task.cancelled():
        task.exception()


def _again(exc: BaseException) -> WorkerError:
    """A shared attempt's failure, as a fresh exception for one more waiter."""
    if isinstance(exc, (BrokerUnavailable, ConfigError)):
        return type(exc)(str(exc))
    return BrokerUnavailable(f"connecting failed: {type(exc).__name__}: {exc}")


async def _close_quietly(connection: aiormq.Connection) -> None:
    if connection.is_closed:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT)


# --- publishing one message -----------------------------------------------------------------

# Per channel, the message id of each publish in flight, with a future resolved when it
# settles. aiormq matches a Basic.Return to its publish by ``message_id`` (the last publish
# with that id wins, and one without an id gets a random one), so two messages in flight
# with one id could swap their outcomes: a returned message reported confirmed, lost.
_IN_FLIGHT: weakref.WeakKeyDictionary[
    aiormq.abc.AbstractChannel, dict[str | None, asyncio.Future[None]]
] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _alone(
    channel: aiormq.abc.AbstractChannel, message_id: str | None
) -> AsyncIterator[None]:
    """Hold the only place in flight on ``channel`` for ``message_id`` (None for none)."""
    in_flight = _IN_FLIGHT.get(channel)
    if in_flight is None:
        in_flight = _IN_FLIGHT[channel] = {}
    while (earlier := in_flight.get(message_id)) is not None:
        await asyncio.wait([earlier])
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    in_flight[message_id] = mine
    try:
        yield
    finally:
        del in_flight[message_id]
        mine.set_result(None)


async def publish_confirmed(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    props: spec.Basic.Properties,
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
) -> None:
    """Publish one mandatory message on a channel opened with ``publisher_confirms=True``
    and ``on_return_raises=True``, and wait for its confirm, within ``confirm_timeout``;
    every failure is raised as one of :mod:`worker.errors` (see the module docstring),
    whatever aiormq raises; only the caller's own cancellation propagates as itself.

    Correct for any ``message_id``, repeated or absent: messages that share one (all those
    without one count as sharing) are never in flight together on one channel; a later one
    waits, within its ``confirm_timeout``, until the earlier one is confirmed or returned.
    So each copy is confirmed or returned on its own, and callers need not keep ids unique.
    """
    message_id = props.message_id or None
    what = f"message {message_id}" if message_id else "a message without id"
    try:
        async with asyncio.timeout(confirm_timeout), _alone(channel, message_id):
            confirmation = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=props,
                mandatory=True,
            )
    except aiormq.exceptions.PublishError:  # a Basic.Return: before DeliveryError, its base
        raise UnroutableError(
            f"{what} was returned by the broker: no queue is bound to exchange "
            f"{exchange!r} for routing key {routing_key!r}"
        ) from None
    except aiormq.exceptions.DeliveryError:  # a Basic.Nack
        raise PublishError(f"the broker nacked {what} (is the queue full?)") from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise UnroutableError(f"exchange {exchange!r} does not exist") from None
    except TimeoutError:
        raise PublishError(f"no confirm for {what} within {confirm_timeout:g}s") from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the caller was cancelled (or its deadline passed)
        # aiormq cancelled the confirmation under us: its channel or connection closed.
        raise BrokerUnavailable(
            f"the connection to RabbitMQ was lost before {what} was confirmed"
        ) from None
    except Exception as exc:
        # Messages queued behind the one that closed the channel fail with "channel
        # closed": the channel's own close reason says what really happened.
        if isinstance(_close_reason(channel), aiormq.exceptions.ChannelNotFoundEntity):
            raise UnroutableError(f"exchange {exchange!r} does not exist") from None
        raise BrokerUnavailable(
            f"the connection to RabbitMQ was lost before {what} was confirmed "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(confirmation, spec.Basic.Nack):
        raise PublishError(f"the broker nacked {what} (is the queue full?)")


def _close_reason(channel: aiormq.abc.AbstractChannel) -> BaseException | None:
    """Why a closed channel closed, if it closed with an error."""
    if not channel.is_closed:
        return None
    closing = channel.closing
    if not closing.done() or closing.cancelled():
        closing.cancel()  # only an observer of the close
        return None
    return closing.exception()
