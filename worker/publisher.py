"""Publishing prompt run events: the library other Python services import.

::

    from worker.publisher import Publisher

    async with Publisher("amqp://user:pass@rabbitmq/") as publisher:
        await publisher.publish(event)               # one event: a dict, or JSON bytes
        await publisher.publish_many(more_events)    # many, confirms pipelined

Every event is checked against the v1 contract (:func:`worker.events.decode`, the worker's
own decoder) before anything is sent: an invalid event raises
:class:`~worker.errors.Rejection` with its machine ``reason`` and a ``detail`` naming the
field, and nothing invalid ever reaches the broker. Each message is persistent,
``application/json``, ``mandatory``, with ``message_id`` = ``event_id``, and counts as
published only once the broker has confirmed it. Failures raise, from the tree in
:mod:`worker.errors`:

- :class:`~worker.errors.UnroutableError`: the broker returned the message (no queue is
  bound for the routing key) or the exchange does not exist;
- :class:`~worker.errors.PublishError`: the broker nacked it (a full queue refuses
  publishes), or no confirm came within ``confirm_timeout``; the next send goes out on a
  new channel;
- :class:`~worker.errors.BrokerUnavailable`: no node could be reached, or the connection
  was lost before the confirm (the next call reconnects);
- :class:`~worker.errors.ConfigError`: the topology exists with other arguments, or (with
  ``declare=False``) does not exist.

A failed publish may still have reached the queue (the confirm was lost with the
connection): publish it again. Ingestion is idempotent by ``event_id``, so a repeat stores
nothing twice.

The topology (:class:`worker.broker.Topology`) is declared on connect, idempotently, so
publishers and workers may start in any order; with ``declare=False`` it is only checked.

**Pipelining.** :meth:`Publisher.publish_many` (and the lower-level :meth:`Publisher.send`)
keep up to ``window`` messages awaiting their confirm instead of one round trip per
message; ``bench/publish.py`` measures both and chose :data:`DEFAULT_WINDOW`.

**Why aiormq and not aio-pika.** The worker already speaks aiormq directly, and this module
reuses its pieces unchanged: :func:`worker.broker.connect` (cluster URL lists, masked
passwords) and :func:`worker.broker.open_topology` both work on aiormq connections. aiormq
also gives the confirm of each publish as a future, which is all a window of outstanding
confirms needs, with no per-message ``Message`` object or robust-connection machinery on the
hot path: the publisher's CPU per message is what bounds its rate on a small machine. One
AMQP client in the code base means one set of failure modes to map onto
:mod:`worker.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import aiormq
import aiormq.abc
import aiormq.exceptions
import orjson
from pamqp import commands as spec

from worker import broker, events
from worker.config import Settings
from worker.errors import (
    BrokerUnavailable,
    PublishError,
    Rejection,
    UnroutableError,
    WorkerError,
)
from worker.events import Event

log = logging.getLogger(__name__)

#: Messages awaiting their confirm at once. Measured with ``python -m bench --only publish``
#: (bench/publish.py) on a local broker: throughput rises steeply from 1 to a few dozen
#: outstanding confirms and is flat from there to thousands. 256 leaves room for the longer
#: round trips of a replicated cluster, for at most 256 events held in memory.
DEFAULT_WINDOW: Final = 256
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0
CONTENT_TYPE: Final = "application/json"
BROKER_ERRORS: Final = (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError)

EventInput = Mapping[str, Any] | bytes | bytearray | memoryview


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
    """
    if isinstance(event, (bytes, bytearray, memoryview)):
        body = bytes(event)
    elif isinstance(event, Mapping):
        try:
            body = orjson.dumps(event if isinstance(event, dict) else dict(event))
        except TypeError as exc:
            raise Rejection(
                events.INVALID_JSON, f"the event cannot be written as JSON: {exc}"
            ) from None
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
    is used, and a lost connection is re-established by the next call.
    """

    def __init__(
        self,
        amqp_url: str,
        topology: broker.Topology | None = None,
        *,
        declare: bool = True,
        window: int = DEFAULT_WINDOW,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        max_event_bytes: int = events.DEFAULT_MAX_EVENT_BYTES,
        name: str = "prompter-publisher",
        app_id: str | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.amqp_url = amqp_url
        self.topology = topology or broker.Topology.from_settings(Settings())
        self.declare = declare
        self.window = window
        self.confirm_timeout = confirm_timeout
        self.max_event_bytes = max_event_bytes
        self.name = name
        self.app_id = app_id or name
        self._connection: aiormq.Connection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._slots = asyncio.Semaphore(window)
        self._outstanding: set[asyncio.Task[None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._by_id: dict[str, asyncio.Task[None]] = {}
        self._opening = asyncio.Lock()
        self._next_node = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Publisher:
        """A publisher on the broker, names and limits of ``settings``."""
        kwargs.setdefault("declare", settings.declare)
        kwargs.setdefault("max_event_bytes", settings.max_event_bytes)
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
        """Connect (if not connected) and declare or check the topology."""
        await self._ready_channel()

    async def close(self, *, grace: float | None = None) -> None:
        """Wait for the confirms still outstanding (up to ``grace`` seconds, by default
        ``confirm_timeout``), then close. Publishes not confirmed by then fail with
        BrokerUnavailable."""
        wait = self.confirm_timeout if grace is None else grace
        if self._outstanding and wait > 0:
            await asyncio.wait(set(self._outstanding), timeout=wait)
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=10)
        for task in set(self._retiring):  # their channels closed with the connection
            task.cancel()

    @property
    def outstanding(self) -> int:
        """Messages sent and not yet confirmed (or failed)."""
        return len(self._outstanding)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self, event: EventInput, *, routing_key: str = broker.LIVE_ROUTING_KEY
    ) -> str:
        """Validate, publish and wait for the broker's confirm; return the event id."""
        prepared = prepare(event, max_bytes=self.max_event_bytes)
        await (await self.send(prepared, routing_key=routing_key))
        return prepared.event_id

    async def publish_many(
        self, events_: Iterable[EventInput], *, routing_key: str = broker.LIVE_ROUTING_KEY
    ) -> int:
        """Validate every event, then publish them all with pipelined confirms; return how
        many were confirmed (all of them).

        Validation comes first: if any event is invalid, :class:`Rejection` is raised
        naming its position (``event #i``, from 0) and nothing at all is sent. If a publish
        fails, no further event is sent, the confirms already outstanding are awaited, and
        the first failure is raised, saying how many were confirmed; publishing the same
        events again is safe.
        """
        prepared = []
        for i, event in enumerate(events_):
            try:
                prepared.append(prepare(event, max_bytes=self.max_event_bytes))
            except Rejection as exc:
                raise Rejection(exc.reason, f"event #{i}: {exc.detail}") from None
        futures: list[asyncio.Future[None]] = []
        failed: list[BaseException] = []

        def note(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                failed.append(future.exception())  # type: ignore[arg-type]

        try:
            for p in prepared:
                if failed:
                    break
                future = await self.send(p, routing_key=routing_key)
                future.add_done_callback(note)
                futures.append(future)
        except WorkerError as exc:
            failed.append(exc)
        results = await asyncio.gather(*futures, return_exceptions=True)
        confirmed = sum(1 for r in results if not isinstance(r, BaseException))
        if failed:
            first = failed[0]
            if isinstance(first, WorkerError) and not isinstance(first, Rejection):
                raise type(first)(
                    f"{confirmed} of {len(prepared)} events confirmed; then: {first}"
                ) from first
            raise first
        return confirmed

    async def send(
        self, prepared: Prepared, *, routing_key: str = broker.LIVE_ROUTING_KEY
    ) -> asyncio.Future[None]:
        """Send one prepared event without waiting for its confirm; return a future that
        resolves when the broker confirms it, or raises as :meth:`publish` does.

        Waits first while ``window`` messages are outstanding; that wait is the
        back-pressure. Raises :class:`BrokerUnavailable` (or :class:`ConfigError`) right
        away if no channel can be opened. The same event id is never in flight twice: a
        repeat waits for the first copy to settle (returned messages are matched by id).
        """
        while (earlier := self._by_id.get(prepared.event_id)) is not None:
            await asyncio.wait([earlier])
        await self._slots.acquire()
        try:
            channel = await self._ready_channel()
        except BaseException:
            self._slots.release()
            raise
        task = asyncio.get_running_loop().create_task(self._publish(channel, prepared, routing_key))
        self._outstanding.add(task)
        self._by_id[prepared.event_id] = task
        task.add_done_callback(lambda t: self._settled(t, prepared.event_id))
        return task

    async def flush(self) -> None:
        """Wait until every message sent so far is confirmed or has failed."""
        while self._outstanding:
            await asyncio.wait(set(self._outstanding))

    def _settled(self, task: asyncio.Task[None], event_id: str) -> None:
        self._slots.release()
        self._outstanding.discard(task)
        if self._by_id.get(event_id) is task:
            del self._by_id[event_id]
        if not task.cancelled():
            task.exception()  # retrieved here too: a caller may drop the future

    async def _publish(
        self, channel: aiormq.abc.AbstractChannel, prepared: Prepared, routing_key: str
    ) -> None:
        props = spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=2,
            message_id=prepared.event_id,
            app_id=self.app_id,
            timestamp=datetime.now(UTC),
        )
        try:
            await publish_confirmed(
                channel,
                prepared.body,
                exchange=self.topology.exchange,
                routing_key=routing_key,
                props=props,
                confirm_timeout=self.confirm_timeout,
            )
        except PublishError:
            self._retire(channel)
            raise

    def _retire(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Send nothing more on a channel that nacked or never confirmed: the next send
        opens a new one. RabbitMQ 3.10 nacks every publish to a quorum queue, for the life of
        the channel, once the channel's first publish to it met a leader that had just died
        (the queue record still named it); a new channel looks the leader up again. The old
        channel is closed once the publishes still in flight on it have settled."""
        if self._channel is not channel:
            return
        self._channel = None
        inflight = self._outstanding - {asyncio.current_task()}

        async def close_when_settled() -> None:
            if inflight:
                await asyncio.wait(inflight, timeout=self.confirm_timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), timeout=10)

        task = asyncio.get_running_loop().create_task(close_when_settled())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _ready_channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._opening:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            connection = self._connection
            if connection is None or connection.is_closed:
                connection = await broker.connect(
                    self.amqp_url, name=self.name, start=self._next_node
                )
                self._next_node += 1
                self._connection = connection
                try:
                    await broker.open_topology(connection, self.topology, passive=not self.declare)
                except BaseException as exc:
                    self._connection = None
                    with contextlib.suppress(Exception):
                        await connection.close()
                    if isinstance(exc, BROKER_ERRORS):
                        raise BrokerUnavailable(
                            f"declaring the topology failed: {type(exc).__name__}: {exc}"
                        ) from None
                    raise
            try:
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            except BROKER_ERRORS as exc:
                raise BrokerUnavailable(
                    f"cannot open a channel to RabbitMQ: {type(exc).__name__}: {exc}"
                ) from None
            return self._channel


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
    and ``on_return_raises=True``, and wait for its confirm; every failure is mapped onto
    :mod:`worker.errors` (see the module docstring). ``props.message_id`` must be set and
    unique among the messages in flight on the channel: returns are matched by it."""
    what = f"message {props.message_id}"
    try:
        confirmation = await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=props,
            mandatory=True,
            timeout=confirm_timeout,
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
    except BROKER_ERRORS as exc:
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
