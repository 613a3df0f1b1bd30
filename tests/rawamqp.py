"""A test-side AMQP publisher that sends content headers as raw bytes.

Clients that other teams write (Go services with binary message ids, Node's amqplib, a
client that puts non-UTF-8 bytes in header keys) send property lists that aiormq and pamqp
cannot even encode. This publisher writes whatever bytes a test gives it, with publisher
confirms, using nothing of the worker's code (so a test of the worker's parser does not
depend on that parser). Messages are built with :func:`properties` and :func:`table`.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.parse
from collections.abc import Sequence

from pamqp import commands as spec
from pamqp import frame as amqp_frame

from tests.conftest import AMQP_URL

_FLAGS = {
    "content_type": (0x8000, "s"),
    "content_encoding": (0x4000, "s"),
    "headers": (0x2000, "F"),
    "delivery_mode": (0x1000, "o"),
    "priority": (0x0800, "o"),
    "correlation_id": (0x0400, "s"),
    "reply_to": (0x0200, "s"),
    "expiration": (0x0100, "s"),
    "message_id": (0x0080, "s"),
    "timestamp": (0x0040, "T"),
    "type": (0x0020, "s"),
    "user_id": (0x0010, "s"),
    "app_id": (0x0008, "s"),
    "cluster_id": (0x0004, "s"),
}


def table(*entries: tuple[bytes, bytes]) -> bytes:
    """A field table's content from ``(key, typed value)`` pairs; see :func:`longstr`."""
    return b"".join(bytes((len(k),)) + k + v for k, v in entries)


def longstr(value: bytes) -> bytes:
    return b"S" + struct.pack(">I", len(value)) + value


def long_int(value: int) -> bytes:
    return b"l" + struct.pack(">q", value)


def properties(body_size: int, **fields: bytes) -> bytes:
    """A content header payload; values are raw (a short string's bytes, a table's
    content, one byte for an octet, eight for a timestamp)."""
    flags = 0
    out = b""
    for name, (flag, kind) in _FLAGS.items():
        if name not in fields:
            continue
        value = fields[name]
        flags |= flag
        if kind == "s":
            out += bytes((len(value),)) + value
        elif kind == "F":
            out += struct.pack(">I", len(value)) + value
        else:
            out += value
    return struct.pack(">HHQH", 60, 0, body_size, flags) + out


def json_message(body: bytes, **fields: bytes) -> tuple[bytes, bytes]:
    """A persistent message: ``(content header payload, body)``."""
    fields.setdefault("delivery_mode", b"\x02")
    return properties(len(body), **fields), body


class _Raw:
    """One connection, frames read and written by hand (pamqp only for plain methods)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frame_max = 131_072

    @classmethod
    async def open(cls, url: str, frame_max: int) -> _Raw:
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
        raw = cls(reader, writer)
        writer.write(b"AMQP\x00\x00\x09\x01")
        await raw.expect(spec.Connection.Start)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        raw.send(spec.Connection.StartOk(mechanism="PLAIN", response=f"\0{user}\0{password}"))
        tune = await raw.expect(spec.Connection.Tune)
        assert isinstance(tune, spec.Connection.Tune)
        raw.frame_max = min(frame_max, tune.frame_max or frame_max)
        raw.send(spec.Connection.TuneOk(channel_max=10, frame_max=raw.frame_max, heartbeat=0))
        raw.send(spec.Connection.Open(virtual_host="/"))
        await raw.expect(spec.Connection.OpenOk)
        raw.send(spec.Channel.Open(), 1)
        await raw.expect(spec.Channel.OpenOk)
        return raw

    async def frame(self) -> tuple[int, int, bytes]:
        """(type, channel, payload) of the next frame."""
        head = await self.reader.readexactly(7)
        kind, channel, size = struct.unpack(">BHI", head)
        payload = await self.reader.readexactly(size + 1)
        return kind, channel, payload[:-1]

    async def receive(self) -> object:
        kind, channel, payload = await self.frame()
        _, _, value = amqp_frame.unmarshal(
            struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"
        )
        return value

    async def expect(self, kind: type) -> object:
        while True:
            value = await self.receive()
            if isinstance(value, kind):
                return value
            if isinstance(value, (spec.Connection.Close, spec.Channel.Close)):
                raise RuntimeError(f"broker closed: {value}")

    def send(self, value: object, channel: int = 0) -> None:
        self.writer.write(amqp_frame.marshal(value, channel))

    async def close(self) -> None:
        try:
            self.send(
                spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
            )
            await asyncio.wait_for(self.expect(spec.Connection.CloseOk), 10)
        finally:
            self.writer.close()


async def publish(
    messages: Sequence[tuple[bytes, bytes]],
    exchange: str,
    *,
    routing_key: bytes = b"prompt_run.v1",
    url: str = AMQP_URL,
    frame_max: int = 131_072,
) -> None:
    """Publish each ``(header payload, body)`` with confirms; raise if any is nacked."""
    raw = await _Raw.open(url, frame_max)
    try:
        raw.send(spec.Confirm.Select(), 1)
        await raw.expect(spec.Confirm.SelectOk)
        for header, body in messages:
            method = (
                struct.pack(">HHH", 60, 40, 0)
                + bytes((len(exchange),))
                + exchange.encode()
                + bytes((len(routing_key),))
                + routing_key
                + b"\x00"
            )
            out = struct.pack(">BHI", 1, 1, len(method)) + method + b"\xce"
            out += struct.pack(">BHI", 2, 1, len(header)) + header + b"\xce"
            step = raw.frame_max - 8
            for at in range(0, len(body), step):
                chunk = body[at : at + step]
                out += struct.pack(">BHI", 3, 1, len(chunk)) + chunk + b"\xce"
            raw.writer.write(out)
        acked: set[int] = set()
        while len(acked) < len(messages):
            value = await raw.receive()
            if isinstance(value, spec.Basic.Nack):
                raise RuntimeError("the broker nacked a message")
            if isinstance(value, spec.Basic.Ack):
                tag = value.delivery_tag
                acked.update(range(1, tag + 1) if value.multiple else (tag,))
            elif isinstance(value, (spec.Connection.Close, spec.Channel.Close)):
                raise RuntimeError(f"broker closed: {value}")
    finally:
        await raw.close()


async def drain(queue: str, *, url: str = AMQP_URL) -> list[tuple[bytes, bytes]]:
    """Take every ready message out of ``queue``: ``(content header payload, body)``, raw."""
    raw = await _Raw.open(url, 131_072)
    out: list[tuple[bytes, bytes]] = []
    try:
        while True:
            raw.send(spec.Basic.Get(queue=queue, no_ack=True), 1)
            kind, _, payload = await raw.frame()
            assert kind == 1
            if struct.unpack(">HH", payload[:4]) == (60, 72):  # get-empty
                return out
            assert struct.unpack(">HH", payload[:4]) == (60, 71), payload[:4]
            kind, _, header = await raw.frame()
            assert kind == 2
            size = struct.unpack(">Q", header[4:12])[0]
            body = b""
            while len(body) < size:
                kind, _, chunk = await raw.frame()
                assert kind == 3
                body += chunk
            out.append((header, body))
    finally:
        await raw.close()
