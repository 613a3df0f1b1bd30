"""The worker's own AMQP 0-9-1 connection, built for the least CPU per delivery and for
hostile bytes.

With aiormq, receiving a message cost more CPU than decoding, validating and storing it
(three frame objects, two asyncio queues, a future and a task per delivery); and a
general codec decodes every property as text, so one header key that is not UTF-8 broke
the whole connection. This connection does only what the worker needs, as an
:class:`asyncio.Protocol`:

- **consuming**: deliveries are parsed straight from the socket buffer with ``struct``
  and handed to a plain callback, synchronously, in order; properties stay raw bytes
  (:mod:`worker.amqp.frames`) and only what the hot path needs is looked at (content type and
  encoding, the broker's delivery counters);
- **publishing with confirms** (dead-letter copies, redrive): the message goes out with
  its original property bytes, so nothing a publisher sent is decoded and re-encoded;
  confirms and returns are matched to publishes by delivery tag and content, never by
  message id (:meth:`Connection.publish`);
- handshake (PLAIN or EXTERNAL, TLS), channels, qos, consume, cancel, ack, reject,
  heartbeats, close. Other methods are decoded and encoded with pamqp, the codec aiormq
  uses; declaring the topology stays with aiormq (:mod:`worker.amqp.broker`).

Robustness by construction: every frame's size is checked against the negotiated
``frame_max`` before it is buffered; content (header and body frames) is tracked per
channel, as the spec allows channels to interleave; a body larger than ``max_body`` is
counted, never held; and nothing raised while parsing escapes :meth:`data_received`: it
closes the connection with the reason logged (:class:`AMQPError`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast

from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import heartbeat as amqp_heartbeat
from yarl import URL

from worker.amqp.frames import Malformed, RawProperties, table_int

log = logging.getLogger(__name__)

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
DELIVER: Final = (60 << 16) | 60
ACK: Final = (60 << 16) | 80
NACK: Final = (60 << 16) | 120
RETURN: Final = (60 << 16) | 50
MAX_FRAME: Final = 131_072
#: Frame overhead: type (1), channel (2), size (4) and the end marker (1).
FRAME_OVERHEAD: Final = 8
#: RabbitMQ 4.3 counts failed deliveries in x-delivery-count and every acquisition in
#: x-acquired-count; before, x-delivery-count counted every return.
ACQUIRED_COUNT_SINCE: Final = (4, 3)

_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SIZE_FLAGS = struct.Struct(">QH")  # content header: body size, property flags
_ACK = struct.Struct(">BHIHHQBB")
_CONFIRM = struct.Struct(">QB")  # basic.ack / basic.nack: delivery tag, multiple bit
_METHOD_HEAD = struct.Struct(">BHIHH")  # frame head, class id, method id
_CONTENT_HEAD = struct.Struct(">BHI")
_HEARTBEAT = amqp_frame.marshal(amqp_heartbeat.Heartbeat(), 0)
_EXACT_JSON = b"application/json"


class AMQPError(Exception):
    """The broker closed the connection or a channel, or the peer stopped answering or
    broke the protocol."""


class Returned(AMQPError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class Nacked(AMQPError):
    """The broker refused a published message (basic.nack)."""


class Delivery:
    """One message as delivered. The hot path reads ``channel``, ``delivery_tag``,
    ``body``, ``plain_json`` and ``delivery_count``; everything else is read on demand
    from the raw frames (for dead-lettering and logging, which are rare).

    ``delivery_count`` is how many times the broker delivered the message before, read
    from its counters only when the broker marks the delivery redelivered (a publisher
    may set any header on a first delivery). ``oversize`` is the size of a body that was
    over the connection's ``max_body``: such a body is not kept (``body`` is empty).
    ``invalid`` says why the properties do not parse, or is None.
    """

    __slots__ = (
        "_header",
        "_method",
        "body",
        "channel",
        "delivery_count",
        "delivery_tag",
        "invalid",
        "oversize",
        "plain_json",
        "redelivered",
    )

    def __init__(self, channel: int, delivery_tag: int, method: bytes, redelivered: bool) -> None:
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self._method = method
        self._header = b""
        self.body = b""
        self.plain_json = True  # no content type but application/json, no content encoding
        self.delivery_count = 0
        self.oversize = 0
        self.invalid: str | None = None

    @property
    def header(self) -> bytes:
        """The content header payload exactly as received."""
        return self._header

    @property
    def properties(self) -> RawProperties:
        """Every property as raw bytes; raises :class:`~worker.amqp.frames.Malformed`."""
        return RawProperties.parse(self._header)

    def _method_fields(self) -> tuple[bytes, bytes]:
        data = self._method
        offset = 1 + data[0] + 8 + 1  # consumer tag, delivery tag, redelivered
        exchange, offset = _raw_shortstr(data, offset)
        routing_key, _ = _raw_shortstr(data, offset)
        return exchange, routing_key

    @property
    def exchange_raw(self) -> bytes:
        return self._method_fields()[0]

    @property
    def routing_key_raw(self) -> bytes:
        return self._method_fields()[1]

    @property
    def exchange(self) -> str:
        return _text(self._method_fields()[0])

    @property
    def routing_key(self) -> str:
        return _text(self._method_fields()[1])

    def text(self, name: str) -> str | None:
        """A short-string property as text for logs and checks (None if absent or if the
        properties do not parse); invalid UTF-8 is shown escaped."""
        try:
            return self.properties.text(name)
        except Malformed:
            return None

    @property
    def message_id(self) -> str | None:
        return self.text("message_id")

    @property
    def content_type(self) -> str | None:
        return self.text("content_type")

    @property
    def content_encoding(self) -> str | None:
        return self.text("content_encoding")

    @property
    def size(self) -> int:
        """Bytes this delivery holds (its body, or what an oversize body would have)."""
        return len(self.body) + len(self._header)


def _raw_shortstr(data: bytes, offset: int) -> tuple[bytes, int]:
    length = data[offset]
    end = offset + 1 + length
    return data[offset + 1 : end], end


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def verification_disabled(query: dict[str, str]) -> bool:
    """Whether an AMQP URL's query turns certificate verification off: ``no_verify_ssl``
    set to anything but ``0``, as aiormq reads it."""
    return query.get("no_verify_ssl", "0") != "0"


class _Return(NamedTuple):
    """A basic.return, read raw: its routing key is whatever the publisher gave."""

    reply: str
    exchange: bytes
    routing_key: bytes

    @classmethod
    def parse(cls, method: bytes) -> _Return:
        code = int.from_bytes(method[4:6], "big")
        text, at = _raw_shortstr(method, 6)
        exchange, at = _raw_shortstr(method, at)
        routing_key, _ = _raw_shortstr(method, at)
        return cls(f"{code} {_text(text)}", exchange, routing_key)


class _Content:
    """A message whose content (header, then body frames) is arriving on one channel."""

    __slots__ = ("channel", "delivery", "parts", "received", "returned", "size")

    def __init__(self, channel: int, delivery: Delivery | None, returned: _Return | None) -> None:
        self.channel = channel
        self.delivery = delivery
        self.returned = returned
        self.size = -1  # until the content header arrives
        self.received = 0
        self.parts: list[bytes] | None = []  # None: over max_body, counted but not kept


class _Publish:
    """A message published on a confirm channel, until the broker confirms it."""

    __slots__ = ("body", "exchange", "future", "returned", "routing_key")

    def __init__(
        self, exchange: bytes, routing_key: bytes, body: bytes, future: asyncio.Future[None]
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.future = future
        self.returned: str | None = None


class Connection(asyncio.Protocol):
    """The connection. Create with :func:`connect`; deliveries go to ``on_delivery``."""

    def __init__(
        self,
        on_delivery: Callable[[Delivery], None],
        heartbeat: int,
        *,
        max_body: int = 1 << 62,
    ) -> None:
        self.on_delivery = on_delivery
        self.heartbeat = heartbeat
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.frame_max = MAX_FRAME
        self.server_version: tuple[int, ...] = (0,)
        self.blocked: str | None = None  # why the broker blocks publishing, while it does
        self.consumers: dict[str, int] = {}
        self._buffer = bytearray()
        self._pending: dict[int, tuple[tuple[type, ...], asyncio.Future[Any]]] = {}
        self._content: dict[int, _Content] = {}
        self._unclaimed: list[tuple[int, Any]] = []
        self._published: dict[int, collections.OrderedDict[int, _Publish]] = {}
        self._next_tag: dict[int, int] = {}
        self._received = False
        self._sent = False
        self._paused = False
        self._acquired_counts = False
        self._heartbeat_task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(PROTOCOL_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(AMQPError(f"connection lost: {exc}" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:  # the hot path: every delivery passes here
        self._received = True
        if self.closed.done():
            return
        try:
            self._parse(data)
        except Exception as exc:  # whatever the peer sent, it never escapes the protocol
            self._protocol_error(f"{type(exc).__name__}: {exc}")

    def _parse(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        frame_max = self.frame_max
        unpack_head = _FRAME_HEAD.unpack_from
        unpack_method = _METHOD_ID.unpack_from
        contents = self._content
        with memoryview(buffer) as view:
            while end - offset >= 8:
                kind, channel, size = unpack_head(view, offset)
                if size > frame_max - FRAME_OVERHEAD:
                    self._protocol_error(
                        f"a frame of {size} bytes exceeds the negotiated frame_max {frame_max}"
                    )
                    return
                stop = offset + 7 + size
                if stop >= end:
                    break
                if view[stop] != FRAME_END:
                    self._protocol_error("bad frame end")
                    return
                start = offset + 7
                if kind == FRAME_BODY:
                    content = contents.get(channel)
                    if content is None or content.size < 0:
                        self._protocol_error(f"content body without a header on channel {channel}")
                        return
                    parts = content.parts
                    if content.received == 0 and size >= content.size and parts is not None:
                        content.parts = [bytes(view[start:stop])]
                    elif parts is not None:
                        parts.append(bytes(view[start:stop]))
                    content.received += size
                    if content.received >= content.size:
                        del contents[channel]
                        self._finish(content)
                elif kind == FRAME_HEADER:
                    content = contents.get(channel)
                    if content is None or content.size >= 0:
                        self._protocol_error(f"content header out of place on channel {channel}")
                        return
                    self._on_header(content, bytes(view[start:stop]))
                    if content.size == 0:
                        del contents[channel]
                        self._finish(content)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] == DELIVER:
                    if channel in contents:
                        self._protocol_error(f"a delivery interrupts content on channel {channel}")
                        return
                    method = bytes(view[start + 4 : stop])
                    tag_at = 1 + method[0]  # after the consumer tag
                    delivery = Delivery(
                        channel,
                        _U64.unpack_from(method, tag_at)[0],
                        method,
                        bool(method[tag_at + 8] & 1),
                    )
                    contents[channel] = _Content(channel, delivery, None)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] == RETURN:
                    if channel in contents:
                        self._protocol_error(f"a return interrupts content on channel {channel}")
                        return
                    returned = _Return.parse(bytes(view[start:stop]))
                    contents[channel] = _Content(channel, None, returned)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] in (ACK, NACK):
                    tag, bits = _CONFIRM.unpack_from(view, start + 4)
                    nack = unpack_method(view, start)[0] == NACK
                    self._on_confirm(channel, tag, bool(bits & 1), nack=nack)
                elif kind != FRAME_HEARTBEAT:
                    self._on_frame(bytes(view[offset : stop + 1]))
                offset = stop + 1
        if offset:
            del buffer[:offset]

    def _on_header(self, content: _Content, payload: bytes) -> None:
        if len(payload) < 14:
            raise Malformed("a content header shorter than 14 bytes")
        size, flags = _SIZE_FLAGS.unpack_from(payload, 4)
        content.size = size
        if size > self.max_body:
            content.parts = None
        delivery = content.delivery
        if delivery is None:
            return
        delivery._header = payload
        if flags & 0xE000:  # content type, encoding or headers: look closer
            self._inspect(delivery, payload, flags)
        if content.parts is None:
            delivery.oversize = size

    def _inspect(self, delivery: Delivery, payload: bytes, flags: int) -> None:
        """The rarer properties: a content type other than JSON, an encoding, headers."""
        if flags & 0x8000:
            length = payload[14]
            if payload[15 : 15 + length] != _EXACT_JSON:
                delivery.plain_json = False
        if flags & 0x4000:
            delivery.plain_json = False
        if not flags & 0x2000:
            return
        try:
            props = RawProperties.parse(payload)
        except Malformed as exc:
            delivery.invalid = str(exc)
            delivery.plain_json = False
            return
        if delivery.redelivered:
            table = props.fields["headers"]
            count = table_int(table, b"x-delivery-count") or 0
            if self._acquired_counts:
                count = max(count, table_int(table, b"x-acquired-count") or 0)
            delivery.delivery_count = max(count, 0)

    def _finish(self, content: _Content) -> None:
        parts = content.parts
        body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
        if content.delivery is not None:
            content.delivery.body = body
            self.on_delivery(content.delivery)
        elif content.returned is not None:
            self._on_returned(content.channel, content.returned, body)

    # -- everything else, through pamqp ------------------------------------------------

    def _on_frame(self, raw: bytes) -> None:
        try:
            _, channel, value = amqp_frame.unmarshal(raw)
        except Exception as exc:
            self._protocol_error(f"undecodable frame: {exc}")
            return
        if isinstance(value, spec.Connection.Close):
            self._send(spec.Connection.CloseOk(), 0)
            self._fail(
                AMQPError(f"broker closed the connection: {value.reply_code} {value.reply_text}")
            )
            self._close_transport()
        elif isinstance(value, spec.Channel.Close):
            self._send(spec.Channel.CloseOk(), channel)
            self._fail(
                AMQPError(f"broker closed channel {channel}: {value.reply_code} {value.reply_text}")
            )
            self._close_transport()
        elif isinstance(value, spec.Basic.Cancel):  # the queue went away under the consumer
            self._fail(AMQPError(f"broker cancelled consumer {value.consumer_tag}"))
            self._close_transport()
        elif isinstance(value, spec.Channel.Flow):
            self._send(spec.Channel.FlowOk(active=value.active), channel)
        elif isinstance(value, spec.Connection.Blocked):
            self.blocked = str(value.reason or "blocked")
        elif isinstance(value, spec.Connection.Unblocked):
            self.blocked = None
        else:
            waiter = self._pending.get(channel)
            if waiter is not None and isinstance(value, waiter[0]) and not waiter[1].done():
                del self._pending[channel]
                waiter[1].set_result(value)
            elif len(self._unclaimed) < 16:
                self._unclaimed.append((channel, value))  # a reply nobody waits for yet

    def _send(self, value: Any, channel: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(amqp_frame.marshal(value, channel))
            self._sent = True

    async def _rpc(self, value: Any, channel: int, reply: tuple[type, ...], timeout: float) -> Any:
        if self.closed.done():
            raise AMQPError("connection closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[channel] = (reply, future)
        self._send(value, channel)
        return await self._reply(future, timeout)

    async def _reply(self, future: asyncio.Future[Any], timeout: float) -> Any:
        """The awaited reply, or AMQPError if the connection closes first."""
        async with asyncio.timeout(timeout):
            done, _ = await asyncio.wait({future, self.closed}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        future.cancel()
        raise AMQPError(str(self.closed.exception() or "connection closed"))

    def _fail(self, exc: AMQPError) -> None:
        if not self.closed.done():
            self.closed.set_exception(exc)
            self.closed.exception()  # retrieved: a consumer may never await it
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self._pending.clear()
        for published in self._published.values():
            for item in published.values():
                if not item.future.done():
                    item.future.set_exception(exc)
                    item.future.exception()
            published.clear()
        self._content.clear()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()

    def _protocol_error(self, why: str) -> None:
        if not self.closed.done():
            log.error("closing the broker connection: protocol error: %s", why)
        self._fail(AMQPError(f"protocol error: {why}"))
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- flow control ------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading from the socket (the broker's frames wait in the kernel and the
        broker): what the worker holds stops growing. Heartbeat silence is not counted."""
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    # -- handshake and commands ----------------------------------------------------------

    async def handshake(
        self,
        credentials: tuple[str, str] | None,
        vhost: str,
        name: str,
        timeout: float,
    ) -> None:
        """Log in with PLAIN (``credentials``: user, password) or, with None, EXTERNAL
        (the TLS client certificate names the user)."""
        start = await self._wait_first(spec.Connection.Start, timeout)
        mechanisms = start.mechanisms.split() if isinstance(start.mechanisms, str) else []
        mechanism = "PLAIN" if credentials is not None else "EXTERNAL"
        if mechanism not in mechanisms:
            raise AMQPError(f"the broker offers no {mechanism} authentication ({start.mechanisms})")
        version = (start.server_properties or {}).get("version", "0")
        self.server_version = parse_version(version)
        self._acquired_counts = self.server_version >= ACQUIRED_COUNT_SINCE
        response = "" if credentials is None else f"\0{credentials[0]}\0{credentials[1]}"
        tune = await self._rpc(
            spec.Connection.StartOk(
                client_properties={
                    "connection_name": name,
                    "product": "prompter-worker",
                    "capabilities": {
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                        "publisher_confirms": True,
                    },
                },
                mechanism=mechanism,
                response=response,
            ),
            0,
            (spec.Connection.Tune,),
            timeout,
        )
        self.frame_max = min(tune.frame_max or MAX_FRAME, MAX_FRAME)
        if tune.heartbeat:
            self.heartbeat = (
                min(self.heartbeat, tune.heartbeat) if self.heartbeat else tune.heartbeat
            )
        self._send(
            spec.Connection.TuneOk(
                channel_max=min(tune.channel_max or 2047, 2047),
                frame_max=self.frame_max,
                heartbeat=self.heartbeat,
            ),
            0,
        )
        await self._rpc(
            spec.Connection.Open(virtual_host=vhost), 0, (spec.Connection.OpenOk,), timeout
        )
        if self.heartbeat:
            self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="amqp-heartbeat")

    async def _wait_first(self, kind: type, timeout: float) -> Any:
        for item in self._unclaimed:
            if item[0] == 0 and isinstance(item[1], kind):
                self._unclaimed.remove(item)
                return item[1]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[0] = ((kind,), future)
        return await self._reply(future, timeout)

    async def open_channel(self, channel: int, prefetch: int, timeout: float = 10) -> None:
        await self._rpc(spec.Channel.Open(), channel, (spec.Channel.OpenOk,), timeout)
        await self._rpc(
            spec.Basic.Qos(prefetch_count=prefetch), channel, (spec.Basic.QosOk,), timeout
        )

    def set_prefetch(self, channel: int, prefetch: int) -> None:
        """Change a consuming channel's prefetch count, without waiting for the reply (it
        applies to the deliveries the broker sends from then on)."""
        self._send(spec.Basic.Qos(prefetch_count=prefetch), channel)

    async def open_publisher(self, channel: int, timeout: float = 10) -> None:
        """Open ``channel`` in confirm mode, for :meth:`publish`."""
        await self._rpc(spec.Channel.Open(), channel, (spec.Channel.OpenOk,), timeout)
        await self._rpc(spec.Confirm.Select(), channel, (spec.Confirm.SelectOk,), timeout)
        self._published[channel] = collections.OrderedDict()
        self._next_tag[channel] = 1

    async def retire_publisher(self, channel: int, timeout: float = 30) -> None:
        """Close a confirm channel once the publishes in flight on it are settled (or
        ``timeout`` passed: those still open fail with :class:`AMQPError`)."""
        published = self._published.get(channel)
        if published is None:
            return
        waits = [p.future for p in published.values() if not p.future.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        self._published.pop(channel, None)
        self._next_tag.pop(channel, None)
        for item in published.values():
            if not item.future.done():
                item.future.set_exception(AMQPError(f"channel {channel} retired unconfirmed"))
                item.future.exception()
        with contextlib.suppress(AMQPError, TimeoutError):
            await self._rpc(
                spec.Channel.Close(reply_code=200, reply_text="retired", class_id=0, method_id=0),
                channel,
                (spec.Channel.CloseOk,),
                10,
            )

    async def open_plain(self, channel: int, timeout: float = 10) -> None:
        """Open ``channel`` for queue commands (:meth:`queue_depth`, :meth:`purge`)."""
        await self._rpc(spec.Channel.Open(), channel, (spec.Channel.OpenOk,), timeout)

    async def queue_depth(self, channel: int, queue: str, timeout: float = 10) -> tuple[int, int]:
        """(ready messages, consumers) of ``queue``, by a passive declare. A missing queue
        closes the connection (the broker closes the channel): :class:`AMQPError` 404."""
        ok = await self._rpc(
            spec.Queue.Declare(queue=queue, passive=True),
            channel,
            (spec.Queue.DeclareOk,),
            timeout,
        )
        return int(ok.message_count or 0), int(ok.consumer_count or 0)

    async def purge(self, channel: int, queue: str, timeout: float = 30) -> int:
        """Delete every ready message of ``queue``; how many."""
        ok = await self._rpc(spec.Queue.Purge(queue=queue), channel, (spec.Queue.PurgeOk,), timeout)
        return int(ok.message_count or 0)

    async def consume(self, channel: int, queue: str, timeout: float = 10) -> str:
        ok = await self._rpc(
            spec.Basic.Consume(queue=queue, no_ack=False), channel, (spec.Basic.ConsumeOk,), timeout
        )
        tag = str(ok.consumer_tag)
        self.consumers[tag] = channel
        return tag

    async def cancel(self, consumer_tag: str, timeout: float = 10) -> None:
        channel = self.consumers.pop(consumer_tag, None)
        if channel is not None:
            await self._rpc(
                spec.Basic.Cancel(consumer_tag=consumer_tag),
                channel,
                (spec.Basic.CancelOk,),
                timeout,
            )

    def consume_nowait(self, channel: int, queue: str, consumer_tag: str) -> None:
        """Start consuming without waiting for the broker's reply (none is sent; a missing
        queue closes the channel, and with it this connection): usable while reading is
        paused, when a reply could not be read."""
        self._writable()
        self._send(
            spec.Basic.Consume(queue=queue, consumer_tag=consumer_tag, no_ack=False, nowait=True),
            channel,
        )
        self.consumers[consumer_tag] = channel

    def cancel_nowait(self, consumer_tag: str) -> None:
        """Cancel a consumer without waiting for the broker's reply (it could sit behind
        deliveries while reading is paused); deliveries sent before it still arrive."""
        channel = self.consumers.pop(consumer_tag, None)
        if channel is not None:
            self._send(spec.Basic.Cancel(consumer_tag=consumer_tag, nowait=True), channel)

    def _writable(self) -> asyncio.Transport:
        transport = self.transport
        if self.closed.done() or transport is None or transport.is_closing():
            raise AMQPError("connection closed")
        return transport

    def ack(self, channel: int, delivery_tag: int, *, multiple: bool = True) -> None:
        """Acknowledge; raises :class:`AMQPError` if the connection is gone (never sent on
        another connection)."""
        self._writable().write(
            _ACK.pack(1, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, FRAME_END)
        )
        self._sent = True

    def reject(self, channel: int, delivery_tag: int, *, requeue: bool) -> None:
        """Reject one delivery (``requeue=False``: the queue dead-letters it)."""
        self._writable().write(
            amqp_frame.marshal(
                spec.Basic.Reject(delivery_tag=delivery_tag, requeue=requeue), channel
            )
        )
        self._sent = True

    def publish(
        self,
        channel: int,
        *,
        exchange: bytes,
        routing_key: bytes,
        header: bytes,
        body: bytes,
        mandatory: bool = True,
    ) -> asyncio.Future[None]:
        """Publish on a confirm channel (:meth:`open_publisher`): ``header`` is a content
        header payload (:meth:`~worker.amqp.frames.RawProperties.build`), sent as is. The
        future resolves when the broker confirms the message, or fails with
        :class:`Returned` (no queue took it), :class:`Nacked`, or :class:`AMQPError`
        (the connection closed first: it may or may not have arrived).

        Confirms are matched by delivery tag. A return is matched to the earliest
        unconfirmed publish with the same exchange, routing key and body: two publishes
        that equal in all of these are interchangeable, so whichever is marked returned,
        nothing is lost (the other one's copy is in the queue)."""
        transport = self._writable()
        published = self._published.get(channel)
        if published is None:
            raise AMQPError(f"channel {channel} is not a publishing channel")
        if len(exchange) > 255 or len(routing_key) > 255:
            raise ValueError("an exchange name or routing key is at most 255 bytes")
        payload = (
            b"\x00\x00"  # reserved
            + bytes((len(exchange),))
            + exchange
            + bytes((len(routing_key),))
            + routing_key
            + (b"\x01" if mandatory else b"\x00")
        )
        frames: list[bytes | memoryview] = [
            _METHOD_HEAD.pack(FRAME_METHOD, channel, len(payload) + 4, 60, 40),
            payload,
            b"\xce",
            _CONTENT_HEAD.pack(FRAME_HEADER, channel, len(header)),
            header,
            b"\xce",
        ]
        step = self.frame_max - FRAME_OVERHEAD
        view = memoryview(body)
        for at in range(0, len(body), step):
            chunk = view[at : at + step]
            frames += (_CONTENT_HEAD.pack(FRAME_BODY, channel, len(chunk)), chunk, b"\xce")
        tag = self._next_tag[channel]
        self._next_tag[channel] = tag + 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        published[tag] = _Publish(exchange, routing_key, body, future)
        transport.writelines(frames)
        self._sent = True
        return future

    def _on_confirm(self, channel: int, tag: int, multiple: bool, *, nack: bool) -> None:
        published = self._published.get(channel)
        if published is None:
            return
        settled = [t for t in published if t <= tag] if multiple else [tag]
        for t in settled:
            item = published.pop(t, None)
            if item is None or item.future.done():
                continue
            if nack:
                item.future.set_exception(Nacked("the broker nacked the message"))
            elif item.returned is not None:
                item.future.set_exception(Returned(item.returned))
            else:
                item.future.set_result(None)

    def _on_returned(self, channel: int, frame: _Return, body: bytes) -> None:
        published = self._published.get(channel)
        why = frame.reply
        for item in () if published is None else published.values():
            if (
                item.returned is None
                and item.exchange == frame.exchange
                and item.routing_key == frame.routing_key
                and len(item.body) == len(body)
                and item.body == body
            ):
                item.returned = why
                return
        log.warning("the broker returned a message that matches no publish in flight (%s)", why)

    async def close(self, timeout: float = 5) -> None:
        if self.closed.done():
            self._close_transport()
            return
        self.resume()  # the CloseOk must be read
        with contextlib.suppress(AMQPError, TimeoutError):
            await self._rpc(
                spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0),
                0,
                (spec.Connection.CloseOk,),
                timeout,
            )
        self._fail(AMQPError("closed by the worker"))
        self._close_transport()

    async def _heartbeats(self) -> None:
        """Send a heartbeat when idle; give up on a peer silent for two intervals (silence
        while reading is paused is ours, not the peer's)."""
        interval = max(self.heartbeat / 2, 0.5)
        silent = 0.0
        while not self.closed.done():
            await asyncio.sleep(interval)
            if not self._sent and self.transport is not None:
                self.transport.write(_HEARTBEAT)
            self._sent = False
            silent = 0.0 if self._received or self._paused else silent + interval
            self._received = False
            if silent >= self.heartbeat * 2:
                self._fail(AMQPError(f"no data from the broker for {silent:.0f}s"))
                self._close_transport()
                return


