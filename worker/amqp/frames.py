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
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

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

# Field-table value types and their fixed sizes (the union of AMQP 0-9-1 and RabbitMQ's
# dialect; https://www.rabbitmq.com/amqp-0-9-1-errata.html). Variable-size types carry a
# 4-byte length first.
_FIXED: Final = {
    b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"U": 2, b"u": 2, b"I": 4, b"i": 4,
    b"L": 8, b"l": 8, b"f": 4, b"d": 8, b"D": 5, b"T": 8, b"V": 0,
}  # fmt: skip
_VARIABLE: Final = frozenset({b"S", b"x", b"A", b"F"})
_INTEGERS: Final = {
    b"b": (1, True), b"B": (1, False), b"s": (2, True), b"U": (2, True), b"u": (2, False),
    b"I": (4, True), b"i": (4, False), b"L": (8, True), b"l": (8, True),
}  # fmt: skip

#: Deepest nesting of tables and arrays walked; deeper is malformed (no recursion bomb).
MAX_DEPTH: Final = 32


class Malformed(ValueError):
    """Bytes that do not split into a property list or a field table; says where and why."""


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

    def header_int(self, key: bytes) -> int | None:
        """An integer entry of the headers table, or None if absent or not an integer."""
        table = self.fields.get("headers")
        return None if table is None else table_int(table, key)

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


def table_spans(table: bytes) -> Iterator[tuple[bytes, bytes, bytes]]:
    """``(key, type, entry)`` for each entry of a field table's content (without its
    length prefix); ``entry`` is the entry's own bytes, key included. Raises
    :class:`Malformed` (the table is checked first)."""
    check_table(table, "headers")
    at = 0
    end = len(table)
    while at < end:
        start = at
        key_length = table[at]
        key = table[at + 1 : at + 1 + key_length]
        at += 1 + key_length
        kind = table[at : at + 1]
        at = _skip_value(table, at + 1, kind, depth=0, what="headers")
        yield bytes(key), bytes(kind), bytes(table[start:at])


