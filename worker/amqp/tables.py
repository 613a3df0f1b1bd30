"""AMQP 0-9-1 field tables (the ``headers`` property) as bytes: checked, split into raw
entries, read one integer at a time, decoded for display, and built for our own headers.

A table is walked without decoding it (no recursion bomb: nesting is bounded), so no byte
a publisher sends can make it raise anything but :class:`Malformed`, with the reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Final

_U32 = struct.Struct(">I")
_U8 = struct.Struct(">B")

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
