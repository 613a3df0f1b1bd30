"""The publisher library against the real RabbitMQ: validated, confirmed, pipelined, and
clear about every failure."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime

import aiormq
import orjson
import pytest

from tests.conftest import AMQP_URL
from tests.factories import Tenant, encode, event_doc
from tests.helpers import close_connections_named, drain, queue_depth, wait_until
from worker.amqp import broker
from worker.errors import (
    BrokerUnavailable,
    ConfigError,
    PublishError,
    Rejection,
    UnroutableError,
)
from worker.events import Event, decode
from worker.publisher import Publisher, prepare

TENANT = Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))


def topo(names: dict[str, str]) -> broker.Topology:
    return broker.Topology(**names, delivery_limit=20)


def docs(n: int) -> list[dict[str, object]]:
    return [event_doc(TENANT) for _ in range(n)]


async def test_published_event_is_persistent_json_keyed_by_event_id(
    topology: dict[str, str],
) -> None:
    """One event: persistent, application/json, message_id = event_id, the body as given
    (bytes are sent untouched), on the live routing key."""
    body = encode(event_doc(TENANT))
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        event_id = await publisher.publish(body)
    [message] = await drain(topology["queue"])
    assert event_id == orjson.loads(body)["event_id"]
    props = message.header.properties
    assert props.message_id == event_id
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert message.body == body
    assert message.delivery.routing_key == broker.LIVE_ROUTING_KEY  # type: ignore[union-attr]


async def test_dict_values_may_be_uuids_and_aware_datetimes(topology: dict[str, str]) -> None:
    """A dict is serialized with orjson: UUID and timezone-aware datetime values become the
    contract's strings, and the event id is normalized to lowercase."""
    event_id = uuid.uuid4()
    doc = event_doc(TENANT)
    doc["occurred_at"] = datetime(2025, 8, 14, 14, 13, 29, tzinfo=UTC)
    doc["event_id"] = event_id
    doc["org_id"] = uuid.UUID(TENANT.org_id)
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        assert await publisher.publish(doc) == str(event_id)
    [message] = await drain(topology["queue"])
    sent = orjson.loads(message.body)
    assert sent["event_id"] == str(event_id)
    assert sent["occurred_at"] == "2025-08-14T14:13:29+00:00"


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"occurred_at": datetime(2025, 8, 14)}, "invalid_field", "occurred_at"),  # naive
        ({"event_id": "not-a-uuid"}, "invalid_field", "event_id"),
        ({"request": None}, "invalid_field", "request"),
        ({"schema_version": 2}, "unsupported_schema_version", "schema_version"),
    ],
)
async def test_invalid_event_raises_with_its_reason_and_nothing_is_sent(
    topology: dict[str, str], change: dict[str, object], reason: str, field: str
) -> None:
    """An event the worker would refuse raises Rejection(reason, detail naming the field);
    the broker never sees it."""
    doc = {**event_doc(TENANT), **change}
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        with pytest.raises(Rejection) as caught:
            await publisher.publish(doc)
    assert caught.value.reason == reason
    assert field in caught.value.detail
    assert await queue_depth(topology["queue"]) == 0


def test_dicts_are_written_in_the_form_the_store_copies() -> None:
    """A dict the publisher writes (UUIDs, aware datetimes, floats, non-ASCII text) is in
    orjson's compact form: the worker stores it through COPY, not by parsing the body."""
    doc = {
        **event_doc(TENANT),
        "event_id": uuid.uuid4(),
        "occurred_at": datetime(2025, 8, 14, 14, 13, 29, 123456, tzinfo=UTC),
        "request": {"temperature": 0.1, "big": 1e300, "text": 'héllo ✓ \n "q"'},
    }
    decoded = decode(prepare(doc).body)
    assert isinstance(decoded, Event)
    assert decoded.columns is not None
    assert orjson.loads(decoded.columns[0]) == doc["request"]


def test_prepare_refuses_what_is_not_json_or_not_an_object() -> None:
    """Values orjson cannot write, and inputs that are not a dict or bytes, are rejections
    with a reason, not crashes."""
    with pytest.raises(Rejection) as caught:
        prepare({**event_doc(TENANT), "request": {"x": object()}})
    assert caught.value.reason == "invalid_json"
    with pytest.raises(Rejection) as caught:
        prepare(["not", "an", "event"])  # type: ignore[arg-type]
    assert caught.value.reason == "not_an_object"
    with pytest.raises(Rejection) as caught:
        prepare(b"{nope")
    assert caught.value.reason == "invalid_json"


async def test_publish_many_validates_everything_before_sending_anything(
    topology: dict[str, str],
) -> None:
    """One invalid event among many: Rejection naming its position, and not one message
    reaches the broker, not even the valid events before it."""
    batch: list[object] = [*docs(5), {**event_doc(TENANT), "model_id": ""}, *docs(5)]
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        with pytest.raises(Rejection) as caught:
            await publisher.publish_many(batch)  # type: ignore[arg-type]
    assert caught.value.reason == "invalid_field"
    assert caught.value.detail.startswith("event #5: ")
    assert "model_id" in caught.value.detail
    assert await queue_depth(topology["queue"]) == 0


async def test_publish_many_keeps_a_window_of_confirms_outstanding(
    topology: dict[str, str],
) -> None:
    """Many events: every one confirmed and in the queue; confirms are pipelined (more than
    one outstanding at a time) and never more than the window."""
    window = 32
    seen: list[int] = []
    async with Publisher(AMQP_URL, topo(topology), window=window) as publisher:
        sampling = True

        async def sample() -> None:
            while sampling:
                seen.append(publisher.outstanding)
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        confirmed = await publisher.publish_many(docs(1500))
        sampling = False
        await sampler
    assert confirmed == 1500
    assert await queue_depth(topology["queue"]) == 1500
    assert max(seen) > 1
    assert max(seen) <= window


