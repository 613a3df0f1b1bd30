"""The bad-input catalogue: every kind of bad message at once, among valid neighbours.

One row per kind of input. Each bad message is dead-lettered with the reason
``docs/events.md`` documents for it, its valid neighbours in the same batch are stored, the
worker keeps consuming, and the logs name the event and the reason, never the payload. Two
rows are accepted on purpose, as documented: integers beyond 64 bits are stored exactly,
and of duplicate keys the last one wins.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import aiormq
import asyncpg
import orjson
import pytest
from pamqp import commands as spec

from tests.conftest import AMQP_URL
from tests.factories import Tenant, encode, event_doc, make_tenant
from tests.helpers import (
    count,
    drain,
    header,
    publish,
    queue_depth,
    running,
    sample,
    wait_until,
)
from worker import logs
from worker.config import Settings
from worker.ingest.worker import Worker

# A string in every bad body that carries a payload: it must never reach a log line.
MARKER = "PAYLOAD-MUST-NOT-BE-LOGGED"
MAX_BYTES = 16_384
BIG = "123456789012345678901234567890123456789"  # far beyond 64 bits


@dataclass(frozen=True)
class Row:
    name: str
    body: bytes
    reason: str | None  # None: stored, as docs/events.md says
    content_type: str | None = "application/json"
    content_encoding: str | None = None


def _doc(t: Tenant, **changes: object) -> dict[str, object]:
    doc = event_doc(t, request={"messages": [{"role": "user", "content": MARKER}]})
    doc.update(changes)
    return doc


def _without(t: Tenant, field: str) -> bytes:
    return orjson.dumps({k: v for k, v in _doc(t).items() if k != field})


def catalogue(t: Tenant, other: Tenant) -> list[Row]:
    good = encode(_doc(t))

    def with_request(raw: bytes) -> bytes:
        """A valid event of its own, its request replaced by raw JSON text (what orjson
        cannot write)."""
        body = encode(_doc(t))
        start = body.index(b'"request":') + len(b'"request":')
        return body[:start] + raw + body[body.index(b',"response":') :]

    return [
        Row("malformed JSON", b'{"event_id": "' + MARKER.encode(), "invalid_json"),
        Row("trailing junk", good + b" junk", "invalid_json"),
        Row("byte order mark", b"\xef\xbb\xbf" + good, "invalid_json"),
        Row("empty body", b"", "invalid_json"),
        Row("not an object", orjson.dumps([MARKER]), "not_an_object"),
        Row("missing field", _without(t, "provider"), "missing_field"),
        Row("wrong type", encode(_doc(t, provider=42)), "invalid_field"),
        Row("invalid UUID", encode(_doc(t, event_id="not-a-uuid")), "invalid_field"),
        Row(
            "timestamp without offset",
            encode(_doc(t, occurred_at="2025-08-14T14:13:29")),
            "invalid_field",
        ),
        Row(
            "impossible date", encode(_doc(t, occurred_at="2025-02-30T10:00:00Z")), "invalid_field"
        ),
        Row("infinity timestamp", encode(_doc(t, occurred_at="infinity")), "invalid_field"),
        Row(
            "NUL in request",
            encode(_doc(t, request={"content": MARKER + "\u0000"})),
            "unstorable_content",
        ),
        Row(
            "NUL in response",
            encode(_doc(t, response={"text": MARKER + "\u0000"})),
            "unstorable_content",
        ),
        Row(
            "lone surrogate",
            with_request(b'{"content": "' + MARKER.encode() + b'\\ud800"}'),
            "invalid_json",
        ),
        Row(
            "invalid UTF-8",
            with_request(b'{"content": "' + MARKER.encode() + b'\xff\xfe"}'),
            "invalid_json",
        ),
        Row("NaN literal", with_request(b'{"temperature": NaN}'), "invalid_json"),
        Row("Infinity literal", with_request(b'{"temperature": Infinity}'), "invalid_json"),
        Row("too deep", with_request(b'{"d": ' + b"[" * 1100 + b"]" * 1100 + b"}"), "invalid_json"),
        Row("over the size limit", encode(_doc(t, pad="x" * MAX_BYTES)), "payload_too_large"),
        Row("unsupported content type", good, "unsupported_content_type", "text/plain"),
        Row(
            "unsupported encoding",
            good,
            "unsupported_content_type",
            "application/json",
            "gzip",
        ),
        Row("unknown template", encode(_doc(t, template_id=str(uuid.uuid4()))), "unknown_template"),
        Row(
            "template of another org",
            encode(_doc(t, template_id=other.template_id)),
            "template_tenant_mismatch",
        ),
        Row("integer beyond 64 bits", with_request(b'{"big": ' + BIG.encode() + b"}"), None),
        Row(
            "duplicate keys",
            with_request(b'{"k": "first", "k": "last"}').replace(
                b'"provider":"openai"', b'"provider":"first","provider":"openai"'
            ),
            None,
        ),
    ]


@pytest.mark.timeout(90)
async def test_every_row_of_the_bad_input_catalogue(
    settings: Settings, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Every bad input, in one batch with valid neighbours: each dead-lettered with its
    documented reason; big integers kept exactly and the last duplicate key winning; the
    neighbours stored in that same transaction; the worker consuming on; logs naming the
    event and reason, never the payload."""
    t, other = await make_tenant(conn), await make_tenant(conn)
    rows = catalogue(t, other)
    assert len({r.name for r in rows}) == len(rows)
    ids = {r.name: f"bad-{i}-{uuid.uuid4().hex[:6]}" for i, r in enumerate(rows)}
    accepted = {r.name: orjson.loads(r.body)["event_id"] for r in rows if r.reason is None}
    neighbours = [encode(event_doc(t)) for _ in range(2 * len(rows))]

    caplog.set_level(logging.INFO)
    wave: list[tuple[bytes, spec.Basic.Properties]] = []
    for i, row in enumerate(rows):
        message_id = ids[row.name] if row.reason else accepted[row.name]
        wave.append((row.body, _props(message_id, row.content_type, row.content_encoding)))
        wave += [(b, _props(None)) for b in neighbours[2 * i : 2 * i + 2]]
    # One processor, held up by a first event waiting on a table lock: the whole wave,
    # bad messages and neighbours interleaved, gathers behind it and is cut as one batch.
    worker = Worker(settings.replace(max_event_bytes=MAX_BYTES, batch_wait_ms=500, db_pool_size=1))
    async with running(worker):
        async with conn.transaction():
            await conn.execute("LOCK TABLE prompt_results IN SHARE MODE")
            await publish([encode(event_doc(t))], settings.exchange)
            await wait_until(lambda: _worker_waits(conn), message="the first batch held up")
            await _publish(wave, settings.exchange)
            await wait_until(lambda: _held(worker, 1 + len(wave)), message="the wave received")
        rejected = sum(1 for r in rows if r.reason)
        stored = 1 + len(neighbours) + len(accepted)
        await wait_until(lambda: _at_least(conn, stored), message="neighbours stored")
        await wait_until(
            lambda: _depth(settings.dead_letter_queue, rejected), message="every row dead-lettered"
        )
        assert sample(worker, "prompter_batches_total") == 2  # the first event, then the wave
        # Still consuming after all of that.
        await publish([encode(event_doc(t)) for _ in range(5)], settings.exchange)
        await wait_until(lambda: _at_least(conn, stored + 5), message="events after the catalogue")

    dead = await drain(settings.dead_letter_queue)
    got = {m.header.properties.message_id: header(m, "x-error-reason") for m in dead}
    assert got == {ids[r.name]: r.reason for r in rows if r.reason}
    assert await count(conn) == stored + 5
    assert await queue_depth(settings.queue) == 0

    big = await conn.fetchrow(
        "SELECT request::text AS text FROM prompt_results WHERE id = $1",
        uuid.UUID(accepted["integer beyond 64 bits"]),
    )
    assert f'"big": {BIG}' in big["text"]
    dup = await conn.fetchrow(
        "SELECT request->>'k' AS k, v.provider FROM prompt_results r"
        " JOIN prompt_versions v ON v.id = r.version_id WHERE r.id = $1",
        uuid.UUID(accepted["duplicate keys"]),
    )
    assert (dup["k"], dup["provider"]) == ("last", "openai")

    rejections = [r for r in caplog.records if r.getMessage().startswith("event rejected")]
    logged = {(getattr(r, "event_id", None), getattr(r, "reason", None)) for r in rejections}
    assert logged == {(ids[r.name], r.reason) for r in rows if r.reason}
    formatter = logs.JsonFormatter()
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert MARKER not in text


