"""OpenTelemetry traces: off unless asked for (nothing imported), a PRODUCER span per
published message carried in W3C headers, a CONSUMER span per batch linked to them with
its counts and child spans, ``replay --direct``'s batches; hostile headers harmless."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pamqp import commands as spec

from tests.conftest import ROOT
from tests.factories import encode, event_doc, make_tenant
from tests.helpers import count, publish, running, wait_until
from worker import tracing
from worker.amqp.frames import ByteArray, RawProperties, encode_entries
from worker.config import Settings
from worker.errors import ConfigError
from worker.ingest.worker import Worker
from worker.publisher import Publisher
from worker.store.ingest import Store

GOOD = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider of this test's own (not the global one), exporting in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# -- when tracing is on ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            ["otlp"],
        ),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_asked_for(
    environ: dict[str, str], exporters: list[str]
) -> None:
    """An endpoint or OTEL_TRACES_EXPORTER turns it on; none, OTEL_SDK_DISABLED or nothing
    leaves it off."""
    assert tracing.wanted(environ) == exporters


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_an_exporter_or_protocol_not_shipped_is_a_clear_error(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        tracing.wanted(environ)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_with_tracing_off_opentelemetry_is_never_imported() -> None:
    """The command, the worker, the publisher library and the store load, set up and
    build their objects without importing OpenTelemetry when no OTEL_* asks for it."""
    done = _python(
        "import sys\n"
        "from worker import cli, publisher, tracing\n"
        "from worker.backfill import replay\n"
        "from worker.ingest import worker as consumer\n"
        "from worker.store import ingest as store\n"
        "from worker.config import Settings\n"
        "assert tracing.setup() is None and tracing.current() is None\n"
        "w = consumer.Worker(Settings.from_env({}))\n"
        "p = publisher.Publisher('amqp://guest:guest@127.0.0.1:5672/')\n"
        "assert w.tracer is None and p.tracer is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    assert done.returncode == 0, done.stderr


def test_without_the_extra_tracing_asked_for_is_off_with_one_warning() -> None:
    """OTEL_* set but OpenTelemetry not installed: one warning naming the extra, and
    everything works untraced."""
    done = _python(
        "import logging, sys\n"
        "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
        "logging.basicConfig(level='INFO')\n"
        "from worker import publisher, tracing\n"
        "assert tracing.setup() is None and tracing.current() is None\n"
        "assert publisher.Publisher('amqp://127.0.0.1/').tracer is None\n",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert done.returncode == 0, done.stderr
    assert "install prompter-worker[otel]" in done.stderr


def test_an_unknown_exporter_stops_a_command_with_a_usage_error() -> None:
    from tests.helpers import run_cli

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMPTER_"))}
    done = run_cli("status", env={**env, "OTEL_TRACES_EXPORTER": "jaeger"})
    assert done.returncode == 2
    assert "OTEL_TRACES_EXPORTER: jaeger is not available here" in done.stderr


# -- reading a traceparent defensively --------------------------------------------------------


def _header(headers: bytes | None = None, **fields: bytes) -> bytes:
    props = RawProperties({"delivery_mode": b"\x02", **fields})
    if headers is not None:
        props = props.replace(headers=headers)
    return props.build(10)


def test_a_valid_traceparent_and_tracestate_are_read() -> None:
    context = tracing.extract(
        _header(encode_entries([("traceparent", GOOD), ("tracestate", "vendor=abc,other=x-1")]))
    )
    assert context is not None
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert context.span_id == 0xB7AD6B7169203331
    assert context.is_remote
    assert context.trace_flags.sampled
    assert context.trace_state.to_header() == "vendor=abc,other=x-1"


@pytest.mark.parametrize(
    "value",
    [
        "",
        GOOD.upper(),
        GOOD + "-extra",
        GOOD[:-1],
        "ff" + GOOD[2:],
        "01" + GOOD[2:],  # another version: this worker reads version 00 only
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        " " + GOOD[1:],
        GOOD.replace("-", "_"),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333\u00e9-01",
        "x" * 100_000,
    ],
)
def test_an_invalid_traceparent_is_ignored_silently(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert tracing.extract(_header(encode_entries([("traceparent", value)]))) is None
    assert not caplog.records


@pytest.mark.parametrize(
    "header",
    [
        _header(encode_entries([("traceparent", 42)])),  # not a string
        _header(encode_entries([("traceparent", ByteArray(GOOD.encode()))])),  # a byte array
        _header(b"\x0btraceparentS\xff\xff\xff\xff"),  # a length past the end
        _header(b"\x0btraceparentQ"),  # an unknown field type
        b"\x00\x3c" + b"traceparent",  # not even a content header
        _header(message_id=b"traceparent"),  # the word, in no header
    ],
)
def test_a_malformed_header_table_is_ignored(header: bytes) -> None:
    assert tracing.extract(header) is None


@pytest.mark.parametrize(
    "state",
    [
        "Vendor=abc",  # upper case key
        "vendor=abc,vendor=def",  # a repeated key
        "vendor=a=b,",
        "v=" + "x" * 600,
        ",".join(f"k{i}=v" for i in range(40)),
        "vendor=\u00e9",
    ],
)
def test_an_invalid_tracestate_is_dropped_and_the_traceparent_kept(
    state: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    context = tracing.extract(
        _header(encode_entries([("traceparent", GOOD), ("tracestate", state)]))
    )
    assert context is not None
    assert context.span_id == 0xB7AD6B7169203331
    assert not context.trace_state
    assert not caplog.records


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=80))
def test_no_bytes_make_reading_raise(prefix: bytes, value: bytes) -> None:
    """Whatever follows the property flags, around a ``traceparent`` key: None or a
    context, never an exception."""
    raw = b"\x00\x3c\x00\x00" + b"\x00" * 8 + b"\x20\x00" + prefix + b"\x0btraceparent" + value
    tracing.extract(raw)
    tracing.extract(_header(prefix + b"\x0btraceparentS" + len(value).to_bytes(4, "big") + value))


# -- the publisher and the worker, in memory --------------------------------------------------


def _by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_a_batch_span_links_to_each_published_message(
    settings: Settings,
    conn: asyncpg.Connection,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Each published message has a PRODUCER span whose context it carries; the worker's
    CONSUMER span per batch links to those contexts and holds the batch's counts; its
    children are the store's transaction with a span per statement, and dead-lettering.
    A message with a hostile traceparent is stored like the others, unlinked."""
    provider, exporter = spans
    tracer = tracing.tracer_of(provider)
    t = await make_tenant(conn)
    worker = Worker(settings.replace(batch_size=100, batch_wait_ms=200), tracer=tracer)
    async with running(worker):
        publisher = Publisher.from_settings(settings, tracer=tracer)
        async with publisher:
            with tracer.start_as_current_span("the caller"):
                for _ in range(10):
                    await publisher.publish(event_doc(t))
                stranger = event_doc(t, template_id=str(uuid.uuid4()))
                await publisher.publish(stranger)  # unknown_template: dead-lettered
        hostile = spec.Basic.Properties(
            delivery_mode=2,
            content_type="application/json",
            headers={"traceparent": "00-" + "zz" * 16 + "-" + "00" * 8 + "-01", "tracestate": 7},
        )
        await publish([encode(event_doc(t))], settings.exchange, properties=hostile)
        await wait_until(lambda: _rows(conn, 11), message="11 rows")
        await wait_until(
            lambda: _dead_lettered(exporter), message="the dead-letter span", within=10
        )

    produced = _by_name(exporter, f"publish {settings.exchange}")
    assert len(produced) == 11
    caller = _by_name(exporter, "the caller")[0]
    for span in produced:
        assert span.kind is SpanKind.PRODUCER
        assert span.parent is not None
        assert span.parent.span_id == caller.context.span_id
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.destination.name"] == settings.exchange
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "prompt_run.v1"
        assert span.status.status_code is StatusCode.UNSET
    batches = _by_name(exporter, tracing.BATCH)
    linked = {(link.context.trace_id, link.context.span_id) for b in batches for link in b.links}
    assert linked == {(s.context.trace_id, s.context.span_id) for s in produced}
    totals: dict[str, int] = {}
    for batch in batches:
        assert batch.kind is SpanKind.CONSUMER
        attributes = dict(batch.attributes or {})
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == settings.queue
        assert attributes["prompter.commit_seconds"] >= 0
        assert attributes["prompter.bytes"] > 0
        for key in ("messaging.batch.message_count", "prompter.events", "prompter.stored"):
            totals[key] = totals.get(key, 0) + attributes[key]
        for key in ("prompter.duplicates", "prompter.rejected", "prompter.links"):
            totals[key] = totals.get(key, 0) + attributes[key]
    assert totals == {
        "messaging.batch.message_count": 12,
        "prompter.events": 12,
        "prompter.stored": 11,
        "prompter.duplicates": 0,
        "prompter.rejected": 1,
        "prompter.links": 11,
    }
    batch_ids = {b.context.span_id for b in batches}
    ingests = _by_name(exporter, tracing.INGEST)
    assert ingests
    assert all(s.parent and s.parent.span_id in batch_ids for s in ingests)
    ingest_ids = {s.context.span_id for s in ingests}
    statements = [s for s in exporter.get_finished_spans() if s.name.startswith("prompter.sql")]
    names = {s.name for s in statements}
    assert {"prompter.sql TEMPLATE_TENANTS", "prompter.sql transaction"} <= names
    assert names & {"prompter.sql COPY_RESULTS", "prompter.sql INSERT_RESULTS_FAST"}
    assert "prompter.sql INSERT_VERSIONS" in names
    transactions = [s for s in statements if s.name == "prompter.sql transaction"]
    assert all(s.parent and s.parent.span_id in ingest_ids for s in transactions)
    for s in statements:
        assert s.attributes
        assert s.attributes["db.system.name"] == "postgresql"
    dead = _by_name(exporter, tracing.DEAD_LETTER)
    assert len(dead) == 1
    assert dead[0].parent
    assert dead[0].parent.span_id in batch_ids
    assert dead[0].attributes
    assert dead[0].attributes["prompter.rejected"] == 1


