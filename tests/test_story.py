"""The worker's log tells its story: consuming, what it stored and refused, losing and
regaining the broker, a summary of each stretch, stopping; never a payload or a secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.factories import encode, event_doc, make_tenant
from tests.helpers import close_connections_named, count, publish, running, sample, wait_until
from worker import logs
from worker.config import Settings
from worker.ingest.worker import Worker
from worker.metrics import Metrics, summary_text

MARKER = "PAYLOAD-MARKER-7f3a"  # in every body published: must never reach a log line


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """What the worker writes, as it writes it when not on a terminal: JSON lines through
    the worker's own formatter and payload filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.PAYLOAD_FILTER)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def _doc(tenant: object, **overrides: Any) -> dict[str, Any]:
    doc = event_doc(tenant, **overrides)  # type: ignore[arg-type]
    doc["request"]["messages"][1]["content"] = f"{MARKER} where is my order?"
    return doc


async def test_start_store_reject_broker_lost_summary_stop(
    settings: Settings, conn: asyncpg.Connection, output: io.StringIO
) -> None:
    """Through a scenario (start, store, a rejection, the broker closing the connection,
    a stop) the lines come in the story's order, each with its facts: the consuming line
    names the queues, prefetch, budget and pool; the loss names its reason; summaries
    count what was stored and rejected, by reason; no line holds a payload or a password."""
    t = await make_tenant(conn)
    name = f"test-story-{uuid.uuid4().hex[:8]}"
    worker = Worker(settings.replace(log_summary_seconds=0.3), name=name)
    async with running(worker):
        await wait_until(lambda: _said(output, "consuming"), within=10, message="consuming")
        good = [encode(_doc(t)) for _ in range(20)]
        stranger = encode(_doc(t, template_id=str(uuid.uuid4())))  # unknown_template
        await publish([*good, stranger], settings.exchange)
        await wait_until(lambda: _rows(conn, 20), message="20 rows")
        await wait_until(lambda: _said(output, "in the last"), within=10, message="summary")
        assert await asyncio.to_thread(close_connections_named, f"{name}-consumer") == 1
        await wait_until(
            lambda: _reconnected(worker), within=20, message="reconnected to the broker"
        )
        await wait_until(lambda: _ready(worker), message="consuming again")
        await publish([encode(_doc(t)) for _ in range(5)], settings.exchange)
        await wait_until(lambda: _rows(conn, 25), message="25 rows")
    text = output.getvalue()
    assert MARKER not in text
    assert "guest:guest" not in text
    lines = _lines(output)
    messages = [r["message"] for r in lines]

    def first(prefix: str, after: int = -1) -> int:
        for i, message in enumerate(messages):
            if i > after and message.startswith(prefix):
                return i
        raise AssertionError(f"no line {prefix!r} after line {after}: {messages}")

    start = first("starting")
    consuming = first("consuming", start)
    rejected = first("event rejected", consuming)
    summary = first("in the last", consuming)
    lost = first("broker connection lost", max(rejected, summary))
    back = first("reconnected to the broker", lost)
    again = first("consuming", back)
    last_summary = first("in the last", again)
    stopping = first("stopped", last_summary)
    assert stopping == len(messages) - 1

    facts = lines[consuming]
    assert facts["queues"] == [settings.queue, settings.replay_queue]
    assert facts["prefetch"] == [settings.prefetch, settings.replay_prefetch]
    assert facts["max_held_bytes"] == settings.max_held_bytes
    assert facts["db_pool_size"] == settings.db_pool_size
    assert lines[rejected]["reason"] == "unknown_template"
    assert "test: closing the worker's connection" in lines[lost]["message"]
    summaries = [r for r in lines if r["message"].startswith("in the last")]
    assert sum(r["stored"] for r in summaries) == 25
    assert sum(r["rejected"].get("unknown_template", 0) for r in summaries) == 1
    assert all(r["events_per_second"] > 0 for r in summaries if r["batches"])
    assert any(r.get("reconnects") == {"broker": 1} for r in summaries)
    assert "1 rejected (unknown_template 1)" in " ".join(m for m in messages)
    assert sample(worker, "prompter_bytes_processed_total") > 0


async def test_no_summary_when_nothing_happened_and_none_when_turned_off(
    settings: Settings, output: io.StringIO
) -> None:
    """An idle worker writes no summary; PROMPTER_LOG_SUMMARY_SECONDS=0 writes none ever."""
    worker = Worker(settings.replace(log_summary_seconds=0.1))
    async with running(worker):
        assert "summary" in {t.get_name() for t in asyncio.all_tasks()}
        await asyncio.sleep(0.5)  # several intervals with nothing to tell
    assert not [r for r in _lines(output) if r["message"].startswith("in the last")]
    off = Worker(settings.replace(log_summary_seconds=0))
    async with running(off):
        assert "summary" not in {t.get_name() for t in asyncio.all_tasks()}


def test_the_summary_is_the_difference_of_two_readings_of_the_counters() -> None:
    """Rates over the interval, rejections and retries by label, the mean lag of the
    stored batches; nothing at all when no counter moved."""
    m = Metrics()
    before = m.totals(10.0)
    assert m.totals(70.0).since(before) is None
    m.batches.inc(3)
    m.stored.inc(100)
    m.duplicates.inc(2)
    m.rejected.labels(reason="invalid_json").inc(3)
    m.retries.labels(kind="DatabaseUnavailable").inc()
    m.bytes.inc(6_000_000)
    m.lag_seconds.observe(1.0)
    m.lag_seconds.observe(3.0)
    fields = m.totals(70.0).since(before)
    assert fields == {
        "seconds": 60.0,
        "batches": 3,
        "stored": 100,
        "duplicates": 2,
        "rejected": {"invalid_json": 3},
        "retries": {"DatabaseUnavailable": 1},
        "events_per_second": 1.8,
        "mb_per_second": 0.1,
        "lag_seconds": 2.0,
    }
    later = m.totals(70.0)
    m.retries.labels(kind="BrokerUnavailable").inc()  # a retry alone is worth a line
    assert m.totals(80.0).since(later) == {
        "seconds": 10.0,
        "batches": 0,
        "stored": 0,
        "duplicates": 0,
        "rejected": {},
        "retries": {"BrokerUnavailable": 1},
        "events_per_second": 0.0,
        "mb_per_second": 0.0,
    }


async def _said(stream: io.StringIO, prefix: str) -> bool:
    return any(r["message"].startswith(prefix) for r in _lines(stream))


async def _rows(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


async def _reconnected(worker: Worker) -> bool:
    return sample(worker, "prompter_reconnects_total", server="broker") >= 1


async def _ready(worker: Worker) -> bool:
    return worker.health.ready


def test_the_summary_line_reads_well() -> None:
    """Counts, rejections by reason, rates, and durations in a unit people read."""
    fields = {
        "seconds": 60.0,
        "stored": 100,
        "duplicates": 2,
        "rejected": {"invalid_json": 3, "unknown_template": 1},
        "retries": {"DatabaseUnavailable": 2},
        "events_per_second": 1.8,
        "mb_per_second": 0.1,
        "lag_seconds": 40_989_727.6,
    }
    assert summary_text(fields) == (
        "in the last 60 s: 100 stored, 2 duplicates, 4 rejected (invalid_json 3, "
        "unknown_template 1), 2 retries, 1.8 events/s, 0.1 MB/s, lag 474.4 days"
    )
    assert summary_text({**fields, "lag_seconds": 0.25}).endswith("lag 0.25 s")
    assert summary_text({**fields, "lag_seconds": 750.0}).endswith("lag 12.5 min")