def _props(
    message_id: str | None,
    content_type: str | None = "application/json",
    content_encoding: str | None = None,
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        delivery_mode=2,
        content_type=content_type,
        content_encoding=content_encoding,
        message_id=message_id,
    )


async def _publish(messages: list[tuple[bytes, spec.Basic.Properties]], exchange: str) -> None:
    """Publish on one channel, each message with its own properties; wait for the confirms."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await asyncio.gather(
            *(
                channel.basic_publish(
                    body, exchange=exchange, routing_key="prompt_run.v1", properties=props
                )
                for body, props in messages
            )
        )
    finally:
        await connection.close()


async def _worker_waits(conn: asyncpg.Connection) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'prompter-worker'"
        " AND datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(n)


async def _held(worker: Worker, n: int) -> bool:
    return sum(s.held for s in worker.session.sources) >= n


async def _at_least(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


async def _depth(queue: str, n: int) -> bool:
    return await queue_depth(queue) >= n


# --- the AMQP rows: what the message around the event holds ----------------------------


@dataclass(frozen=True)
class AmqpRow:
    name: str
    fields: dict[str, bytes]  # raw properties (tests.rawamqp.properties)
    reason: str | None  # None: the (valid) event is stored
    body: str = "valid"  # "valid": a valid event; "unknown": a valid event of no template


UNSUPPORTED = "unsupported_content_type"


def amqp_catalogue() -> list[AmqpRow]:
    from tests import rawamqp

    binary = bytes(range(240, 256))
    bad_key = rawamqp.table((b"\xff\xfe", rawamqp.longstr(b"\xc0\x80")))
    counters = rawamqp.table(
        (b"x-delivery-count", rawamqp.long_int(99)), (b"x-acquired-count", rawamqp.long_int(99))
    )
    unknown, stored = "unknown_template", None
    charset = b"application/json; charset=utf-8"
    odd = {
        "correlation_id": b"\x00\x01",
        "reply_to": b"\xff",
        "type": b"\x80",
        "app_id": b"",
        "priority": b"\xff",
        "timestamp": b"\xff" * 8,
        "expiration": b"86400000",
        "user_id": b"guest",
    }
    return [
        AmqpRow("binary message id", {"message_id": binary}, stored),
        AmqpRow("binary message id, refused", {"message_id": binary}, unknown, "unknown"),
        AmqpRow("charset in the content type", {"content_type": charset}, stored),
        AmqpRow("content type not UTF-8", {"content_type": b"\xff\xfe"}, UNSUPPORTED),
        AmqpRow("content encoding not UTF-8", {"content_encoding": b"\xff"}, UNSUPPORTED),
        AmqpRow("header key not UTF-8", {"headers": bad_key}, stored),
        AmqpRow("header key not UTF-8, refused", {"headers": bad_key}, unknown, "unknown"),
        AmqpRow("counters set by the publisher", {"headers": counters}, stored),
        AmqpRow("every property, odd values", odd, stored),
    ]


async def test_every_row_of_the_amqp_catalogue(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Every kind of odd AMQP message around an event, among valid neighbours: the valid
    events are stored whatever their properties and headers; the refused ones are
    dead-lettered with their documented reason and their own property bytes; the worker
    never reconnects and keeps consuming."""
    from tests import rawamqp
    from worker.amqp.frames import RawProperties, decode_table

    t = await make_tenant(conn)
    rows = amqp_catalogue()
    messages = []
    refused: dict[bytes, tuple[str, dict[str, bytes]]] = {}
    for row in rows:
        doc = _doc(t)
        if row.body == "unknown":
            doc["template_id"] = str(uuid.uuid4())
        body = encode(doc)
        messages.append(rawamqp.json_message(body, **row.fields))
        if row.reason:
            refused[body] = (row.reason, row.fields)
        messages.append(rawamqp.json_message(encode(event_doc(t))))
    stored = len(messages) - len(refused)
    worker = Worker(settings)
    async with running(worker):
        await rawamqp.publish(messages, settings.exchange)
        await wait_until(lambda: _at_least(conn, stored), message="the valid events stored")
        await wait_until(
            lambda: _depth(settings.dead_letter_queue, len(refused)), message="rows refused"
        )
        await rawamqp.publish(
            good := [rawamqp.json_message(encode(event_doc(t)))], settings.exchange
        )
        await wait_until(lambda: _at_least(conn, stored + len(good)), message="still consuming")
    assert sample(worker, "prompter_reconnects_total", server="broker") == 0
    dead = await rawamqp.drain(settings.dead_letter_queue)
    assert {body for _, body in dead} == set(refused)
    for header_bytes, body in dead:
        reason, fields = refused[body]
        props = RawProperties.parse(header_bytes)
        assert decode_table(props.fields["headers"])["x-error-reason"] == reason
        for name, value in fields.items():
            if name == "headers":  # each entry kept byte for byte (the broker may add some)
                assert value in props.fields["headers"]
            elif name not in ("expiration", "user_id"):
                assert props.fields[name] == value, name
    assert await count(conn) == stored + 1
