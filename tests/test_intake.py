"""What the message itself decides before its body is read, and the dead-letter copy: pure
functions, no servers."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from tests import rawamqp
from worker import events
from worker.amqp.frames import RawProperties, decode_table, table_entries
from worker.amqp.protocol import Delivery
from worker.config import Settings
from worker.errors import Rejection
from worker.events import Event
from worker.ingest.deadletter import RAW_PROPERTIES_HEADER, WORKER_HEADERS, copy_of
from worker.ingest.pipeline import intake

SETTINGS = Settings.from_env({}, delivery_limit=5)
NOW = datetime(2025, 8, 15, tzinfo=UTC)
BODY = (
    b'{"event_id":"5b15ec3a-318c-4f86-8903-1b9d74e495de","occurred_at":"2025-08-14T10:00:00Z",'
    b'"org_id":"a8cc6699-a330-4974-a9ad-1eb3b4f2ddb6","workspace_id":'
    b'"0a244fbb-da48-4af6-bb65-257c5dbeff16","template_id":"2c6d2e99-987b-44aa-8f3c-00378a4ebca9",'
    b'"provider":"openai","provider_version_key":"v1","model_id":"gpt-4o",'
    b'"request":{},"response":{}}'
)


def delivery(
    body: bytes = BODY,
    *,
    header: bytes | None = None,
    count: int = 0,
    routing_key: bytes = b"prompt_run.v1",
) -> Delivery:
    method = b"\x01c" + (1).to_bytes(8, "big") + b"\x01" + b"\x01e" + bytes((len(routing_key),))
    d = Delivery(1, 1, method + routing_key, redelivered=count > 0)
    d._header = header or rawamqp.properties(len(body), delivery_mode=b"\x02")
    d.body = body
    d.delivery_count = count
    return d


def test_a_valid_delivery_is_an_event() -> None:
    """Plain JSON properties and a valid body: the event."""
    assert isinstance(intake(delivery(), SETTINGS, NOW), Event)


def test_at_the_delivery_limit_it_is_dead_lettered_unprocessed() -> None:
    """Delivered more than delivery_limit times before without being settled (RabbitMQ 4.3+
    counts those in x-acquired-count, older versions in x-delivery-count): dead-lettered
    as delivery_limit before its body is even decoded (it may be what crashes the worker);
    at the limit it is still decoded, as the broker's own limit would still deliver it."""
    refused = intake(delivery(b"not even JSON", count=6), SETTINGS, NOW)
    assert isinstance(refused, Rejection)
    assert refused.reason == events.DELIVERY_LIMIT
    assert "7 times" in refused.detail
    assert isinstance(intake(delivery(count=5), SETTINGS, NOW), Event)


def test_properties_that_do_not_split_are_invalid_properties() -> None:
    """A headers table that does not parse: invalid_properties with the reason."""
    d = delivery()
    d.invalid = "headers: unknown field type 'Z'"
    refused = intake(d, SETTINGS, NOW)
    assert isinstance(refused, Rejection)
    assert refused.reason == events.INVALID_PROPERTIES
    assert "unknown field type" in refused.detail


def test_a_body_too_large_to_hold_is_refused_unread() -> None:
    """An oversize delivery (its body was never kept) is refused unread: None."""
    d = delivery(b"")
    d.oversize = 100_000_000
    assert intake(d, SETTINGS, NOW) is None


def test_content_type_text_is_checked_whatever_its_bytes() -> None:
    """A content type that is not UTF-8 is refused as unsupported_content_type, naming it
    escaped."""
    d = delivery(header=rawamqp.properties(len(BODY), content_type=b"\xff\xfe"))
    d.plain_json = False
    refused = intake(d, SETTINGS, NOW)
    assert isinstance(refused, Rejection)
    assert refused.reason == events.UNSUPPORTED_CONTENT_TYPE
    assert "xff" in refused.detail


REJECTED = Rejection(events.UNKNOWN_TEMPLATE, '"template_id" x is not a known template')


@settings(max_examples=200, deadline=None)
@given(
    message_id=st.binary(max_size=40),
    keys=st.lists(st.binary(min_size=1, max_size=30), max_size=6),
    expiration=st.booleans(),
)
def test_a_copy_keeps_every_original_byte_but_what_it_must_change(
    message_id: bytes, keys: list[bytes], expiration: bool
) -> None:
    """The copy's property list is the original's (binary message id, header keys that are
    not UTF-8) with delivery_mode 2, no expiration or user id, and the worker's headers
    replacing any of the same name; its routing key is the original's."""
    table = rawamqp.table(*((k, rawamqp.longstr(b"v" + k)) for k in keys))
    fields = {"message_id": message_id, "headers": table, "user_id": b"someone"}
    if expiration:
        fields["expiration"] = b"1000"
    d = delivery(header=rawamqp.properties(len(BODY), **fields), routing_key=b"\xff.rk")
    copy = copy_of(
        d, REJECTED, failed_at="now", frame_max=131_072, fallback_routing_key=b"prompt_run.v1"
    )
    props = RawProperties.parse(copy.header)
    assert props.fields["message_id"] == message_id
    assert props.fields["delivery_mode"] == b"\x02"
    assert "expiration" not in props.fields
    assert "user_id" not in props.fields
    entries = table_entries(props.fields["headers"])
    ours = {h.encode() for h in WORKER_HEADERS}
    assert {k for k, _, _ in entries} - ours == set(keys) - ours
    headers = decode_table(props.fields["headers"])
    assert headers["x-error-reason"] == events.UNKNOWN_TEMPLATE
    assert copy.routing_key == b"\xff.rk"


def test_a_copy_of_properties_that_do_not_split_carries_them_raw() -> None:
    """A property list that cannot be split travels as x-raw-properties (a byte array) on a
    copy that is otherwise bare."""
    header = rawamqp.properties(len(BODY), delivery_mode=b"\x02")[:-1]  # cut inside a field
    d = delivery(header=header)
    copy = copy_of(
        d,
        Rejection(events.INVALID_PROPERTIES, "cut"),
        failed_at="now",
        frame_max=131_072,
        fallback_routing_key=b"prompt_run.v1",
    )
    headers = decode_table(RawProperties.parse(copy.header).fields["headers"])
    assert headers[RAW_PROPERTIES_HEADER] == header[12:]
    assert headers["x-error-reason"] == events.INVALID_PROPERTIES
