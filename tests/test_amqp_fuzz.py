"""The frame parser by construction: whatever the broker (or a publisher, through it) sends.

Random sequences of valid frames (deliveries with random property lists and header tables,
keys and strings that are not UTF-8 included, bodies split over many frames, heartbeats,
other channel methods, two channels interleaved) cut at random byte boundaries must parse
to exactly the messages sent. Random corruptions of such a stream must never raise out of
the parser: they end, if at all, in a clean connection error, and the buffer never grows
past one frame.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import heartbeat as amqp_heartbeat

from worker.amqp import protocol as amqp
from worker.amqp.frames import PROPERTIES, Malformed, RawProperties, table_entries

FRAME_MAX = 4096


@dataclass(frozen=True)
class Sent:
    channel: int
    tag: int
    header: bytes
    body: bytes


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def deliver_method(tag: int, redelivered: bool, routing_key: bytes) -> bytes:
    consumer_tag = b"ctag-\xff\x00"
    return (
        struct.pack(">HH", 60, 60)
        + bytes((len(consumer_tag),))
        + consumer_tag
        + struct.pack(">QB", tag, int(redelivered))
        + b"\x0fprompter.events"
        + bytes((len(routing_key),))
        + routing_key
    )


raw_bytes = st.binary(max_size=40)
shortstrs = st.one_of(
    st.sampled_from([b"application/json", b"text/plain", b"\xff\xfe", b""]), raw_bytes
)


@st.composite
def table_values(draw: st.DrawFn, depth: int = 0) -> bytes:
    kinds = ["t", "b", "s", "I", "l", "d", "S", "x", "T", "V"] + (["F", "A"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind in ("S", "x"):
        value = draw(raw_bytes)
        return kind.encode() + struct.pack(">I", len(value)) + value
    if kind == "F":
        inner = draw(tables(depth + 1))
        return b"F" + struct.pack(">I", len(inner)) + inner
    if kind == "A":
        items = b"".join(draw(st.lists(table_values(depth + 1), max_size=3)))
        return b"A" + struct.pack(">I", len(items)) + items
    size = {"t": 1, "b": 1, "s": 2, "I": 4, "l": 8, "d": 8, "T": 8, "V": 0}[kind]
    return kind.encode() + draw(st.binary(min_size=size, max_size=size))


@st.composite
def tables(draw: st.DrawFn, depth: int = 0) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        key = draw(
            st.one_of(
                st.sampled_from([b"x-delivery-count", b"x-acquired-count", b"\xff\xfekey"]),
                raw_bytes.filter(lambda k: len(k) < 50),
            )
        )
        out += bytes((len(key),)) + key + draw(table_values(depth))
    return out


@st.composite
def property_lists(draw: st.DrawFn) -> RawProperties:
    fields: dict[str, bytes] = {}
    for name, _, kind in PROPERTIES:
        if not draw(st.booleans()):
            continue
        if kind == "s":
            fields[name] = draw(shortstrs)
        elif kind == "F":
            fields[name] = draw(tables())
        elif kind == "o":
            fields[name] = draw(st.binary(min_size=1, max_size=1))
        else:
            fields[name] = draw(st.binary(min_size=8, max_size=8))
    return RawProperties(fields)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[Sent]]:
    """Frames of up to 6 messages over channels 1 and 2, interleaved, with noise frames."""
    per_channel: dict[int, list[list[bytes]]] = {1: [], 2: []}
    sent: dict[int, list[Sent]] = {1: [], 2: []}
    for i in range(draw(st.integers(1, 6))):
        channel = draw(st.sampled_from([1, 2]))
        tag = len(sent[channel]) + 1
        body = draw(st.binary(max_size=3 * FRAME_MAX))
        header = draw(property_lists()).build(len(body))
        routing_key = draw(st.sampled_from([b"prompt_run.v1", b"\xff.\xfe"]))
        frames = [
            frame(1, channel, deliver_method(tag, draw(st.booleans()), routing_key)),
            frame(2, channel, header),
        ]
        step = FRAME_MAX - 8
        frames += [frame(3, channel, body[at : at + step]) for at in range(0, len(body), step)]
        per_channel[channel].append(frames)
        sent[channel].append(Sent(channel, tag, header, body))
        del i
    noise = [
        amqp_frame.marshal(amqp_heartbeat.Heartbeat(), 0),
        amqp_frame.marshal(spec.Basic.QosOk(), 1),
        amqp_frame.marshal(spec.Basic.ConsumeOk(consumer_tag="c"), 2),
    ]
    queues = {c: [f for message in per_channel[c] for f in message] for c in (1, 2)}
    out: list[bytes] = []
    order: list[Sent] = []
    done = {1: 0, 2: 0}
    while queues[1] or queues[2]:
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from(noise)))
        channel = draw(st.sampled_from([c for c in (1, 2) if queues[c]]))
        f = queues[channel].pop(0)
        out.append(f)
        # A message is complete once its last frame is out.
        message = sent[channel][done[channel]]
        remaining = sum(len(m) for m in per_channel[channel][done[channel] + 1 :])
        if len(queues[channel]) == remaining:
            order.append(message)
            done[channel] += 1
    return b"".join(out), order


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *edges], [*edges, len(data)], strict=True)]


def parse(chunks: list[bytes]) -> tuple[list[amqp.Delivery], amqp.Connection, int]:
    got: list[amqp.Delivery] = []

    async def run() -> tuple[amqp.Connection, int]:
        protocol = amqp.Connection(got.append, heartbeat=0)
        protocol.frame_max = FRAME_MAX
        longest = 0
        for chunk in chunks:
            protocol.data_received(chunk)
            longest = max(longest, len(protocol.reader.buffer))
        return protocol, longest

    protocol, longest = asyncio.run(run())
    return got, protocol, longest


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.lists(st.integers(0, 1 << 20), max_size=30))
def test_valid_streams_cut_anywhere_parse_to_what_was_sent(
    stream: tuple[bytes, list[Sent]], points: list[int]
) -> None:
    """Exactly the messages sent come out, in completion order, with their bodies and
    header bytes intact; properties that split are read the same way the builder wrote
    them; nothing closes the connection."""
    data, sent = stream
    got, protocol, _ = parse(cut(data, points))
    assert not protocol.closed.done()
    assert [(d.channel, d.delivery_tag, d.header, d.body) for d in got] == [
        (s.channel, s.tag, s.header, s.body) for s in sent
    ]
    for d in got:
        props = d.properties
        assert props.build(len(d.body)) == d.header
        if "headers" in props.fields:
            table_entries(props.fields["headers"])  # splits without raising
        assert d.routing_key_raw in (b"prompt_run.v1", b"\xff.\xfe")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    streams(),
    st.lists(
        st.tuples(st.integers(0, 1 << 20), st.sampled_from(["flip", "insert", "delete"])),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(0, 1 << 20), max_size=10),
)
def test_corrupted_streams_never_raise_and_end_cleanly(
    stream: tuple[bytes, list[Sent]],
    corruptions: list[tuple[int, str]],
    points: list[int],
) -> None:
    """Flipped, inserted or deleted bytes anywhere: the parser never raises; if it gives up
    the connection is closed with a protocol error; the buffer holds at most one frame and
    one read; every delivery it did hand over is whole (its properties split or are refused
    with a reason, never an exception of another kind)."""
    data = bytearray(stream[0])
    for where, how in corruptions:
        at = where % (len(data) + 1)
        if how == "flip" and at < len(data):
            data[at] ^= 0xFF
        elif how == "insert":
            data[at:at] = b"\xce\x01\x00"
        elif how == "delete" and at < len(data):
            del data[at]
    chunks = cut(bytes(data), points)
    got, protocol, longest = parse(chunks)
    assert longest <= FRAME_MAX + max((len(c) for c in chunks), default=0)
    if protocol.closed.done():
        error = protocol.closed.exception()
        assert isinstance(error, amqp.AMQPError)
        assert "protocol error" in str(error)
    for d in got:
        try:
            props: RawProperties | None = d.properties
        except Malformed:
            props = None
        assert props is None or props.build(0)[12:] == d.header[12:]  # split losslessly
        assert d.message_id is None or isinstance(d.message_id, str)


def test_an_oversized_frame_closes_the_connection_before_it_is_buffered() -> None:
    """A frame announcing more than the negotiated frame_max is refused at its header."""
    got, protocol, longest = parse([struct.pack(">BHI", 3, 1, 10_000_000) + b"\x00" * 100])
    assert got == []
    assert longest <= 107
    assert "exceeds the negotiated frame_max" in str(protocol.closed.exception())


@settings(max_examples=150, deadline=None)
@example(properties=RawProperties({"content_type": b"application/json"}), keep=14)
@given(property_lists(), st.integers(14, 1 << 12))
def test_a_property_list_cut_short_is_a_delivery_refused_not_a_closed_connection(
    properties: RawProperties, keep: int
) -> None:
    """A content header (body size 0) whose property list ends early, down to the flags
    alone: the delivery comes out, marked invalid when the reader had to look into it (it
    is then dead-lettered as invalid_properties), and the connection stays open. A
    14-byte header announcing a content type used to raise IndexError in the reader and
    close the connection: every redelivery the same."""
    header = properties.build(0)
    cut_short = header[: min(keep, len(header))]
    data = frame(1, 1, deliver_method(1, False, b"prompt_run.v1")) + frame(2, 1, cut_short)
    got, protocol, _ = parse([data])
    assert not protocol.closed.done()
    [delivery] = got
    if len(cut_short) < len(header) and "headers" in properties.fields:
        assert delivery.invalid is not None
    if len(cut_short) == 14 and "content_type" in properties.fields:
        assert delivery.invalid is not None
