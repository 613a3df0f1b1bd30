"""Confirm tracking that never depends on message ids being unique, and no payload in any
log record: against the real RabbitMQ.

aiormq matches a returned message (Basic.Return) to its publish by ``message_id``; two
messages in flight with one id could swap their outcomes, and a returned message would be
reported confirmed: lost. ``publish_confirmed`` keeps each copy's outcome its own."""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import aiormq
import aiormq.abc
import pytest
from pamqp import commands as spec

from tests.conftest import AMQP_URL
from tests.factories import Tenant, event_doc
from tests.helpers import drain
from worker import logs
from worker.amqp import broker
from worker.errors import UnroutableError
from worker.publisher import Publisher, publish_confirmed

TENANT = Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))
BOUND = "bound.key"
UNBOUND = "nothing.bound"


@pytest.fixture
async def channel(topology: dict[str, str]) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A confirming channel (returns raise) on this test's exchange, with its queue bound
    to ``BOUND`` and nothing bound to ``UNBOUND``."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        setup = await connection.channel()
        await setup.exchange_declare(topology["exchange"], exchange_type="topic", durable=True)
        await setup.queue_declare(topology["queue"])
        await setup.queue_bind(topology["queue"], topology["exchange"], routing_key=BOUND)
        yield await connection.channel(publisher_confirms=True, on_return_raises=True)
    finally:
        await connection.close()


def _props(message_id: str | None) -> spec.Basic.Properties:
    return spec.Basic.Properties(message_id=message_id, delivery_mode=2)


async def _publish_all(
    channel: aiormq.abc.AbstractChannel, exchange: str, copies: list[tuple[str, str | None, bytes]]
) -> list[BaseException | None]:
    """Publish (routing key, message id, body) copies concurrently; each one's outcome."""
    results = await asyncio.gather(
        *(
            publish_confirmed(
                channel, body, exchange=exchange, routing_key=key, props=_props(message_id)
            )
            for key, message_id, body in copies
        ),
        return_exceptions=True,
    )
    return [r if isinstance(r, BaseException) else None for r in results]


@pytest.mark.parametrize("message_id", ["one-id", None, ""])
async def test_unroutable_copies_sharing_an_id_each_raise(
    channel: aiormq.abc.AbstractChannel, topology: dict[str, str], message_id: str | None
) -> None:
    """Two copies with one message id (or none, or an empty one), both to a routing key
    nothing is bound to, published concurrently: each raises UnroutableError. Neither is
    reported confirmed because the other's return was matched to it."""
    copies = [(UNBOUND, message_id, b"first"), (UNBOUND, message_id, b"second")]
    outcomes = await _publish_all(channel, topology["exchange"], copies)
    assert all(isinstance(o, UnroutableError) for o in outcomes), outcomes


@pytest.mark.parametrize("message_id", ["one-id", None])
@pytest.mark.parametrize("order", ["unroutable-first", "routable-first"])
async def test_one_routable_and_one_unroutable_copy_sharing_an_id(
    channel: aiormq.abc.AbstractChannel,
    topology: dict[str, str],
    message_id: str | None,
    order: str,
) -> None:
    """One routable and one unroutable copy with the same id (or none), concurrently, in
    either order: exactly the unroutable one raises, the routable one is confirmed and is
    the one in the queue."""
    copies = [(UNBOUND, message_id, b"returned"), (BOUND, message_id, b"delivered")]
    if order == "routable-first":
        copies.reverse()
    outcomes = dict(
        zip(
            [c[0] for c in copies],
            await _publish_all(channel, topology["exchange"], copies),
            strict=True,
        )
    )
    assert isinstance(outcomes[UNBOUND], UnroutableError), outcomes
    assert outcomes[BOUND] is None, outcomes
    assert [m.body for m in await drain(topology["queue"])] == [b"delivered"]


async def test_many_copies_of_one_id_each_get_their_own_outcome(
    channel: aiormq.abc.AbstractChannel, topology: dict[str, str]
) -> None:
    """Twenty copies of one id, routable and unroutable interleaved, with ids-less copies
    and unique ids beside them: every unroutable copy raises, every routable one is
    confirmed and queued, and nothing else."""
    copies: list[tuple[str, str | None, bytes]] = []
    for i in range(20):
        key = BOUND if i % 3 else UNBOUND
        copies.append((key, "shared", f"shared-{i}".encode()))
        copies.append((key, None, f"none-{i}".encode()))
        copies.append((key, f"unique-{i}", f"unique-{i}".encode()))
    outcomes = await _publish_all(channel, topology["exchange"], copies)
    for (key, _, body), outcome in zip(copies, outcomes, strict=True):
        if key == UNBOUND:
            assert isinstance(outcome, UnroutableError), (body, outcome)
        else:
            assert outcome is None, (body, outcome)
    queued = sorted(m.body for m in await drain(topology["queue"]))
    assert queued == sorted(body for key, _, body in copies if key == BOUND)