async def test_replay_direct_traces_its_batches(
    settings: Settings,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    tmp_path: Path,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """``replay --direct``: one span per batch with its counts, the store's under it."""
    from worker.backfill.options import ReplayOptions
    from worker.backfill.replay import direct_sink
    from worker.backfill.run import replay_files

    provider, exporter = spans
    t = await make_tenant(conn)
    path = tmp_path / "events.jsonl"
    docs = [event_doc(t) for _ in range(25)]
    path.write_text("".join(json.dumps(d) + "\n" for d in [*docs, docs[0]]))
    options = ReplayOptions(paths=[str(path)], mode="direct", batch_size=10)
    store = Store(pool, tracer=tracing.tracer_of(provider))
    report = await replay_files(
        options, direct_sink(store, settings, options), max_bytes=settings.max_event_bytes
    )
    assert report.confirmed == 26
    assert await count(conn) == 25
    batches = _by_name(exporter, tracing.REPLAY_BATCH)
    assert len(batches) == 3
    assert sum(dict(b.attributes or {})["prompter.stored"] for b in batches) == 25
    assert sum(dict(b.attributes or {})["prompter.duplicates"] for b in batches) == 1
    assert all(dict(b.attributes or {})["prompter.replay.file"] == str(path) for b in batches)
    ids = {b.context.span_id for b in batches}
    ingests = _by_name(exporter, tracing.INGEST)
    assert len(ingests) == 3
    assert all(s.parent and s.parent.span_id in ids for s in ingests)


async def _rows(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


async def _dead_lettered(exporter: InMemorySpanExporter) -> bool:
    return bool(_by_name(exporter, tracing.DEAD_LETTER))


def test_a_batch_links_to_at_most_the_link_limit() -> None:
    """The first messages with a context, up to OTEL_SPAN_LINK_COUNT_LIMIT (default 128):
    the SDK would drop the rest, so they are not read."""
    good = _header(encode_entries([("traceparent", GOOD)]))
    bare = _header()
    assert len(tracing.links([bare, good] * 200, 128)) == 128
    assert len(tracing.links([bare, good, bare], 128)) == 1
    assert tracing.links([good], 0) == []
    assert tracing.link_limit({}) == 128
    assert tracing.link_limit({"OTEL_SPAN_LINK_COUNT_LIMIT": "16"}) == 16
    assert tracing.link_limit({"OTEL_SPAN_LINK_COUNT_LIMIT": "lots"}) == 128


def test_a_failed_step_records_its_exception_class_only(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A database error's message may quote the data: the span says the class, and holds
    no exception event (no message, no traceback)."""
    provider, exporter = spans
    tracer = tracing.tracer_of(provider)
    with pytest.raises(ValueError, match="secret"), tracing.span(tracer, "step", {"a": 1}):
        raise ValueError("secret payload value")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError"
    assert not span.events
    assert "secret" not in span.to_json()
    with tracing.span(None, "nothing") as nothing:
        assert nothing is None


async def test_a_failed_publish_ends_its_span_as_an_error(
    settings: Settings,
    conn: asyncpg.Connection,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A message the broker returns: its PRODUCER span ends, marked failed with the
    error's class."""
    from worker.errors import UnroutableError

    provider, exporter = spans
    t = await make_tenant(conn)
    async with Publisher.from_settings(settings, tracer=tracing.tracer_of(provider)) as p:
        with pytest.raises(UnroutableError):
            await p.publish(event_doc(t), routing_key="nobody.listens")
    [span] = exporter.get_finished_spans()
    assert span.kind is SpanKind.PRODUCER
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "UnroutableError"