def table_entries(table: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """``(key, type, value)`` for each entry; ``value`` is the raw value (a variable-size
    value without its length prefix). Raises :class:`Malformed`."""
    out = []
    for key, kind, entry in table_spans(table):
        value = entry[1 + entry[0] + 1 :]
        if kind in _VARIABLE:
            value = value[4:]
        out.append((key, kind, value))
    return out


def check_table(table: bytes, what: str) -> None:
    """Raise :class:`Malformed` unless ``table`` is a well-formed field table's content."""
    _walk_table(memoryview(table), 0, len(table), 0, what)


def _walk_table(data: memoryview, at: int, end: int, depth: int, what: str) -> None:
    if depth > MAX_DEPTH:
        raise Malformed(f"{what}: tables nested deeper than {MAX_DEPTH}")
    while at < end:
        key_length = data[at]
        at += 1 + key_length
        if at >= end:
            raise Malformed(f"{what}: a table ends inside an entry")
        kind = bytes(data[at : at + 1])
        at = _skip_value(data, at + 1, kind, depth=depth, what=what, end=end)
    if at != end:
        raise Malformed(f"{what}: a table's last entry overruns its length")


def _walk_array(data: memoryview, at: int, end: int, depth: int, what: str) -> None:
    if depth > MAX_DEPTH:
        raise Malformed(f"{what}: arrays nested deeper than {MAX_DEPTH}")
    while at < end:
        kind = bytes(data[at : at + 1])
        at = _skip_value(data, at + 1, kind, depth=depth, what=what, end=end)
    if at != end:
        raise Malformed(f"{what}: an array's last value overruns its length")


def _skip_value(
    data: memoryview | bytes,
    at: int,
    kind: bytes,
    *,
    depth: int,
    what: str,
    end: int | None = None,
) -> int:
    """The offset after a value of type ``kind`` starting at ``at`` (nested tables and
    arrays are walked when ``end`` is given)."""
    limit = len(data) if end is None else end
    size = _FIXED.get(kind)
    if size is not None:
        at += size
    elif kind in _VARIABLE:
        if at + 4 > limit:
            raise Malformed(f"{what}: a value's length is cut off")
        length = int.from_bytes(data[at : at + 4], "big")
        start, at = at + 4, at + 4 + length
        if at <= limit and end is not None and isinstance(data, memoryview):
            if kind == b"F":
                _walk_table(data, start, at, depth + 1, what)
            elif kind == b"A":
                _walk_array(data, start, at, depth + 1, what)
    else:
        printable = kind.decode("latin-1") if kind else "end of data"
        raise Malformed(f"{what}: unknown field type {printable!r}")
    if at > limit:
        raise Malformed(f"{what}: a value overruns the table")
    return at


def table_int(table: bytes, key: bytes) -> int | None:
    """The integer value of ``key`` in a field table's content (the last one, if repeated),
    or None: absent, not an integer, or a table that does not parse."""
    try:
        entries = table_entries(table)
    except Malformed:
        return None
    found: int | None = None
    for k, kind, value in entries:
        if k == key and kind in _INTEGERS:
            _, signed = _INTEGERS[kind]
            found = int.from_bytes(value, "big", signed=signed)
    return found


class ByteArray(bytes):
    """A header value to write as a byte array ('x') rather than a long string."""


def encode_entries(items: Iterable[tuple[str, str | int | bytes]]) -> bytes:
    """Field-table entries for our own headers: text as a long string ('S', UTF-8), bytes
    as a long string of exactly those bytes (AMQP's long strings are octets), a
    :class:`ByteArray` as a byte array ('x'), integers as a signed 64-bit ('l', RabbitMQ's
    dialect)."""
    out = bytearray()
    for key, value in items:
        name = key.encode()
        if len(name) > 255:
            raise ValueError(f"header name {key[:40]!r}... is longer than 255 bytes")
        out += _U8.pack(len(name)) + name
        if isinstance(value, bool):
            out += b"t" + (b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            out += b"l" + value.to_bytes(8, "big", signed=True)
        elif isinstance(value, ByteArray):
            out += b"x" + _U32.pack(len(value)) + value
        elif isinstance(value, bytes):
            out += b"S" + _U32.pack(len(value)) + value
        else:
            text = value.encode("utf-8", "backslashreplace")
            out += b"S" + _U32.pack(len(text)) + text
    return bytes(out)


def shortstr(value: str | bytes) -> bytes:
    """A raw short-string property value (``value`` encoded as UTF-8 if text)."""
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError("a short string is at most 255 bytes")
    return raw


def body_size(payload: bytes | memoryview) -> int:
    """The body size a content header payload announces."""
    value: int = _U64.unpack_from(payload, 4)[0]
    return value


def decode_table(table: bytes) -> dict[str, object]:
    """A field table's content as Python values, for reading what the broker and the
    worker wrote (``x-death``, ``x-error-*``): keys and strings as text (invalid UTF-8
    escaped), integers, floats, booleans, nested tables as dicts and arrays as lists, byte
    arrays as bytes, timestamps as seconds. Raises :class:`Malformed`."""
    check_table(table, "headers")
    return _decode_entries(memoryview(table))


def _decode_entries(data: memoryview) -> dict[str, object]:
    out: dict[str, object] = {}
    at = 0
    while at < len(data):
        length = data[at]
        key = bytes(data[at + 1 : at + 1 + length]).decode("utf-8", "backslashreplace")
        at += 1 + length
        value, at = _decode_value(data, at)
        out[key] = value
    return out


def _decode_value(data: memoryview, at: int) -> tuple[object, int]:
    kind = bytes(data[at : at + 1])
    at += 1
    end = _skip_value(data, at, kind, depth=0, what="headers")
    raw = bytes(data[at:end])
    if kind in _INTEGERS:
        _, signed = _INTEGERS[kind]
        return int.from_bytes(raw, "big", signed=signed), end
    if kind == b"t":
        return raw != b"\x00", end
    if kind == b"T":
        return int.from_bytes(raw, "big"), end
    if kind == b"d":
        return struct.unpack(">d", raw)[0], end
    if kind == b"f":
        return struct.unpack(">f", raw)[0], end
    if kind == b"S":
        return raw[4:].decode("utf-8", "backslashreplace"), end
    if kind == b"x":
        return raw[4:], end
    if kind == b"F":
        return _decode_entries(memoryview(raw[4:])), end
    if kind == b"A":
        items = []
        inner = memoryview(raw[4:])
        pos = 0
        while pos < len(inner):
            item, pos = _decode_value(inner, pos)
            items.append(item)
        return items, end
    if kind == b"D":
        scale, value = raw[0], int.from_bytes(raw[1:], "big", signed=True)
        return value / (10**scale), end
    return None, end  # V: void
