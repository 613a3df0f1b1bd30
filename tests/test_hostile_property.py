"""The whole path by construction: random messages through the real broker to a real worker.

Each example publishes, with raw property bytes (:mod:`tests.rawamqp`), a random mix of

- valid events dressed in random properties (binary message ids, random header tables with
  keys and strings that are not UTF-8, publisher-set delivery counters, the content types
  the contract accepts, random priorities and timestamps), which must be stored once each;
- hostile messages: random bytes, rows of the bad-input catalogue, valid events under a
  content type or encoding the contract refuses, each with random properties, which must
  each be dead-lettered with an ``x-error-reason``.

The worker must never exit, every valid event must be stored exactly once, the dead-letter
queue must hold exactly the hostile messages (their bodies byte for byte), and the ingest
queue must settle at zero with nothing held.
"""

from __future__ import annotations

import asyncio
import struct
import uuid

import asyncpg
import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import rawamqp
from tests.factories import Tenant, encode, event_doc, make_tenant
from tests.helpers import count, queue_depth, running, wait_until
from worker.amqp.frames import RawProperties, decode_table
from worker.config import Settings
from worker.ingest.worker import Worker

raw = st.binary(max_size=24)
keys = st.one_of(st.sampled_from([b"x-delivery-count", b"x-acquired-count", b"\xff\xfe"]), raw)


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["S", "l", "I", "t", "x", "F", "A", "T", "d"]))
    if kind in ("S", "x"):
        value = draw(raw)
        return kind.encode() + struct.pack(">I", len(value)) + value
    if kind == "F":
        inner = rawamqp.table((b"k", rawamqp.longstr(draw(raw))))
        return b"F" + struct.pack(">I", len(inner)) + inner
    if kind == "A":
        item = rawamqp.long_int(draw(st.integers(-(2**63), 2**63 - 1)))
        return b"A" + struct.pack(">I", len(item)) + item
    size = {"l": 8, "I": 4, "t": 1, "T": 8, "d": 8}[kind]
    return kind.encode() + draw(st.binary(min_size=size, max_size=size))


@st.composite
def dressing(draw: st.DrawFn, *, content_types: list[bytes | None]) -> dict[str, bytes]:
    """Random properties, with a content type from ``content_types`` (None: absent)."""
    fields: dict[str, bytes] = {}
    content_type = draw(st.sampled_from(content_types))
    if content_type is not None:
        fields["content_type"] = content_type
    if draw(st.booleans()):
        fields["message_id"] = draw(raw)
    if draw(st.booleans()):
        entries = draw(st.lists(st.tuples(keys, header_values()), max_size=5))
        fields["headers"] = rawamqp.table(*entries)
    for name, size in (("priority", 1), ("timestamp", 8)):
        if draw(st.booleans()):
            fields[name] = draw(st.binary(min_size=size, max_size=size))
    for name in ("correlation_id", "app_id", "type", "reply_to"):
        if draw(st.booleans()):
            fields[name] = draw(raw)
    return fields


ACCEPTED = [None, b"application/json", b"application/json; charset=utf-8", b" APPLICATION/JSON"]
REFUSED = [b"text/plain", b"\xff\xfe", b"application/xml", b""]


@st.composite
def batch(draw: st.DrawFn, tenant: Tenant) -> tuple[list[tuple[bytes, bytes]], int, set[bytes]]:
    """Messages in a random order, how many are valid, and the bodies of the hostile."""
    messages: list[tuple[bytes, bytes]] = []
    hostile: set[bytes] = set()
    valid = draw(st.integers(1, 12))
    # Fresh ids in every example (hypothesis replays its draws: an id drawn from it would be
    # a repeat of an event an earlier example stored).
    ids = iter(uuid.uuid4() for _ in range(valid + 16))
    for _ in range(valid):
        doc = event_doc(tenant, event_id=str(next(ids)))
        messages.append(rawamqp.json_message(encode(doc), **draw(dressing(content_types=ACCEPTED))))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["bytes", "catalogue", "content_type", "encoding"]))
        marker = str(next(ids)).encode()
        if kind == "bytes":
            body = marker + draw(st.binary(max_size=200))
        elif kind == "catalogue":
            doc = event_doc(tenant, event_id=str(next(ids)))
            field = draw(st.sampled_from(["occurred_at", "org_id", "request", "provider"]))
            invalid: list[object] = [None, 42, "", [1], "   "]
            if field == "occurred_at":
                invalid.append("9999-12-31T23:59:59-01:00")
            doc[field] = draw(st.sampled_from(invalid))
            doc["marker"] = marker.decode()
            body = orjson.dumps(doc)
        else:
            doc = event_doc(tenant, event_id=str(next(ids)), marker=marker.decode())
            body = encode(doc)
        fields = draw(dressing(content_types=ACCEPTED if kind != "content_type" else REFUSED))
        if kind == "encoding":
            fields["content_encoding"] = draw(st.sampled_from([b"gzip", b"br", b"\xff"]))
        messages.append(rawamqp.json_message(body, **fields))
        hostile.add(body)
    return draw(st.permutations(messages)), valid, hostile


async def _quiet(worker: Worker, settings_: Settings, conn: asyncpg.Connection, rows: int) -> bool:
    held = sum(s.held for s in worker.session.sources)
    return held == 0 and await count(conn) >= rows and await queue_depth(settings_.queue) == 0


@settings(
    max_examples=15,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_messages_among_valid_neighbours(
    settings: Settings, database: str, data: st.DataObject
) -> None:
    """See the module docstring."""

    async def example() -> None:
        conn = await asyncpg.connect(database)
        try:
            tenant = await make_tenant(conn)
            messages, valid, hostile = data.draw(batch(tenant))
            before = await count(conn)
            worker = Worker(settings)
            async with running(worker) as task:
                await rawamqp.publish(messages, settings.exchange)

                async def settled() -> bool:
                    return await _quiet(worker, settings, conn, before + valid) and (
                        await queue_depth(settings.dead_letter_queue) >= len(hostile)
                    )

                await wait_until(settled, within=40, message="every message settled")
                assert not task.done()
            assert await count(conn) == before + valid
            dead = await rawamqp.drain(settings.dead_letter_queue)
            assert {body for _, body in dead} == hostile
            for header, _ in dead:
                headers = decode_table(RawProperties.parse(header).fields["headers"])
                assert headers["x-error-reason"]
        finally:
            await conn.close()

    asyncio.run(example())
