"""The consumer's frame reader, sans I/O: bytes from the socket in, deliveries, confirms,
returns and every other frame out, through plain callbacks, synchronously, in order.

This is the hot path: deliveries are parsed straight from the buffer with ``struct``;
properties stay raw bytes (:mod:`worker.amqp.frames`) and only what the hot path needs is
looked at (content type and encoding, the broker's delivery counters). Every frame's
size is checked against the negotiated ``frame_max`` before it is buffered; content
(header and body frames) is tracked per channel, as the spec allows channels to
interleave; a body larger than ``max_body`` is counted, never held. What breaks the
protocol raises :class:`ProtocolViolation` (the connection closes with the reason).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from worker.amqp.delivery import Delivery, ReturnedMethod
from worker.amqp.frames import Malformed, RawProperties, table_int

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

_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SIZE_FLAGS = struct.Struct(">QH")  # content header: body size, property flags
_CONFIRM = struct.Struct(">QB")  # basic.ack / basic.nack: delivery tag, multiple bit
_EXACT_JSON = b"application/json"


class ProtocolViolation(Exception):
    """The peer sent frames that break AMQP 0-9-1 (the reason is the message)."""


class Content:
    """A message whose content (header, then body frames) is arriving on one channel."""

    __slots__ = ("channel", "delivery", "parts", "received", "returned", "size")

    def __init__(
        self, channel: int, delivery: Delivery | None, returned: ReturnedMethod | None
    ) -> None:
        self.channel = channel
        self.delivery = delivery
        self.returned = returned
        self.size = -1  # until the content header arrives
        self.received = 0
        self.parts: list[bytes] | None = []  # None: over max_body, counted but not kept


class FrameReader:
    """Frames out of a byte stream (see the module docstring). ``on_delivery`` gets each
    complete delivery; ``on_confirm(channel, tag, multiple, nack)`` each basic.ack or
    basic.nack; ``on_return(channel, method, body)`` each returned message;
    ``on_frame(raw)`` every other frame but heartbeats, whole."""

    def __init__(
        self,
        *,
        on_delivery: Callable[[Delivery], None],
        on_confirm: Callable[[int, int, bool, bool], None],
        on_return: Callable[[int, ReturnedMethod, bytes], None],
        on_frame: Callable[[bytes], None],
        max_body: int = 1 << 62,
    ) -> None:
        self.on_delivery = on_delivery
        self.on_confirm = on_confirm
        self.on_return = on_return
        self.on_frame = on_frame
        self.max_body = max_body
        self.frame_max = MAX_FRAME
        #: The broker counts every acquisition in x-acquired-count (RabbitMQ 4.3 on).
        self.acquired_counts = False
        self.buffer = bytearray()
        self.contents: dict[int, Content] = {}

    def feed(self, data: bytes) -> None:
        """Read ``data``: every frame it completes goes out; the rest waits for more."""
        buffer = self.buffer
        buffer += data
        offset = 0
        end = len(buffer)
        frame_max = self.frame_max
        unpack_head = _FRAME_HEAD.unpack_from
        unpack_method = _METHOD_ID.unpack_from
        contents = self.contents
        with memoryview(buffer) as view:
            while end - offset >= 8:
                kind, channel, size = unpack_head(view, offset)
                if size > frame_max - FRAME_OVERHEAD:
                    raise ProtocolViolation(
                        f"a frame of {size} bytes exceeds the negotiated frame_max {frame_max}"
                    )
                stop = offset + 7 + size
                if stop >= end:
                    break
                if view[stop] != FRAME_END:
                    raise ProtocolViolation("bad frame end")
                start = offset + 7
                if kind == FRAME_BODY:
                    content = contents.get(channel)
                    if content is None or content.size < 0:
                        raise ProtocolViolation(
                            f"content body without a header on channel {channel}"
                        )
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
                        raise ProtocolViolation(f"content header out of place on channel {channel}")
                    self._on_header(content, bytes(view[start:stop]))
                    if content.size == 0:
                        del contents[channel]
                        self._finish(content)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] == DELIVER:
                    if channel in contents:
                        raise ProtocolViolation(
                            f"a delivery interrupts content on channel {channel}"
                        )
                    method = bytes(view[start + 4 : stop])
                    tag_at = 1 + method[0]  # after the consumer tag
                    delivery = Delivery(
                        channel,
                        _U64.unpack_from(method, tag_at)[0],
                        method,
                        bool(method[tag_at + 8] & 1),
                    )
                    contents[channel] = Content(channel, delivery, None)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] == RETURN:
                    if channel in contents:
                        raise ProtocolViolation(f"a return interrupts content on channel {channel}")
                    returned = ReturnedMethod.parse(bytes(view[start:stop]))
                    contents[channel] = Content(channel, None, returned)
                elif kind == FRAME_METHOD and unpack_method(view, start)[0] in (ACK, NACK):
                    tag, bits = _CONFIRM.unpack_from(view, start + 4)
                    nack = unpack_method(view, start)[0] == NACK
                    self.on_confirm(channel, tag, bool(bits & 1), nack)
                elif kind != FRAME_HEARTBEAT:
                    self.on_frame(bytes(view[offset : stop + 1]))
                offset = stop + 1
        if offset:
            del buffer[:offset]

    def _on_header(self, content: Content, payload: bytes) -> None:
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
            if len(payload) < 15:
                delivery.invalid = "the property list ends inside content_type"
                delivery.plain_json = False
                return
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
            if self.acquired_counts:
                count = max(count, table_int(table, b"x-acquired-count") or 0)
            delivery.delivery_count = max(count, 0)

    def _finish(self, content: Content) -> None:
        parts = content.parts
        body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
        if content.delivery is not None:
            content.delivery.body = body
            self.on_delivery(content.delivery)
        elif content.returned is not None:
            self.on_return(content.channel, content.returned, body)
