"""Hostile messages at the AMQP layer, as other teams' clients send them (issue 12's cases).

Each test publishes with :mod:`tests.rawamqp` (raw property bytes, as a Go client with
binary message ids or a client writing non-UTF-8 header keys does) through the real
broker to a real worker, among valid neighbours, and checks: the worker keeps running and
consuming, every valid neighbour is stored once, every refused message is in the
dead-letter queue with its reason and its own bytes, and the ingest queue settles at zero.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import aiormq
import asyncpg
import orjson
import pytest

from tests import rawamqp
from tests.conftest import AMQP_URL
from tests.factories import Tenant, encode, event_doc, make_tenant
from tests.helpers import count, queue_depth, running, sample, wait_until
from worker.amqp import broker
from worker.amqp.frames import RawProperties, table_entries
from worker.amqp.protocol import Connection, Delivery
from worker.config import Settings
from worker.ingest.worker import Worker

BINARY_ID = bytes(range(240, 256))  # 16 bytes, not UTF-8: a Go service's raw UUID
MARKER = "HOSTILE-PAYLOAD-MUST-NOT-BE-LOGGED"


def good(t: Tenant, n: int) -> list[tuple[bytes, bytes]]:
    return [rawamqp.json_message(encode(event_doc(t))) for _ in range(n)]


def refused_body(t: Tenant) -> bytes:
    """A valid event of an unknown template: refused by the store, so dead-lettered."""
    doc = event_doc(t, request={"content": MARKER})
    doc["template_id"] = str(uuid.uuid4())
    return encode(doc)


async def settled(settings: Settings, worker: Worker, conn: asyncpg.Connection, rows: int) -> None:
    async def done() -> bool:
        held = sum(s.held for s in worker.session.sources)
        return await count(conn) >= rows and held == 0 and await queue_depth(settings.queue) == 0

    await wait_until(done, within=60, message=f"{rows} rows and nothing held")


async def dead_letters(settings: Settings, n: int) -> list[tuple[bytes, bytes]]:
    await wait_until(
        lambda: _depth_at_least(settings.dead_letter_queue, n),
        within=60,
        message=f"{n} dead letters",
    )
    return await rawamqp.drain(settings.dead_letter_queue)


async def _depth_at_least(queue: str, n: int) -> bool:
    try:
        return await queue_depth(queue) >= n
    except aiormq.exceptions.ChannelNotFoundEntity:  # deleted, not declared again yet
        return False


def headers_of(header: bytes) -> dict[bytes, bytes]:
    props = RawProperties.parse(header)
    return {k: v for k, _, v in table_entries(props.fields.get("headers", b""))}


async def test_binary_message_id_on_a_refused_event_is_dead_lettered_as_sent(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """(case 1) A refused event whose message_id is 16 raw bytes is dead-lettered with that
    very message_id; its batch is acked; later events are stored and acked; the worker
    stays ready."""
    t = await make_tenant(conn)
    worker = Worker(settings)
    async with running(worker) as task:
        refused = rawamqp.json_message(refused_body(t), message_id=BINARY_ID)
        await rawamqp.publish([refused, *good(t, 20)], settings.exchange)
        [(header, body)] = await dead_letters(settings, 1)
        await settled(settings, worker, conn, 20)
        await rawamqp.publish(good(t, 10), settings.exchange)
        await settled(settings, worker, conn, 30)
        assert worker.health.ready
        assert not task.done()
    props = RawProperties.parse(header)
    assert props.fields["message_id"] == BINARY_ID
    assert headers_of(header)[b"x-error-reason"] == b"unknown_template"
    assert body == refused[1]


async def test_binary_message_id_on_a_valid_event_with_a_charset_is_stored(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """(case 2) A valid event with content type ``application/json; charset=utf-8`` and a
    binary message_id is stored; the worker does not exit."""
    t = await make_tenant(conn)
    worker = Worker(settings)
    async with running(worker) as task:
        message = rawamqp.json_message(
            encode(event_doc(t)),
            message_id=BINARY_ID,
            content_type=b"application/json; charset=utf-8",
        )
        await rawamqp.publish([message, *good(t, 5)], settings.exchange)
        await settled(settings, worker, conn, 6)
        assert not task.done()
    assert await queue_depth(settings.dead_letter_queue) == 0


async def test_header_keys_that_are_not_utf8_never_break_the_connection(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """(case 3) Header keys and values that are not UTF-8: the valid event is stored, the
    refused one is dead-lettered with those headers byte for byte, and the connection is
    never torn down (no reconnect)."""
    t = await make_tenant(conn)
    hostile = rawamqp.table(
        (b"\xff\xfekey", rawamqp.longstr(b"value \xff")),
        (b"trace\xc0", rawamqp.long_int(7)),
    )
    worker = Worker(settings)
    async with running(worker):
        messages = [
            rawamqp.json_message(encode(event_doc(t)), headers=hostile),
            rawamqp.json_message(refused_body(t), headers=hostile, message_id=b"refused-1"),
            *good(t, 5),
        ]
        await rawamqp.publish(messages, settings.exchange)
        [(header, _)] = await dead_letters(settings, 1)
        await settled(settings, worker, conn, 6)
    assert sample(worker, "prompter_reconnects_total", server="broker") == 0
    copied = headers_of(header)
    assert copied[b"\xff\xfekey"] == b"value \xff"
    assert copied[b"trace\xc0"] == (7).to_bytes(8, "big")
    assert copied[b"x-error-reason"] == b"unknown_template"


async def test_refused_events_sharing_a_message_id_are_each_confirmed_before_their_ack(
    settings: Settings, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """(cases 4 and 8) While the dead-letter queue is unbound, two refused events with the
    same message_id and one without any are all kept unacked (readiness false, with the
    reason), none is lost; once the queue is bound again each has its own copy and the
    queue settles. No log line holds the payload."""
    t = await make_tenant(conn)
    topology = broker.Topology.from_settings(settings)
    admin = await aiormq.connect(AMQP_URL)
    channel = await admin.channel()
    await broker.declare(channel, topology)
    await channel.queue_unbind(
        settings.dead_letter_queue, settings.dead_letter_exchange, routing_key="#"
    )
    worker = Worker(settings.replace(declare=False))  # checks the topology, never fixes it
    caplog.set_level(logging.DEBUG)
    try:
        async with running(worker):
            refused = [
                rawamqp.json_message(refused_body(t), message_id=b"same-id"),
                rawamqp.json_message(refused_body(t), message_id=b"same-id"),
                rawamqp.json_message(refused_body(t)),
            ]
            await rawamqp.publish([*refused, *good(t, 5)], settings.exchange)

            async def unready() -> bool:
                return not worker.health.ready and "dead_letter" in worker.health.problems

            await wait_until(
                unready, within=30, message="readiness false while dead-lettering fails"
            )
            assert "routed a copy nowhere" in worker.health.problems["dead_letter"]
            assert sum(s.held for s in worker.session.sources) >= 3
            await channel.queue_bind(
                settings.dead_letter_queue, settings.dead_letter_exchange, routing_key="#"
            )
            copies = await dead_letters(settings, 3)
            await settled(settings, worker, conn, 5)
            await wait_until(lambda: _ready(worker), message="ready again")
    finally:
        await admin.close()
    ids = sorted(RawProperties.parse(h).fields.get("message_id", b"") for h, _ in copies)
    assert ids == [b"", b"same-id", b"same-id"]
    assert sorted(b for _, b in copies) == sorted(b for _, b in refused)
    assert MARKER not in caplog.text


async def _ready(worker: Worker) -> bool:
    return worker.health.ready


async def test_a_deleted_dead_letter_queue_is_declared_again(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """(case 8) The dead-letter queue deleted under a running worker: the first copy comes
    back unroutable, the worker declares the topology again, and the copy lands."""
    t = await make_tenant(conn)
    worker = Worker(settings)
    async with running(worker):
        admin = await aiormq.connect(AMQP_URL)
        try:
            channel = await admin.channel()
            await channel.queue_delete(settings.dead_letter_queue)
        finally:
            await admin.close()
        await rawamqp.publish(
            [rawamqp.json_message(refused_body(t), message_id=b"r1"), *good(t, 3)],
            settings.exchange,
        )
        [(header, _)] = await dead_letters(settings, 1)
        await settled(settings, worker, conn, 3)
    assert RawProperties.parse(header).fields["message_id"] == b"r1"
    assert sample(worker, "prompter_retries_total", kind="dead_letter") >= 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("occurred_at", "9999-12-31T23:59:59-01:00"),
        ("occurred_at", "0001-01-01T00:00:00+01:00"),
        ("occurred_at", "0001-01-01T00:00:00Z"),  # asyncpg would write -infinity
        ("occurred_at", "FUTURE"),
        ("fingerprint_captured_at", "9999-12-31T23:59:59-01:00"),
    ],
)
async def test_timestamps_the_database_cannot_hold_are_refused_naming_the_field(
    settings: Settings, conn: asyncpg.Connection, field: str, value: str
) -> None:
    """(case 5) A timestamp outside what Python and PostgreSQL hold in UTC, or further in the
    future than PROMPTER_MAX_FUTURE_SECONDS, is dead-lettered as invalid_field naming the
    field; the worker keeps running and stores the neighbours."""
    if value == "FUTURE":
        value = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    t = await make_tenant(conn)
    doc = event_doc(t)
    doc[field] = value
    worker = Worker(settings)
    async with running(worker) as task:
        await rawamqp.publish(
            [rawamqp.json_message(orjson.dumps(doc)), *good(t, 5)], settings.exchange
        )
        [(header, _)] = await dead_letters(settings, 1)
        await settled(settings, worker, conn, 5)
        assert not task.done()
    headers = headers_of(header)
    assert headers[b"x-error-reason"] == b"invalid_field"
    assert f'"{field}"'.encode() in headers[b"x-error-detail"]


def test_a_delivery_count_set_by_the_publisher_is_not_trusted_on_a_first_delivery() -> None:
    """(case 6) Counters in the headers of a delivery the broker does not mark redelivered
    came from the publisher: ignored (otherwise every such message is a suspect, processed
    alone). On a redelivery they are the broker's and are read."""
    counters = rawamqp.table(
        (b"x-delivery-count", rawamqp.long_int(5)), (b"x-acquired-count", rawamqp.long_int(9))
    )
    header = rawamqp.properties(2, headers=counters, content_type=b"application/json")
    got: list[Delivery] = []

    async def feed(redelivered: bool, version: tuple[int, ...]) -> Delivery:
        protocol = Connection(got.append, heartbeat=0)
        protocol.reader.acquired_counts = version >= (4, 3)
        method = (
            b"\x00\x3c\x00\x3c\x01c"
            + (7).to_bytes(8, "big")
            + bytes((int(redelivered),))
            + b"\x01e\x01k"
        )
        frames = [(1, method), (2, header), (3, b"{}")]
        for kind, payload in frames:
            protocol.data_received(
                bytes((kind,)) + b"\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce"
            )
        return got[-1]

    assert asyncio.run(feed(False, (3, 10))).delivery_count == 0
    assert asyncio.run(feed(False, (4, 3))).delivery_count == 0
    assert asyncio.run(feed(True, (3, 10))).delivery_count == 5
    assert asyncio.run(feed(True, (4, 3))).delivery_count == 9


