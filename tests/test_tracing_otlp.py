"""End to end: ``prompter-worker publish`` and ``prompter-worker run`` as processes, tracing
to a real OTLP/HTTP receiver started by the test; the trace goes from each publish to the
batch that committed it."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import ROOT
from tests.factories import event_doc, make_tenant
from tests.helpers import count, wait_until
from worker.config import Settings


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces, protobuf; keeps every
    span it is sent with its service name."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.paths.append(self.path)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[str, Any]]:
        """(service name, span) for every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    out.extend((service, span) for span in scope.spans)
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTER_", "OTEL_", "AMQP_"))}
    env.pop("DATABASE_URL", None)
    for f in Settings.fields():
        value = getattr(settings, f.name)
        env[f.metadata["env"]] = str(value).lower() if isinstance(value, bool) else str(value)
    env["PROMPTER_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def _attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = getattr(value, value.WhichOneof("value"))
    return out


async def test_a_trace_from_publish_to_commit_reaches_an_otlp_receiver(
    settings: Settings, conn: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    """The worker and the publish command, configured only by OTEL_EXPORTER_OTLP_ENDPOINT,
    export their spans over OTLP/HTTP: one publish span per event (service
    prompter-publish), batch spans of the worker (service prompter-worker) linked to every
    one of them, with the store's spans under the batches."""
    t = await make_tenant(conn)
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "run",
            env=_env(settings, **otel, OTEL_SERVICE_NAME="prompter-worker"),
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
    try:
        await wait_until(lambda: _said(log, "consuming"), within=30, message="consuming")
        events = tmp_path / "events.jsonl"
        events.write_text("".join(json.dumps(event_doc(t)) + "\n" for _ in range(30)))
        publish = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "publish",
            str(events),
            env=_env(settings, **otel, OTEL_SERVICE_NAME="prompter-publish"),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(publish.communicate(), 60)
        assert publish.returncode == 0, err.decode()
        await wait_until(lambda: _rows(conn, 30), message="30 rows")
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 60)
    assert worker.returncode == 0, log.read_text()
    assert set(receiver.paths) == {"/v1/traces"}
    spans = receiver.spans()
    published = [s for service, s in spans if service == "prompter-publish"]
    assert len(published) == 30
    assert {s.name for s in published} == {f"publish {settings.exchange}"}
    mine = [s for service, s in spans if service == "prompter-worker"]
    batches = [s for s in mine if s.name == "prompter.batch"]
    assert batches
    linked = {(link.trace_id, link.span_id) for b in batches for link in b.links}
    assert linked == {(s.trace_id, s.span_id) for s in published}
    stored = sum(_attributes(b)["prompter.stored"] for b in batches)
    assert stored == 30
    first = _attributes(batches[0])
    assert first["messaging.system"] == "rabbitmq"
    assert first["messaging.destination.name"] == settings.queue
    assert {"prompter.events", "prompter.bytes", "prompter.commit_seconds"} <= set(first)
    batch_ids = {b.span_id for b in batches}
    ingests = [s for s in mine if s.name == "prompter.ingest"]
    assert ingests
    assert all(s.parent_span_id in batch_ids for s in ingests)
    names = {s.name for s in mine}
    assert "prompter.sql transaction" in names
    assert "prompter.sql TEMPLATE_TENANTS" in names
    marker = json.loads(events.read_text().splitlines()[0])["request"]["messages"][1]["content"]
    assert all(marker not in str(s) for _, s in spans)  # no payload in any span


async def _said(path: Path, message: str) -> bool:
    text = await asyncio.to_thread(path.read_text)
    for line in text.splitlines():
        if line.startswith("{") and json.loads(line).get("message") == message:
            return True
    return False


async def _rows(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n