async def test_the_same_event_twice_in_one_call_is_sent_twice(topology: dict[str, str]) -> None:
    """Repeats are allowed (ingestion is idempotent) and both copies are confirmed: a repeat
    waits for the first copy, since returns are matched by message id."""
    doc = event_doc(TENANT)
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        assert await publisher.publish_many([doc, doc, doc]) == 3
    assert await queue_depth(topology["queue"]) == 3


async def test_unroutable_event_raises_and_is_not_counted(topology: dict[str, str]) -> None:
    """A routing key no queue is bound for: the broker returns the mandatory message and
    the publisher raises UnroutableError naming the routing key."""
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        with pytest.raises(UnroutableError, match=r"nothing\.bound"):
            await publisher.publish(event_doc(TENANT), routing_key="nothing.bound")
        with pytest.raises(UnroutableError, match=r"0 of 3 events confirmed"):
            await publisher.publish_many(docs(3), routing_key="nothing.bound")
        # The publisher is still usable afterwards.
        await publisher.publish(event_doc(TENANT))
    assert await queue_depth(topology["queue"]) == 1


async def test_missing_exchange_is_a_clear_error(topology: dict[str, str]) -> None:
    """Told not to declare (an admin owns the topology) and it is missing: a ConfigError
    saying so. An exchange deleted under a connected publisher: UnroutableError naming it,
    and nothing counted as confirmed."""
    with pytest.raises(ConfigError, match="topology is missing"):
        async with Publisher(AMQP_URL, topo(topology), declare=False):
            pass

    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        connection = await aiormq.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.exchange_delete(topology["exchange"])
        finally:
            await connection.close()
        with pytest.raises(UnroutableError, match=r"0 of 20 events confirmed.*does not exist"):
            await publisher.publish_many(docs(20))
    assert await queue_depth(topology["queue"]) == 0


async def test_broker_down_is_a_clear_error_without_the_password() -> None:
    """No broker at the URL: BrokerUnavailable naming the node, its password masked."""
    url = "amqp://guest:s3cret-pw@127.0.0.1:1/"
    publisher = Publisher(url, topo({k: f"unused.{k}" for k in _NAMES}))
    with pytest.raises(BrokerUnavailable) as caught:
        await publisher.publish(event_doc(TENANT))
    assert "127.0.0.1:1" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    assert publisher.outstanding == 0
    await publisher.close()


_NAMES = ("exchange", "queue", "replay_queue", "dead_letter_exchange", "dead_letter_queue")


async def test_a_lost_connection_fails_in_flight_publishes_and_the_next_call_reconnects(
    topology: dict[str, str],
) -> None:
    """The broker closes the publisher's connection while it publishes: what was in flight
    fails with BrokerUnavailable (never reported confirmed), every confirmed event is in the
    queue, and the following sends reconnect by themselves."""
    name = f"test-publisher-{uuid.uuid4().hex[:8]}"
    futures: list[asyncio.Future[None]] = []
    async with Publisher(AMQP_URL, topo(topology), name=name, window=64) as publisher:
        closer: asyncio.Task[int] | None = None
        sent_after_close = 0
        while len(futures) < 100_000 and sent_after_close < 300:
            if len(futures) == 300 and closer is None:
                closer = asyncio.create_task(asyncio.to_thread(close_connections_named, name))
            if closer is not None and closer.done():
                sent_after_close += 1
            with contextlib.suppress(BrokerUnavailable):  # a send racing the close
                futures.append(await publisher.send(prepare(event_doc(TENANT))))
        assert closer is not None
        assert await closer == 1
        results = await asyncio.gather(*futures, return_exceptions=True)
    confirmed = sum(1 for r in results if r is None)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures
    assert all(isinstance(f, BrokerUnavailable) for f in failures), failures[:3]
    assert results[-1] is None  # reconnected
    await wait_until(
        lambda: _queue_at_least(topology["queue"], confirmed),
        message="every confirmed event in the queue",
    )


async def _queue_at_least(queue: str, n: int) -> bool:
    return await queue_depth(queue) >= n


async def test_a_nacked_publish_leaves_its_channel_and_the_next_send_takes_a_new_one(
    topology: dict[str, str],
) -> None:
    """The broker nacks a publish: PublishError, and the publisher never sends on that
    channel again; the next send opens a new one, and the nacking one is closed. (RabbitMQ
    3.10 nacks every later publish to a quorum queue on a channel whose first publish to it
    met a leader that had just died, for as long as that channel lives; docs/scaling.md.)
    Here a queue bound beside the ingest queue refuses every message, then is deleted."""
    full = f"{topology['queue']}.full"
    async with Publisher(AMQP_URL, topo(topology)) as publisher:
        await publisher.publish(event_doc(TENANT))
        nacking = publisher._link.channel
        assert nacking is not None
        connection = await aiormq.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.queue_declare(
                full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
            )
            await channel.queue_bind(full, topology["exchange"], routing_key="prompt_run.*")
            with pytest.raises(PublishError, match="nacked"):
                await publisher.publish(event_doc(TENANT))
            await channel.queue_delete(full)
        finally:
            await connection.close()
        await publisher.publish(event_doc(TENANT))
        assert publisher._link.channel is not nacking
        await wait_until(lambda: _closed(nacking), message="the nacking channel closed")
    assert await queue_depth(topology["queue"]) == 3


async def _closed(channel: aiormq.abc.AbstractChannel) -> bool:
    return channel.is_closed
