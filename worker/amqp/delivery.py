"""What the consumer hands over: one delivered message (:class:`Delivery`), its raw
frames kept and read on demand, and the method of a message the broker returned
(:class:`ReturnedMethod`)."""

from __future__ import annotations

from typing import NamedTuple

from worker.amqp.frames import Malformed, RawProperties


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
        exchange, offset = raw_shortstr(data, offset)
        routing_key, _ = raw_shortstr(data, offset)
        return exchange, routing_key

    @property
    def exchange_raw(self) -> bytes:
        return self._method_fields()[0]

    @property
    def routing_key_raw(self) -> bytes:
        return self._method_fields()[1]

    @property
    def exchange(self) -> str:
        return as_text(self._method_fields()[0])

    @property
    def routing_key(self) -> str:
        return as_text(self._method_fields()[1])

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
        """Bytes this delivery holds: its body (empty when oversize) and its content header."""
        return len(self.body) + len(self._header)


class ReturnedMethod(NamedTuple):
    """A basic.return, read raw: its routing key is whatever the publisher gave."""

    reply: str
    exchange: bytes
    routing_key: bytes

    @classmethod
    def parse(cls, method: bytes) -> ReturnedMethod:
        code = int.from_bytes(method[4:6], "big")
        text, at = raw_shortstr(method, 6)
        exchange, at = raw_shortstr(method, at)
        routing_key, _ = raw_shortstr(method, at)
        return cls(f"{code} {as_text(text)}", exchange, routing_key)


def raw_shortstr(data: bytes, offset: int) -> tuple[bytes, int]:
    """The short string at ``offset`` (without its length byte) and the offset after it."""
    length = data[offset]
    end = offset + 1 + length
    return data[offset + 1 : end], end


def as_text(raw: bytes) -> str:
    """Bytes from the wire as text for logs and checks (invalid UTF-8 escaped)."""
    return raw.decode("utf-8", "backslashreplace")
