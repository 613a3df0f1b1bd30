"""A minimal AMQP 0-9-1 consumer connection, built for the least CPU per delivery.

The worker's profile showed that, with aiormq, receiving a message cost more CPU than
decoding, validating and storing it: each delivery crosses three frame objects, two
asyncio queues, a future store and a new task. This connection does only what consuming
needs (handshake, channels, qos, consume, cancel, ack, heartbeats, close) as an
:class:`asyncio.Protocol`: deliveries are parsed straight from the socket buffer with
``struct`` and handed to a plain callback, synchronously, in order. Everything else the
worker does on the broker (declaring the topology, publishing dead letters with
confirms) still goes through aiormq on a second connection.

Only the properties the hot path reads are parsed per delivery (content type and
encoding, headers when present, message id); the full property set is decoded lazily,
by pamqp, for the rare delivery that is dead-lettered. Frames other than deliveries are
decoded and encoded with pamqp, the same codec aiormq uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import urllib.parse
from collections.abc import Callable
from typing import Any, Final, cast

from pamqp import commands as spec
from pamqp import decode as amqp_decode
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from pamqp import heartbeat as amqp_heartbeat

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
DELIVER: Final = (60 << 16) | 60
MAX_FRAME: Final = 131_072

_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SIZE_FLAGS = struct.Struct(">QH")  # content header: body size, property flags
_ACK = struct.Struct(">BHIHHQBB")
_HEARTBEAT = amqp_frame.marshal(amqp_heartbeat.Heartbeat(), 0)


class AMQPError(Exception):
    """The broker closed the connection or a channel, or the peer stopped answering."""


class Delivery:
    """One message as delivered. The hot path reads ``channel``, ``delivery_tag``,
    ``body``, ``plain_json`` and ``delivery_count``; everything else is decoded on demand
    from the raw frames (for dead-lettering and logging, which are rare)."""

    __slots__ = (
        "_header",
        "_method",
        "body",
        "channel",
        "delivery_count",
        "delivery_tag",
        "plain_json",
    )

    def __init__(self, channel: int, delivery_tag: int, method: bytes) -> None:
        self.channel = channel
        self.delivery_tag = delivery_tag
        self._method = method
        self._header = b""
        self.body = b""
        self.plain_json = True  # no content type but application/json, no content encoding
        self.delivery_count = 0

    @property
    def properties(self) -> spec.Basic.Properties:
        """Every property, decoded by pamqp."""
        content = amqp_header.ContentHeader()
        content.unmarshal(self._header)
        return content.properties

    def _method_fields(self) -> tuple[bool, str, str]:
        data = self._method
        offset = 1 + data[0] + 8  # consumer tag, delivery tag
        redelivered = bool(data[offset] & 1)
        exchange, offset = _shortstr(data, offset + 1)
        routing_key, _ = _shortstr(data, offset)
        return redelivered, exchange, routing_key

    @property
    def redelivered(self) -> bool:
        return self._method_fields()[0]

    @property
    def exchange(self) -> str:
        return self._method_fields()[1]

    @property
    def routing_key(self) -> str:
        return self._method_fields()[2]

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self.properties.content_encoding

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id


def verification_disabled(query: dict[str, str]) -> bool:
    """Whether an AMQP URL's query turns certificate verification off (``no_verify_ssl``,
    as aiormq reads it)."""
    return query.get("no_verify_ssl", "0") not in ("0", "")


def _shortstr(data: bytes | memoryview, offset: int) -> tuple[str, int]:
    length = data[offset]
    end = offset + 1 + length
    return bytes(data[offset + 1 : end]).decode("utf-8", "replace"), end


def _header_table(delivery: Delivery, payload: bytes, flags: int) -> None:
    """Find x-delivery-count in the headers table (present on redeliveries)."""
    offset = 14
    for bit in (0x8000, 0x4000):  # content type, content encoding come first
        if flags & bit:
            offset += 1 + payload[offset]
    _, table = amqp_decode.field_table(payload[offset:])
    count = table.get("x-delivery-count")
    if isinstance(count, int):
        delivery.delivery_count = count


class ConsumerProtocol(asyncio.Protocol):
    """The connection. Create with :func:`connect`; deliveries go to ``on_delivery``."""

    def __init__(self, on_delivery: Callable[[Delivery], None], heartbeat: int) -> None:
        self.on_delivery = on_delivery
        self.heartbeat = heartbeat
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.frame_max = MAX_FRAME
        self._buffer = bytearray()
        self._pending: dict[int, tuple[tuple[type, ...], asyncio.Future[Any]]] = {}
        self._current: Delivery | None = None
        self._body_size = 0
        self._body_received = 0
        self._body_parts: list[bytes] = []
        self._unclaimed: list[tuple[int, Any]] = []
        self._received = False
        self._sent = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.consumers: dict[str, int] = {}

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(PROTOCOL_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(AMQPError(f"connection lost: {exc}" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:  # the hot path: every delivery passes here
        self._received = True
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        unpack_head = _FRAME_HEAD.unpack_from
        unpack_method = _METHOD_ID.unpack_from
        unpack_size = _SIZE_FLAGS.unpack_from
        with memoryview(buffer) as view:
            while end - offset >= 8:
                kind, channel, size = unpack_head(view, offset)
                stop = offset + 7 + size
                if stop >= end:
                    break
                if view[stop] != FRAME_END:
                    self._protocol_error("bad frame end")
                    return
                start = offset + 7
                if kind == FRAME_BODY:
                    current = self._current
                    if current is None:
                        self._protocol_error("content body without a delivery")
                        return
                    part = bytes(view[start:stop])
                    if self._body_received == 0 and size >= self._body_size:
                        current.body = part
                        self._current = None
                        self.on_delivery(current)
                    else:
                        self._body_parts.append(part)
                        self._body_received += size
                        if self._body_received >= self._body_size:
                            self._finish_body()
                elif kind == FRAME_HEADER:
                    current = self._current
                    if current is None:
                        self._protocol_error("content header without a delivery")
                        return
                    payload = bytes(view[start:stop])
                    current._header = payload
                    body_size, flags = unpack_size(payload, 4)
                    if flags & 0xE000:  # content type, encoding or headers: look closer
                        self._inspect_properties(current, payload, flags)
                    self._body_size = body_size
                    self._body_received = 0
                    if body_size == 0:
                        self._current = None
                        self.on_delivery(current)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] == DELIVER:
                    tag_at = start + 5 + view[start + 4]  # after the consumer tag
                    self._current = Delivery(
                        channel, _U64.unpack_from(view, tag_at)[0], bytes(view[start + 4 : stop])
                    )
                elif kind != FRAME_HEARTBEAT:
                    self._on_frame(bytes(view[offset : stop + 1]))
                offset = stop + 1
        if offset:
            del buffer[:offset]

    def _inspect_properties(self, delivery: Delivery, payload: bytes, flags: int) -> None:
        """The rarer properties: a content type other than JSON, an encoding, headers."""
        if flags & 0x8000:
            length = payload[14]
            if payload[15 : 15 + length] != b"application/json":
                delivery.plain_json = False
        if flags & 0x4000:
            delivery.plain_json = False
        if flags & 0x2000:
            _header_table(delivery, payload, flags)

    # -- deliveries ----------------------------------------------------------------------

    def _finish_body(self) -> None:
        current = self._current
        assert current is not None
        current.body = b"".join(self._body_parts)
        self._current = None
        self._body_parts = []
        self._body_received = 0
        self.on_delivery(current)

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
        elif isinstance(value, (spec.Connection.Blocked, spec.Connection.Unblocked)):
            pass  # concerns publishers only
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
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()

    def _protocol_error(self, why: str) -> None:
        self._fail(AMQPError(f"protocol error: {why}"))
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- handshake and commands ----------------------------------------------------------

    async def handshake(
        self, user: str, password: str, vhost: str, name: str, timeout: float
    ) -> None:
        start = await self._wait_first(spec.Connection.Start, timeout)
        mechanisms = start.mechanisms.split() if isinstance(start.mechanisms, str) else []
        if "PLAIN" not in mechanisms:
            raise AMQPError(f"the broker offers no PLAIN authentication ({start.mechanisms})")
        tune = await self._rpc(
            spec.Connection.StartOk(
                client_properties={
                    "connection_name": name,
                    "product": "prompter-worker",
                    "capabilities": {"consumer_cancel_notify": True, "connection.blocked": True},
                },
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
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

    def ack(self, channel: int, delivery_tag: int, *, multiple: bool = True) -> None:
        """Acknowledge; raises :class:`AMQPError` if the connection is gone (never sent on
        another connection)."""
        transport = self.transport
        if self.closed.done() or transport is None or transport.is_closing():
            raise AMQPError("connection closed: cannot acknowledge")
        transport.write(
            _ACK.pack(1, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, FRAME_END)
        )
        self._sent = True

    async def close(self, timeout: float = 5) -> None:
        if self.closed.done():
            self._close_transport()
            return
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
        """Send a heartbeat when idle; give up on a peer silent for two intervals."""
        interval = max(self.heartbeat / 2, 0.5)
        silent = 0.0
        while not self.closed.done():
            await asyncio.sleep(interval)
            if not self._sent and self.transport is not None:
                self.transport.write(_HEARTBEAT)
            self._sent = False
            silent = 0.0 if self._received else silent + interval
            self._received = False
            if silent >= self.heartbeat * 2:
                self._fail(AMQPError(f"no data from the broker for {silent:.0f}s"))
                self._close_transport()
                return


async def connect(
    url: str,
    on_delivery: Callable[[Delivery], None],
    *,
    name: str,
    heartbeat: int = 15,
    timeout: float = 10,
) -> ConsumerProtocol:
    """Open a consumer connection to the broker named by an ``amqp://`` or ``amqps://`` URL.

    ``amqps`` verifies the server certificate against the system store, or the ``cafile``
    query parameter; ``certfile``/``keyfile`` present a client certificate;
    ``no_verify_ssl=1`` turns verification off (and the worker warns about it).
    """
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    tls = parts.scheme == "amqps"
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if tls else 5672)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = urllib.parse.unquote(path) or "/"
    if "heartbeat" in query:
        heartbeat = int(query["heartbeat"])
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context(cafile=query.get("cafile"))
        if query.get("certfile"):
            context.load_cert_chain(query["certfile"], query.get("keyfile"))
        if verification_disabled(query):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            lambda: ConsumerProtocol(on_delivery, heartbeat),
            host,
            port,
            ssl=context,
            server_hostname=host if context else None,
        )
    try:
        await protocol.handshake(user, password, vhost, name, timeout)
    except BaseException:
        protocol._close_transport()
        raise
    return protocol