# --- no payload in the logs -----------------------------------------------------------------

SECRET = "s3cret-payload-7f3a"


class Capture(logging.Handler):
    """Every record, formatted with its traceback, as a handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    """A handler on the root logger at DEBUG, with aiormq's loggers at DEBUG too (as a
    service debugging its own code might set them); everything restored afterwards."""
    root = logging.getLogger()
    handler = Capture()
    names = [n for n in logging.root.manager.loggerDict if n.startswith("aiormq")]
    levels = {n: logging.getLogger(n).level for n in names}
    root_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for n in names:
        logging.getLogger(n).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(root_level)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


async def _returned(topology: dict[str, str], body: bytes) -> aiormq.abc.DeliveredMessage:
    """A message the broker really returned, as aiormq hands it over: published straight
    through aiormq (as a library user might) to a routing key nothing is bound to."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        raw = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await raw.exchange_declare(topology["exchange"], exchange_type="topic", durable=True)
        with pytest.raises(aiormq.exceptions.PublishError) as caught:
            await raw.basic_publish(
                body,
                exchange=topology["exchange"],
                routing_key=UNBOUND,
                mandatory=True,
                properties=_props("returned-id"),
            )
    finally:
        await connection.close()
    return caught.value.message


def _as_aiormq_logs_it(message: aiormq.abc.DeliveredMessage) -> None:
    """aiormq's two records that hold a whole returned message, through its own logger
    (whether it writes them for a given pair of returns depends on timing)."""
    channel_log = logging.getLogger("aiormq.channel")
    channel_log.error("Unhandled message %r returning", message)
    channel_log.error("message_id if None on returned message %r", message)


async def test_no_message_body_reaches_a_log_handler(
    topology: dict[str, str], captured: Capture
) -> None:
    """With the root logger and aiormq at DEBUG, and no logging set up by this project
    (a service using the publisher library): publishing, returned messages (their frames
    received, and aiormq's records of a returned message it could not match) never put a
    message body in a log record. The records are there, only summarized."""
    doc = event_doc(TENANT)
    doc["response"]["choices"][0]["message"]["content"] = SECRET
    async with Publisher(AMQP_URL, broker.Topology(**topology, delivery_limit=20)) as publisher:
        await publisher.publish(doc)
        with pytest.raises(UnroutableError):
            await publisher.publish(doc, routing_key=UNBOUND)
    _as_aiormq_logs_it(await _returned(topology, SECRET.encode()))
    text = "\n".join(captured.lines)
    assert "Unhandled message" in text
    assert f"id='returned-id' exchange={topology['exchange']!r}" in text
    assert f"body of {len(SECRET)} bytes not logged" in text
    assert f"content body of {len(SECRET)} bytes, not logged" in text  # a return's body frame
    assert "Prepare to send '<frames of" in text  # the frames sent
    assert SECRET not in text
    for record in captured.records:
        assert SECRET not in repr(record.args)


async def test_configured_logging_keeps_payloads_out_too(topology: dict[str, str]) -> None:
    """The worker's own logging (``logs.configure``, JSON lines) at DEBUG: aiormq's
    records of a returned message are written without its body."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("aiormq", "aiormq.connection", "aio_pika", "alembic.runtime.plugins")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        logs.configure("debug", "json", stream)
        _as_aiormq_logs_it(await _returned(topology, SECRET.encode()))
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)
    out = stream.getvalue()
    assert "Unhandled message" in out
    assert SECRET not in out


def test_the_filter_summarizes_every_payload_carrier() -> None:
    """A record of an aiormq logger whose arguments, message or exception hold a body:
    the body is replaced by its size; records of other loggers are left alone."""
    from aiormq.abc import ChannelFrame
    from pamqp.body import ContentBody

    body = SECRET.encode()
    carriers = [
        body,
        bytearray(body),
        ContentBody(body),
        ChannelFrame(payload=body, should_close=False),
    ]
    for carrier in carriers:
        record = logging.LogRecord(
            "aiormq.channel", logging.ERROR, __file__, 1, "x %r", (carrier,), None
        )
        assert logs.PAYLOAD_FILTER.filter(record)
        assert SECRET not in record.getMessage()
        assert f"{len(body)} bytes" in record.getMessage()
    try:
        raise aiormq.exceptions.DeliveryError(None, spec.Basic.Nack())  # type: ignore[arg-type]
    except aiormq.exceptions.DeliveryError as exc:
        exc.args = (body,)
        record = logging.LogRecord(
            "aiormq.connection", logging.ERROR, __file__, 1, "failed", (), (type(exc), exc, None)
        )
    assert logs.PAYLOAD_FILTER.filter(record)
    assert record.exc_info is None
    assert "DeliveryError" in record.getMessage()
    mine = logging.LogRecord(
        "worker.ingest.worker", logging.INFO, __file__, 1, "x %r", (body,), None
    )
    assert logs.PAYLOAD_FILTER.filter(mine)
    assert mine.args == (body,)
