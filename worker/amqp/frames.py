"""AMQP 0-9-1 content headers and field tables as bytes: read, edited and built without
decoding them wholesale, so that no byte a publisher sends can make them raise.

A content header's property list is a sequence of optional fields, present when their
bit of the property flags is set. Decoding it with a general codec (pamqp, aiormq) turns
every short string and table key into ``str``, which fails on the first byte that is not
UTF-8, and re-encoding a decoded copy changes bytes it does not understand. Here a
property list is split into its fields' *raw* values (:class:`RawProperties`), and a
field table into its raw entries (:func:`table_entries`). Nothing is decoded except what
is asked for:

- :meth:`RawProperties.text` gives a field as text for logs and checks (invalid UTF-8
  shown as ``\\xNN`` escapes), never for storage;
- :func:`table_int` reads one integer entry (the broker's delivery counters);
- a copy of a message (dead-lettering, redrive) is the original property list with
  some fields replaced or dropped and entries spliced into its headers table
  (:meth:`RawProperties.with_headers`), so everything else travels byte for byte.

What cannot be split at all (a property list or table that is truncated, or holds a
field type AMQP does not define) raises :class:`Malformed` with the reason; the worker
dead-letters such a message as ``invalid_properties``, carrying the raw bytes along.

Field tables are :mod:`worker.amqp.tables`' (its names are re-exported here).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from worker.amqp.tables import (
    ByteArray,
    Malformed,
    check_table,
    decode_table,
    encode_entries,
    table_entries,
    table_int,
    table_spans,
)

__all__ = [
    "PROPERTIES",
    "ByteArray",
    "Malformed",
    "RawProperties",
    "check_table",
    "decode_table",
    "encode_entries",
    "table_entries",
    "table_int",
    "table_spans",
]

#: ``basic`` content class; every message's content header carries it.
BASIC_CLASS: Final = 60

SHORTSTR: Final = "s"
TABLE: Final = "F"
OCTET: Final = "o"
TIMESTAMP: Final = "T"

#: The basic class's properties, in wire order: (name, flag bit, kind).
PROPERTIES: Final = (
    ("content_type", 0x8000, SHORTSTR),
    ("content_encoding", 0x4000, SHORTSTR),
    ("headers", 0x2000, TABLE),
    ("delivery_mode", 0x1000, OCTET),
    ("priority", 0x0800, OCTET),
    ("correlation_id", 0x0400, SHORTSTR),
    ("reply_to", 0x0200, SHORTSTR),
    ("expiration", 0x0100, SHORTSTR),
    ("message_id", 0x0080, SHORTSTR),
    ("timestamp", 0x0040, TIMESTAMP),
    ("type", 0x0020, SHORTSTR),
    ("user_id", 0x0010, SHORTSTR),
    ("app_id", 0x0008, SHORTSTR),
    ("cluster_id", 0x0004, SHORTSTR),
)
_KNOWN_FLAGS: Final = sum(flag for _, flag, _ in PROPERTIES)
_CONTINUATION: Final = 0x0001

_HEAD = struct.Struct(">HHQH")  # class id, weight, body size, property flags
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class RawProperties:
    """A message's properties as raw values, by name (:data:`PROPERTIES`).

    A short string's value is its bytes without the length byte; the headers table's is
    its entries without the 4-byte length; an octet is one byte; a timestamp eight.
    """

    fields: dict[str, bytes]

    @classmethod
    def parse(cls, payload: bytes | memoryview, offset: int = 12) -> RawProperties:
        """Split the property list of a content header ``payload`` (class id, weight and
        body size come first: the flags start at ``offset``). Raises :class:`Malformed`."""
        data = memoryview(payload)
        if len(data) < offset + 2:
            raise Malformed("the content header ends before its property flags")
        flags = int.from_bytes(data[offset : offset + 2], "big")
        at = offset + 2
        if flags & _CONTINUATION:
            raise Malformed("more than one word of property flags (not defined by AMQP 0-9-1)")
        if flags & ~_KNOWN_FLAGS & 0xFFFF:
            raise Malformed(f"unknown property flags 0x{flags & ~_KNOWN_FLAGS & 0xFFFF:04x}")
        fields: dict[str, bytes] = {}
        for name, flag, kind in PROPERTIES:
            if not flags & flag:
                continue
            if kind == SHORTSTR:
                length = _byte(data, at, name)
                start, at = at + 1, at + 1 + length
            elif kind == TABLE:
                length = _u32(data, at, name)
                start, at = at + 4, at + 4 + length
            elif kind == OCTET:
                start, at = at, at + 1
            else:
                start, at = at, at + 8
            if at > len(data):
                raise Malformed(f"the property list ends inside {name}")
            fields[name] = bytes(data[start:at])
        if at != len(data):
            raise Malformed(f"{len(data) - at} bytes after the last property")
        if "headers" in fields:
            check_table(fields["headers"], "headers")
        return cls(fields)

    def text(self, name: str) -> str | None:
        """A short-string property as text for logs and checks (invalid UTF-8 escaped)."""
        raw = self.fields.get(name)
        return None if raw is None else raw.decode("utf-8", "backslashreplace")

    def octet(self, name: str) -> int | None:
        raw = self.fields.get(name)
        return None if raw is None else raw[0]

    def header_keys(self) -> list[bytes]:
        table = self.fields.get("headers")
        return [] if table is None else [key for key, _, _ in table_entries(table)]

    def replace(self, **changes: bytes | None) -> RawProperties:
        """A copy with fields set (raw values) or, for None, dropped."""
        fields = dict(self.fields)
        for name, value in changes.items():
            if name not in _NAMES:
                raise KeyError(name)
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        return RawProperties(fields)

    def with_headers(self, drop: Iterable[bytes], add: bytes) -> RawProperties:
        """A copy whose headers table lacks the keys in ``drop`` and ends with the encoded
        entries ``add`` (:func:`encode_entries`); every other entry is kept byte for byte."""
        dropped = set(drop)
        table = self.fields.get("headers", b"")
        kept = b"".join(raw for key, _, raw in table_spans(table) if key not in dropped)
        return self.replace(headers=kept + add)

    def build(self, body_size: int) -> bytes:
        """The content header payload of a message with these properties."""
        flags = 0
        parts: list[bytes] = []
        for name, flag, kind in PROPERTIES:
            value = self.fields.get(name)
            if value is None:
                continue
            flags |= flag
            if kind == SHORTSTR:
                if len(value) > 255:
                    raise Malformed(f"{name} is longer than 255 bytes")
                parts.append(_U8.pack(len(value)))
            elif kind == TABLE:
                parts.append(_U32.pack(len(value)))
            parts.append(value)
        return _HEAD.pack(BASIC_CLASS, 0, body_size, flags) + b"".join(parts)

    def size(self) -> int:
        """Bytes of the property list with its flags (what :meth:`build` writes after the
        body size)."""
        total = 2
        for name, _, kind in PROPERTIES:
            value = self.fields.get(name)
            if value is not None:
                total += len(value) + (1 if kind == SHORTSTR else 4 if kind == TABLE else 0)
        return total


_NAMES: Final = frozenset(name for name, _, _ in PROPERTIES)


def _byte(data: memoryview, at: int, what: str) -> int:
    if at >= len(data):
        raise Malformed(f"the property list ends before {what}")
    return data[at]


def _u32(data: memoryview, at: int, what: str) -> int:
    if at + 4 > len(data):
        raise Malformed(f"the property list ends before {what}")
    value: int = _U32.unpack_from(data, at)[0]
    return value
