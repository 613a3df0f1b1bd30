"""worker/asyncapi.yaml, the AsyncAPI 3.0 document of the topology and the event contract,
kept in step with the code.

The document is validated against the official AsyncAPI 3.0.0 JSON Schema (a vendored copy,
tests/schemas/README.md), then held to the code: names and routing keys are the broker
module's and the settings' defaults, the queue arguments are those the worker declares
(checked on the real broker, which refuses a redeclaration with other arguments), the
payload is the shipped JSON Schema, the dead-letter headers are those the consumer writes,
the reasons those of the decoder.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import tomllib
from pathlib import Path
from typing import Any

import aiormq
import aiormq.exceptions
import jsonschema
import pytest
import referencing
import yaml
from pamqp import commands as spec
from referencing.jsonschema import DRAFT7

from tests.conftest import AMQP_URL, ROOT
from tests.factories import event_doc
from worker import events, publisher
from worker.amqp import broker
from worker.commands import deadletters
from worker.config import Settings
from worker.ingest import deadletter

ASYNCAPI_SCHEMA = Path(__file__).resolve().parent / "schemas" / "asyncapi-3.0.0.json"
DEFAULTS = Settings()
TOPOLOGY = broker.Topology.from_settings(DEFAULTS)


def package_file(name: str) -> str:
    return (importlib.resources.files("worker") / name).read_text(encoding="utf-8")


def document() -> dict[str, Any]:
    doc = yaml.safe_load(package_file("asyncapi.yaml"))
    assert isinstance(doc, dict)
    return doc


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """A local reference (#/a/b) inside the document."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


# --- the document itself ------------------------------------------------------------------


def asyncapi_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    registry: referencing.Registry[Any] = referencing.Registry()
    for key, definition in schema["definitions"].items():
        registry = registry.with_resource(
            definition.get("$id", key), DRAFT7.create_resource(definition)
        )
    registry = registry.with_resource(schema["$id"], DRAFT7.create_resource(schema)).crawl()
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_the_document_is_valid_asyncapi_3() -> None:
    """The shipped document passes the official AsyncAPI 3.0.0 schema, AMQP bindings
    included."""
    validator = asyncapi_validator()
    errors = sorted(validator.iter_errors(document()), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors]


def test_the_schema_check_is_not_vacuous() -> None:
    """A channel whose AMQP binding says `is: exchange` (not an AsyncAPI value) fails."""
    doc = document()
    doc["channels"]["liveEvents"]["bindings"]["amqp"]["is"] = "exchange"
    assert not asyncapi_validator().is_valid(doc)


def test_every_reference_resolves() -> None:
    """Every local $ref (operations to channels, channels to messages) names a node of the
    document; the one other reference is the event schema shipped beside it."""
    doc = document()
    external = []
    for ref in refs(doc):
        if ref.startswith("#/"):
            assert resolve(doc, ref) is not None, ref
        else:
            external.append(ref)
    assert external == ["./event.schema.json"] * len(external)
    assert external


def test_operations_use_messages_of_their_channel() -> None:
    """Each operation's messages are messages of its own channel (AsyncAPI 3's rule)."""
    doc = document()
    for name, operation in doc["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
            assert resolve(doc, message["$ref"]) is not None


def test_shipped_as_package_data_beside_the_event_schema() -> None:
    """pyproject's package data includes both files, so an installed package has them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["worker"]
    for name in ("asyncapi.yaml", "event.schema.json"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
        assert (ROOT / "worker" / name).is_file()


# --- the contract -------------------------------------------------------------------------


def test_the_payload_is_the_shipped_event_schema() -> None:
    """The prompt run message's payload is worker/event.schema.json, referenced beside the
    document, declared as a JSON Schema draft-07 (the keywords it uses mean the same there)."""
    payload = document()["components"]["messages"]["promptRun"]["payload"]
    assert payload["schemaFormat"] == "application/schema+json;version=draft-07"
    target = payload["schema"]["$ref"]
    resolved = json.loads(package_file(target.removeprefix("./")))
    assert resolved == json.loads((ROOT / "worker" / "event.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(resolved)


@pytest.mark.parametrize(
    ("change", "valid"),
    [
        ({}, True),
        ({"event_id": "not-a-uuid"}, False),
        ({"occurred_at": "2025-08-14 14:13:29"}, False),
        ({"provider": " "}, False),
        ({"schema_version": 2}, False),
        ({"analysis_config": None, "system_fingerprint": None}, True),
        ({"fingerprint_captured_at": "2025-08-14T14:13:29Z"}, True),
        ({"fingerprint_captured_at": 5}, False),
    ],
)
def test_the_schema_judges_alike_as_draft_07_and_2020_12(
    change: dict[str, Any], valid: bool
) -> None:
    """Read as draft-07 (what the document declares for generators) or as 2020-12 (its own
    $schema), the event schema accepts and refuses the same events."""
    from tests.factories import Tenant

    schema = json.loads(package_file("event.schema.json"))
    tenant = Tenant(
        "0b5e7a4e-6c1a-4d0e-9a51-5f4c8a1e2b3c",
        "2f1d3c4b-5a69-4788-99aa-bbccddeeff00",
        "7e3c2a10-1b2c-4d5e-8f90-a1b2c3d4e5f6",
    )
    doc = json.loads(json.dumps(event_doc(tenant), default=str))
    doc.update(change)
    draft7 = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    newest = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    assert draft7.is_valid(doc) is newest.is_valid(doc) is valid


def test_message_properties_are_what_the_worker_accepts() -> None:
    """content_type is the publisher's and accepted by the decoder; the encodings listed are
    accepted; message_id is the event_id, a UUID; persistent."""
    props = document()["components"]["messages"]["promptRun"]["x-amqp-properties"]
    assert props["content_type"]["const"] == publisher.CONTENT_TYPE
    assert props["content_type"]["const"] in events.ACCEPTED_CONTENT_TYPES
    assert set(props["content_encoding"]["enum"]) <= events.ACCEPTED_CONTENT_ENCODINGS
    assert props["message_id"]["format"] == "uuid"
    assert props["delivery_mode"]["const"] == 2
    headers = document()["components"]["messages"]["promptRun"]["headers"]["properties"]
    assert deadletters.REDRIVE_COUNT in headers


def headers_written_by_the_consumer() -> set[str]:
    """The header names a dead-letter copy always carries (worker.ingest.deadletter)."""
    return set(deadletter.WORKER_HEADERS)


def test_dead_letter_headers_are_those_the_consumer_writes() -> None:
    """The refused-event message requires exactly the x-error-* and x-original-* headers the
    consumer writes, each of which redrive strips again."""
    written = headers_written_by_the_consumer()
    assert written >= {"x-error-reason", "x-error-detail", "x-failed-at", "x-worker-version"}
    message = document()["components"]["messages"]["refusedByWorker"]
    assert set(message["headers"]["required"]) == written
    optional = {deadletter.RAW_PROPERTIES_HEADER}  # only on invalid_properties copies
    assert set(message["headers"]["properties"]) == written | optional
    assert written | optional <= deadletters.DEAD_LETTER_HEADERS


def test_reasons_are_the_decoder_s() -> None:
    """x-error-reason lists exactly worker.events.REASONS."""
    message = document()["components"]["messages"]["refusedByWorker"]
    listed = message["headers"]["properties"]["x-error-reason"]["enum"]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(events.REASONS)


def test_broker_dead_letters_are_described_as_dead_letters_reads_them() -> None:
    """A message the broker dead-lettered carries x-death, the header `dead-letters list`
    reads its reason from, and both kinds travel the dead-letter exchange and queue."""
    doc = document()
    assert "x-death" in doc["components"]["messages"]["deadLetteredByBroker"]["headers"]["required"]
    assert "x-death" in deadletters.DEAD_LETTER_HEADERS
    for channel in ("deadLetterExchange", "deadLetterQueue"):
        assert set(doc["channels"][channel]["messages"]) == {
            "refusedByWorker",
            "deadLetteredByBroker",
        }


# --- the topology -------------------------------------------------------------------------


def test_names_and_routing_keys_are_the_code_s() -> None:
    """Exchange, queue and routing-key names are the broker module's constants and the
    settings' defaults; the queue arguments those the worker declares (RabbitMQ >= 3.10)."""
    channels = document()["channels"]
    routed = {
        "liveEvents": (broker.LIVE_ROUTING_KEY, TOPOLOGY.exchange),
        "replayEvents": (broker.REPLAY_ROUTING_KEY, TOPOLOGY.exchange),
    }
    for name, (routing_key, exchange) in routed.items():
        assert channels[name]["address"] == routing_key
        binding = channels[name]["bindings"]["amqp"]
        assert binding["is"] == "routingKey"
        assert binding["exchange"] == {
            "name": exchange,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        }
    dlx = channels["deadLetterExchange"]
    assert dlx["bindings"]["amqp"]["exchange"]["name"] == TOPOLOGY.dead_letter_exchange
    assert set(dlx["parameters"]["routingKey"]["enum"]) == {
        broker.LIVE_ROUTING_KEY,
        broker.REPLAY_ROUTING_KEY,
    }
    queues = {
        "ingestQueue": (TOPOLOGY.queue, TOPOLOGY.exchange, broker.LIVE_BINDING),
        "replayQueue": (TOPOLOGY.replay_queue, TOPOLOGY.exchange, broker.REPLAY_BINDING),
        "deadLetterQueue": (TOPOLOGY.dead_letter_queue, TOPOLOGY.dead_letter_exchange, "#"),
    }
    for name, (queue, exchange, binding_key) in queues.items():
        channel = channels[name]
        assert channel["address"] == queue
        assert channel["bindings"]["amqp"]["queue"]["name"] == queue
        assert channel["bindings"]["amqp"]["queue"]["durable"] is True
        assert channel["x-amqp-bound-to"] == {"exchange": exchange, "routingKey": binding_key}
    for name in ("ingestQueue", "replayQueue"):
        expected = TOPOLOGY.ingest_arguments(at_least_once=True)
        assert channels[name]["x-amqp-arguments"] == expected
    # The binding patterns route the routing keys the publishers use.
    assert broker.LIVE_ROUTING_KEY.split(".")[0] == broker.LIVE_BINDING.split(".")[0]
    assert broker.REPLAY_ROUTING_KEY.endswith(".replay")


def renamed(names: dict[str, str]) -> dict[str, str]:
    """Default names of the document -> this test's own names."""
    return {
        TOPOLOGY.exchange: names["exchange"],
        TOPOLOGY.queue: names["queue"],
        TOPOLOGY.replay_queue: names["replay_queue"],
        TOPOLOGY.dead_letter_exchange: names["dead_letter_exchange"],
        TOPOLOGY.dead_letter_queue: names["dead_letter_queue"],
    }


async def test_a_publisher_declaring_the_document_s_topology_agrees_with_the_worker(
    topology: dict[str, str],
) -> None:
    """After the worker declared its topology, declaring every queue and exchange with the
    document's arguments is accepted by RabbitMQ (it refuses any other arguments), and each
    routing key of the document reaches the queue the document says."""
    settings = Settings.from_env({}, amqp_url=AMQP_URL, **topology)
    name = renamed(topology)
    channels = document()["channels"]
    connection = await broker.connect(AMQP_URL, name="test-asyncapi")
    try:
        await broker.open_topology(
            connection, broker.Topology.from_settings(settings), passive=False
        )
        version = broker.broker_version(connection)
        channel = await connection.channel(publisher_confirms=True)
        for key in ("liveEvents", "deadLetterExchange"):
            exchange = channels[key]["bindings"]["amqp"]["exchange"]
            await channel.exchange_declare(
                name[exchange["name"]],
                exchange_type=exchange["type"],
                durable=exchange["durable"],
                auto_delete=exchange["autoDelete"],
            )
        for key in ("ingestQueue", "replayQueue", "deadLetterQueue"):
            queue = channels[key]["bindings"]["amqp"]["queue"]
            arguments = {
                k: name.get(v, v) if isinstance(v, str) else v
                for k, v in channels[key]["x-amqp-arguments"].items()
            }
            if key == "deadLetterQueue" and version >= broker.DEFAULT_DELIVERY_LIMIT_SINCE:
                arguments["x-delivery-limit"] = -1  # as the document's description says
            await channel.queue_declare(
                name[queue["name"]],
                durable=queue["durable"],
                exclusive=queue["exclusive"],
                auto_delete=queue["autoDelete"],
                arguments=arguments,
            )
        # Other arguments are refused: the redeclaration above proved something.
        other = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await other.queue_declare(
                topology["queue"], durable=True, arguments={"x-queue-type": "classic"}
            )

        routes = [
            ("liveEvents", "ingestQueue", None),
            ("replayEvents", "replayQueue", None),
            ("deadLetterExchange", "deadLetterQueue", broker.LIVE_ROUTING_KEY),
        ]
        for source, target, routing_key in routes:
            exchange = name[channels[source]["bindings"]["amqp"]["exchange"]["name"]]
            key = routing_key or channels[source]["address"]
            await channel.basic_publish(
                source.encode(),
                exchange=exchange,
                routing_key=key,
                mandatory=True,
                properties=spec.Basic.Properties(delivery_mode=2),
            )
            queue = name[channels[target]["address"]]
            message = await _get(connection, queue)
            assert message == source.encode(), (source, target)
    finally:
        await connection.close()


async def _get(connection: aiormq.abc.AbstractConnection, queue: str) -> bytes | None:
    """The head of ``queue``, removed (the publish was confirmed: it is there already)."""
    channel = await connection.channel()
    try:
        message = await channel.basic_get(queue, no_ack=True)
        return None if isinstance(message.delivery, spec.Basic.GetEmpty) else message.body
    finally:
        await channel.close()
