"""The worker's own AMQP consumer connection: frame parsing, and a real broker session."""

from __future__ import annotations

import asyncio
import uuid

import aiormq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as amqp_body
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header

from tests.conftest import AMQP_URL
from tests.helpers import wait_until
from worker.amqp import protocol as amqp


def deliver_frames(
    tag: int,
    body: bytes,
    props: spec.Basic.Properties,
    *,
    channel: int = 1,
    frame_max: int = 131_072,
    routing_key: str = "prompt_run.v1",
    redelivered: bool = False,
) -> bytes:
    out = amqp_frame.marshal(
        spec.Basic.Deliver(
            consumer_tag="ctag1.0123456789abcdef",
            delivery_tag=tag,
            redelivered=redelivered,
            exchange="prompter.events",
            routing_key=routing_key,
        ),
        channel,
    )
    out += amqp_frame.marshal(amqp_header.ContentHeader(0, len(body), props), channel)
    step = frame_max - 8
    for i in range(0, len(body), step):
        out += amqp_frame.marshal(amqp_body.ContentBody(body[i : i + step]), channel)
    return out


def feed(
    chunks: list[bytes], *, max_body: int = 1 << 62
) -> tuple[list[amqp.Delivery], amqp.Connection]:
    got: list[amqp.Delivery] = []

    async def run() -> amqp.Connection:
        protocol = amqp.Connection(got.append, heartbeat=0, max_body=max_body)
        for chunk in chunks:
            protocol.data_received(chunk)
        return protocol

    return got, asyncio.run(run())


JSON = spec.Basic.Properties(content_type="application/json", delivery_mode=2, message_id="m-1")


def test_deliveries_are_parsed_with_their_properties() -> None:
    """Tag, channel, body, and, on demand, every property, exchange and routing key."""
    data = deliver_frames(7, b'{"a": 1}', JSON, channel=2, redelivered=True)
    data += deliver_frames(8, b"", spec.Basic.Properties(delivery_mode=2), routing_key="x.y")
    got, _ = feed([data])
    assert [(d.channel, d.delivery_tag, d.body) for d in got] == [(2, 7, b'{"a": 1}'), (1, 8, b"")]
    first = got[0]
    assert first.plain_json
    assert first.redelivered
    assert (first.exchange, first.routing_key) == ("prompter.events", "prompt_run.v1")
    assert (first.content_type, first.message_id) == ("application/json", "m-1")
    assert first.properties.octet("delivery_mode") == 2
    assert got[1].routing_key == "x.y"
    assert got[1].content_type is None


def test_body_split_over_frames_is_joined() -> None:
    """A body larger than the frame size arrives whole."""
    payload = bytes(range(256)) * 40
    got, _ = feed([deliver_frames(1, payload, JSON, frame_max=1024)])
    assert got[0].body == payload


@pytest.mark.parametrize(
    ("props", "plain"),
    [
        (spec.Basic.Properties(), True),
        (spec.Basic.Properties(content_type="application/json"), True),
        (spec.Basic.Properties(content_type="text/plain"), False),
        (spec.Basic.Properties(content_type="application/json", content_encoding="gzip"), False),
    ],
)
def test_plain_json_flags_only_plain_json(props: spec.Basic.Properties, plain: bool) -> None:
    """Anything but absent or application/json, with no encoding, goes to the slow check."""
    got, _ = feed([deliver_frames(1, b"{}", props)])
    assert got[0].plain_json is plain


def test_delivery_count_header_is_read() -> None:
    """x-delivery-count (set by quorum queues on redelivery) is read from the headers."""
    props = spec.Basic.Properties(
        content_type="application/json", headers={"x-delivery-count": 3, "other": "x"}
    )
    got, _ = feed([deliver_frames(1, b"{}", props, redelivered=True)])
    assert got[0].delivery_count == 3
    assert sorted(got[0].properties.header_keys()) == [b"other", b"x-delivery-count"]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_deliveries(data: st.DataObject) -> None:
    """However the stream is cut into reads, the same deliveries come out, in order."""
    bodies = data.draw(st.lists(st.binary(max_size=3000), min_size=1, max_size=8))
    stream = b"".join(
        deliver_frames(i + 1, b, JSON, frame_max=data.draw(st.sampled_from([512, 4096, 131072])))
        for i, b in enumerate(bodies)
    )
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got, _ = feed(chunks)
    assert [(d.delivery_tag, d.body) for d in got] == [(i + 1, b) for i, b in enumerate(bodies)]


def test_a_corrupt_frame_closes_the_connection() -> None:
    """A frame without its end marker is a protocol error: the connection fails, loudly."""
    data = bytearray(deliver_frames(1, b"{}", JSON))
    data[-1] = 0
    got, protocol = feed([bytes(data)])
    assert got == []
    assert protocol.closed.done()
    with pytest.raises(amqp.AMQPError, match="bad frame end"):
        protocol.closed.result()