def parse_version(raw: object) -> tuple[int, ...]:
    """``(4, 1, 2)`` from a server's version property (bytes or text), never raising."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts)


# --- connecting -------------------------------------------------------------------------

DEFAULT_PORTS: Final = {"amqp": 5672, "amqps": 5671}


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One broker URL, read exactly as aiormq reads it (host, port, vhost, credentials, and
    the query: ``heartbeat``, ``auth``, ``cafile``, ``capath``, ``cadata``, ``certfile``,
    ``keyfile``, ``no_verify_ssl``), so the worker's two kinds of connection to a node
    agree on everything (tests/test_amqp.py checks it against aiormq)."""

    host: str
    port: int
    tls: bool
    user: str
    password: str
    vhost: str
    heartbeat: int | None
    external: bool
    cafile: str | None
    capath: str | None
    cadata: bytes | None
    certfile: str | None
    keyfile: str | None
    verify: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parsed = URL(url)
        scheme = parsed.scheme
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"not an amqp:// or amqps:// URL (scheme {scheme!r})")
        query = parsed.query
        path = parsed.path
        vhost = "/" if path in ("/", "") else path[1:].replace("%2F", "/")
        heartbeat = query.get("heartbeat")
        cadata = query.get("cadata")
        return cls(
            host=parsed.host or "localhost",
            port=parsed.port or DEFAULT_PORTS[scheme],
            tls=scheme == "amqps",
            user=parsed.user if parsed.user is not None else "guest",
            password=parsed.password if parsed.password is not None else "guest",
            vhost=vhost,
            heartbeat=None if heartbeat is None else _heartbeat(heartbeat),
            external=query.get("auth", "plain").upper() == "EXTERNAL",
            cafile=query.get("cafile"),
            capath=query.get("capath"),
            cadata=base64.b64decode(cadata) if cadata else None,
            certfile=query.get("certfile"),
            keyfile=query.get("keyfile"),
            verify=query.get("no_verify_ssl", "0") == "0",
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (``amqps``), built as aiormq builds it; None for ``amqp``."""
        if not self.tls:
            return None
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=self.cafile, capath=self.capath, cadata=self.cadata
        )
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _heartbeat(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        return 0
    return value if 0 <= value < 65535 else 0


async def connect(
    url: str,
    on_delivery: Callable[[Delivery], None] = lambda _: None,
    *,
    name: str,
    heartbeat: int = 15,
    timeout: float = 10,
    max_body: int = 1 << 62,
) -> Connection:
    """Open a connection to the broker named by an ``amqp://`` or ``amqps://`` URL
    (:class:`Endpoint`): PLAIN with the URL's credentials, or EXTERNAL with
    ``auth=external`` and a client certificate. Raises :class:`AMQPError`, ``OSError`` or
    ``TimeoutError``."""
    endpoint = Endpoint.parse(url)
    context = endpoint.ssl_context()
    loop = asyncio.get_running_loop()
    beat = heartbeat if endpoint.heartbeat is None else endpoint.heartbeat
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            lambda: Connection(on_delivery, beat, max_body=max_body),
            endpoint.host,
            endpoint.port,
            ssl=context,
            server_hostname=endpoint.host if context else None,
        )
    try:
        credentials = None if endpoint.external else (endpoint.user, endpoint.password)
        await protocol.handshake(credentials, endpoint.vhost, name, timeout)
    except BaseException:
        protocol._close_transport()
        raise
    return protocol