async def test_publisher_counters_do_not_make_a_flood_of_suspects(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """(case 6, end to end) 1,000 events carrying counter headers on their first delivery
    go in batches, not one by one."""
    t = await make_tenant(conn)
    counters = rawamqp.table(
        (b"x-delivery-count", rawamqp.long_int(5)), (b"x-acquired-count", rawamqp.long_int(5))
    )
    worker = Worker(settings)
    async with running(worker):
        messages = [
            rawamqp.json_message(encode(event_doc(t)), headers=counters) for _ in range(1000)
        ]
        await rawamqp.publish(messages, settings.exchange)
        await settled(settings, worker, conn, 1000)
    assert sample(worker, "prompter_batches_total") < 200


async def test_a_refused_message_with_headers_too_large_to_copy_is_dead_lettered_without_them(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """(case 7) A refused message whose ~130 KB of headers leave no room in a frame for the
    dead-lettering headers: its copy drops the original headers and says so in
    x-error-detail, keeps x-error-reason, and the connection is never torn down."""
    t = await make_tenant(conn)
    # 991 entries of 132 bytes and one of 128: the header frame is 130,959 bytes, 105 short
    # of the frame size; the dead-lettering headers need about 330 more.
    big = rawamqp.table(
        *((f"h{i:05d}".encode(), rawamqp.longstr(b"v" * 120)) for i in range(991)),
        (b"h99999", rawamqp.longstr(b"v" * 116)),
    )
    assert len(rawamqp.properties(0, headers=big, delivery_mode=b"\x02")) == 130_959
    worker = Worker(settings)
    async with running(worker):
        await rawamqp.publish(
            [rawamqp.json_message(refused_body(t), headers=big), *good(t, 5)], settings.exchange
        )
        [(header, _)] = await dead_letters(settings, 1)
        await settled(settings, worker, conn, 5)
    headers = headers_of(header)
    assert headers[b"x-error-reason"] == b"unknown_template"
    assert b"original headers" in headers[b"x-error-detail"]
    assert b"h00001" not in headers
    assert sample(worker, "prompter_reconnects_total", server="broker") == 0