async def test_session_against_the_broker() -> None:
    """Handshake, channel, qos, consume, multiple-ack, cancel and close on a real broker."""
    queue = f"test.amqp.{uuid.uuid4().hex[:8]}"
    admin = await aiormq.connect(AMQP_URL)
    channel = await admin.channel(publisher_confirms=True)
    await channel.queue_declare(queue, arguments={"x-queue-type": "quorum"}, durable=True)
    try:
        got: list[amqp.Delivery] = []
        consumer = await amqp.connect(AMQP_URL, got.append, name="test-amqp", heartbeat=5)
        assert consumer.heartbeat == 5
        await consumer.open_channel(1, prefetch=10)
        tag = await consumer.consume(1, queue)
        for i in range(25):
            await channel.basic_publish(b'{"n": %d}' % i, routing_key=queue, properties=JSON)

        async def received(n: int) -> bool:
            return len(got) >= n

        await wait_until(lambda: received(10), message="the prefetch window")
        await consumer.open_plain(3)

        async def held_back(ready: int) -> bool:
            return (await consumer.queue_depth(3, queue))[0] == ready

        await wait_until(lambda: held_back(15), message="the broker holding the rest back")
        assert len(got) == 10  # prefetch holds the rest back until acked
        consumer.ack(1, got[-1].delivery_tag, multiple=True)
        await wait_until(lambda: received(20), message="the next window")
        consumer.ack(1, got[19].delivery_tag, multiple=True)
        await wait_until(lambda: received(25), message="all")
        consumer.ack(1, got[24].delivery_tag, multiple=True)
        await consumer.cancel(tag)
        await consumer.close()
        assert consumer.closed.done()
        with pytest.raises(amqp.AMQPError):
            consumer.ack(1, 1)
        ok = await channel.queue_declare(queue, passive=True)
        assert ok.message_count == 0  # every message acked, none returned
        assert [d.body for d in got] == [b'{"n": %d}' % i for i in range(25)]
    finally:
        await channel.queue_delete(queue)
        await admin.close()


async def test_consuming_a_missing_queue_fails_cleanly() -> None:
    """The broker closes the channel: the connection reports it, nothing hangs."""
    consumer = await amqp.connect(AMQP_URL, lambda d: None, name="test-amqp-missing")
    await consumer.open_channel(1, prefetch=1)
    with pytest.raises(amqp.AMQPError, match="NOT_FOUND"):
        await consumer.consume(1, f"test.missing.{uuid.uuid4().hex}")
    await consumer.close()


async def test_wrong_password_is_refused() -> None:
    """Bad credentials end in an AMQPError (or a closed connection), never a hang."""
    url = AMQP_URL.replace("guest:guest@", "guest:wrong@")
    with pytest.raises((amqp.AMQPError, ConnectionError, OSError)):
        await amqp.connect(url, lambda d: None, name="test-amqp-auth", timeout=10)


async def test_unreachable_broker_raises() -> None:
    """A closed port raises at once."""
    with pytest.raises(ConnectionRefusedError):
        await amqp.connect("amqp://guest:guest@127.0.0.1:1/", lambda d: None, name="x")


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqp://u%40ser:p%2Cw%23d%3A@broker.example:5673/%2Fprod?heartbeat=7&name=x",
        "amqps://svc@rmq.internal/vhost?cafile=/ca.pem&capath=/etc/ca&certfile=/c.pem"
        "&keyfile=/k.pem&auth=external",
        "amqps://a:b@rmq/?no_verify_ssl=1&heartbeat=0",
        "amqps://a:b@rmq/?no_verify_ssl=&heartbeat=99999",
        "amqp://rmq",
    ],
)
async def test_urls_are_read_as_aiormq_reads_them(url: str) -> None:
    """The worker's own connection and aiormq's agree on every part of a URL: host, port,
    credentials (percent-decoded), vhost, heartbeat, TLS files, verification and the
    authentication mechanism (so one AMQP_URL means the same to both connections)."""
    ours = amqp.Endpoint.parse(url)
    theirs = aiormq.Connection(url)
    assert (ours.host, ours.port) == (theirs.url.host, theirs.url.port)
    assert ours.user == (theirs.url.user if theirs.url.user is not None else "guest")
    assert ours.password == (theirs.url.password if theirs.url.password is not None else "guest")
    assert ours.vhost == theirs.vhost
    if "heartbeat" in url:
        assert ours.heartbeat == theirs.heartbeat_timeout
    certs = theirs.ssl_certs
    assert (ours.cafile, ours.capath, ours.cadata) == (certs.cafile, certs.capath, certs.cadata)
    assert (ours.certfile, ours.keyfile) == (certs.cert, certs.key)
    assert ours.verify == certs.verify
    assert ours.external == (theirs.url.query.get("auth", "plain").upper() == "EXTERNAL")
    assert ours.tls == (url.startswith("amqps"))


async def test_external_authentication_the_broker_does_not_offer_is_a_clear_error() -> None:
    """auth=external toward a broker without the EXTERNAL mechanism: an AMQPError naming
    the mechanism and what the broker offers, never a hang."""
    url = AMQP_URL.rstrip("/") + "/?auth=external"
    with pytest.raises(amqp.AMQPError, match="no EXTERNAL authentication"):
        await amqp.connect(url, lambda d: None, name="test-amqp-external", timeout=10)
