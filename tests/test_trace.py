"""`prompter-worker trace EVENT_ID` against the real PostgreSQL and RabbitMQ: each state
(stored, dead-lettered, waiting, not seen), text and --json, a usage error for a bad id,
no password printed; the lookup is a primary-key probe; the live queues are never browsed
(and why: the broker counts a browse as a delivery); the commit time when PostgreSQL
tracks it (a private server with track_commit_timestamp on)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import asyncpg
import orjson
import pytest
from pamqp import commands as spec

from tests.conftest import AMQP_URL
from tests.factories import Tenant, encode, event, event_doc, make_tenant
from tests.helpers import count, publish, queue_depth, run_cli, running, wait_until
from worker.amqp import broker
from worker.commands import trace
from worker.config import Settings
from worker.ingest.worker import Worker
from worker.store.ingest import Store


def props(message_id: str, headers: dict[str, Any] | None = None) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        delivery_mode=2, content_type="application/json", message_id=message_id, headers=headers
    )


async def declare(settings: Settings) -> None:
    """The topology, as the worker declares it."""
    connection = await broker.connect(settings.amqp_url, name="test-trace")
    try:
        await broker.open_topology(
            connection, broker.Topology.from_settings(settings), passive=False
        )
    finally:
        await connection.close()


async def publish_doc(settings: Settings, doc: dict[str, Any], **kwargs: Any) -> None:
    await publish([encode(doc)], settings.exchange, properties=props(doc["event_id"]), **kwargs)


async def dead_letter_depth_is(settings: Settings, n: int) -> bool:
    return await queue_depth(settings.dead_letter_queue) == n


async def orphan(conn: asyncpg.Connection) -> Tenant:
    """A tenant whose template is not registered: its events are dead-lettered."""
    tenant = await make_tenant(conn)
    await conn.execute("DELETE FROM prompt_templates WHERE id = $1", uuid.UUID(tenant.template_id))
    return tenant


# --- each state, through the API ------------------------------------------------------------


async def test_a_stored_event_shows_its_rows_and_says_the_commit_time_is_untracked(
    settings: Settings, conn: asyncpg.Connection, store: Store
) -> None:
    """Stored: when it occurred, its org, workspace, template (name) and version row; the
    commit time is 'unknown (track_commit_timestamp is off)' on a server that does not
    track it (the shared one). Read as the least-privilege runtime role."""
    assert await conn.fetchval("SHOW track_commit_timestamp") == "off"
    tenant = await make_tenant(conn)
    e = event(tenant)
    await store.ingest([e])
    await declare(settings)

    result = await trace.trace(settings, e.event_id.upper())  # any case is the same id

    assert result.state == trace.STORED
    assert result.errors == ()
    stored = result.stored
    assert stored is not None
    assert stored.event_id == e.event_id
    assert (stored.org_id, stored.workspace_id) == (tenant.org_id, tenant.workspace_id)
    assert stored.template_id == tenant.template_id
    assert stored.template_name == "Support answer"
    assert stored.occurred_at == e.occurred_at
    assert stored.committed_at is None
    assert stored.commit_time_note == trace.COMMIT_TIME_UNTRACKED
    version = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert stored.version_id == str(version["id"])
    assert stored.provider_version_key == version["provider_version_key"]
    assert stored.version_first_seen_at == version["first_seen_at"]
    text = trace.render(result)
    assert f"event {e.event_id}: stored" in text
    assert "committed at  unknown (track_commit_timestamp is off)" in text
    assert '"Support answer"' in text
    assert orjson.loads(orjson.dumps(result.as_dict()))["stored"]["event_id"] == e.event_id


async def test_a_dead_lettered_event_shows_reason_detail_and_time_and_stays_queued(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Dead-lettered: the reason, the detail and when, from the dead-letter queue, which
    keeps every message (looked at and handed back)."""
    tenant = await orphan(conn)
    doc = event_doc(tenant)
    others = [event_doc(tenant) for _ in range(3)]
    async with running(Worker(settings)):
        for d in [*others[:2], doc, others[2]]:
            await publish_doc(settings, d)
        await wait_until(lambda: dead_letter_depth_is(settings, 4), message="4 dead letters")

    result = await trace.trace(settings, doc["event_id"])

    assert result.state == trace.DEAD_LETTERED
    assert result.stored is None
    [letter] = result.dead_letters
    assert letter.event_id == doc["event_id"]
    assert letter.reason == "unknown_template"
    assert tenant.template_id in letter.detail
    assert letter.failed_at
    assert letter.by == "worker"
    assert result.dead_letters_scanned == 4
    assert result.dead_letter_scan_complete
    assert await queue_depth(settings.dead_letter_queue) == 4
    text = trace.render(result)
    assert f"event {doc['event_id']}: dead-lettered (unknown_template)" in text
    assert f"dead-letters redrive --event-id {doc['event_id']}" in text
    assert f"1 copy among the 4 in {settings.dead_letter_queue}" in text


async def test_a_waiting_event_is_counted_not_browsed(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Waiting: 'not stored yet; N messages waiting in <queue>'. The live queue is only
    counted: after several traces the message was never delivered (not redelivered, no
    x-delivery-count), so tracing cannot push it toward the delivery limit."""
    await declare(settings)
    tenant = await make_tenant(conn)
    doc = event_doc(tenant)
    await publish_doc(settings, doc)

    for _ in range(3):
        result = await trace.trace(settings, doc["event_id"])
        assert result.state == trace.WAITING
    assert result.summary() == (
        f"not stored yet; 1 message waiting in {settings.queue}, "
        f"0 messages waiting in {settings.replay_queue}"
    )
    assert result.as_dict()["queues_browsed"] is False

    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        message = await channel.basic_get(settings.queue, no_ack=True)
    finally:
        await connection.close()
    assert message.body == encode(doc)
    assert message.delivery.redelivered is False
    assert (message.header.properties.headers or {}).get("x-delivery-count", 0) == 0


async def test_browsing_a_live_queue_would_dead_letter_the_event(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Why trace does not browse the live queues: on a quorum queue, taking a message and
    handing it back counts as a delivery, so browsing it delivery-limit times sends a
    healthy event to the dead-letter queue."""
    limited = settings.replace(delivery_limit=2)
    await declare(limited)
    doc = event_doc(await make_tenant(conn))
    await publish_doc(limited, doc)
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for _ in range(3):  # what a "browse and give back" does, once per trace
            message = await channel.basic_get(limited.queue, no_ack=False)
            assert not isinstance(message.delivery, spec.Basic.GetEmpty)
            await channel.basic_nack(message.delivery_tag, requeue=True)
    finally:
        await connection.close()
    await wait_until(lambda: dead_letter_depth_is(limited, 1), message="dead-lettered")
    result = await trace.trace(limited, doc["event_id"])
    assert result.state == trace.DEAD_LETTERED
    assert result.dead_letters[0].reason == "delivery_limit"


async def test_an_event_seen_nowhere_says_where_it_looked(settings: Settings) -> None:
    """Not seen anywhere: not stored, not in the dead-letter queue, no message waiting."""
    await declare(settings)
    event_id = str(uuid.uuid4())

    result = await trace.trace(settings, event_id)

    assert result.state == trace.NOT_FOUND
    assert result.summary() == "not seen anywhere"
    text = trace.render(result)
    assert f"dead letters  none: {settings.dead_letter_queue} is empty" in text
    assert f"0 messages waiting in {settings.queue}" in text


async def test_the_dead_letter_scan_is_bounded(settings: Settings) -> None:
    """At most --dead-letter-limit dead letters are looked at; beyond them the answer says
    the scan was partial, and a larger limit finds the event."""
    await declare(settings)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for event_id in ids:  # dead letters as the worker writes them
            headers = {
                "x-error-reason": "invalid_field",
                "x-error-detail": '"occurred_at" is not a timestamp',
                "x-failed-at": "2025-08-14T14:13:29+00:00",
                "x-original-routing-key": broker.LIVE_ROUTING_KEY,
            }
            await channel.basic_publish(
                b"{}",
                exchange=settings.dead_letter_exchange,
                routing_key=broker.LIVE_ROUTING_KEY,
                properties=props(event_id, headers),
            )
    finally:
        await connection.close()

    partial = await trace.trace(settings, ids[-1], dead_letter_limit=3)
    assert partial.state == trace.NOT_FOUND
    assert partial.dead_letters_scanned == 3
    assert not partial.dead_letter_scan_complete
    assert f"none among the first 3 of 5 in {settings.dead_letter_queue}" in trace.render(partial)
    whole = await trace.trace(settings, ids[-1], dead_letter_limit=5)
    assert whole.state == trace.DEAD_LETTERED
    assert whole.dead_letters[0].detail == '"occurred_at" is not a timestamp'
    assert await queue_depth(settings.dead_letter_queue) == 5


async def test_an_unreachable_database_is_reported_without_its_password(
    settings: Settings,
) -> None:
    """A server that cannot be read leaves the state unknown with the reason, the URL
    masked; what the broker says is still there."""
    await declare(settings)
    password = "trace-secret-" + uuid.uuid4().hex
    closed = f"postgresql://someone:{password}@127.0.0.1:9/nowhere"
    result = await trace.trace(settings.replace(database_url=closed), str(uuid.uuid4()))
    assert result.state == trace.UNKNOWN
    assert len(result.errors) == 1
    assert "127.0.0.1:9" in result.errors[0]
    assert password not in trace.render(result)
    assert password not in orjson.dumps(result.as_dict()).decode()
    assert [q.name for q in result.queues] == [settings.queue, settings.replay_queue]


# --- speed on a large table -----------------------------------------------------------------


async def test_the_lookup_is_a_primary_key_probe(conn: asyncpg.Connection) -> None:
    """On a table of 50,000 results, the plan of the lookup reads prompt_results through
    its primary key index (and the template and version through theirs): no scan."""
    await conn.execute(
        """
        INSERT INTO prompt_results (id, org_id, workspace_id, request, response)
        SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), '{}', '{}'
        FROM generate_series(1, 50000)
        """
    )
    await conn.execute("ANALYZE prompt_results")
    some_id = await conn.fetchval("SELECT id FROM prompt_results LIMIT 1")
    [plan] = orjson.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {trace.SQL.FIND}", some_id))
    nodes = list(_nodes(plan["Plan"]))
    results = [n for n in nodes if n.get("Relation Name") == "prompt_results"]
    assert [(n["Node Type"], n["Index Name"]) for n in results] == [
        ("Index Scan", "prompt_results_pkey")
    ]
    assert not [
        n
        for n in nodes
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "prompt_results"
    ]
    found = await trace.find_stored(conn, str(some_id))
    assert found is not None
    assert found.event_id == str(some_id)


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


# --- the command ------------------------------------------------------------------------------


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": settings.database_url,
        "AMQP_URL": settings.amqp_url,
        "PROMPTER_QUEUE": settings.queue,
        "PROMPTER_REPLAY_QUEUE": settings.replay_queue,
        "PROMPTER_DEAD_LETTER_QUEUE": settings.dead_letter_queue,
        "PROMPTER_LOG_FORMAT": "text",
    }


def trace_cli(settings: Settings, event_id: str) -> tuple[Any, Any]:
    """`trace EVENT_ID` and `trace EVENT_ID --json` as a user runs them: the text run and
    the parsed JSON, checked for a password and a traceback; both exit alike."""
    env = cli_env(settings)
    text = run_cli("trace", event_id, env=env)
    as_json = run_cli("trace", event_id, "--json", env=env)
    password = urllib.parse.urlsplit(settings.database_url).password
    assert password
    for out in (text, as_json):
        assert "Traceback" not in out.stderr
        assert password not in out.stdout + out.stderr
    assert text.returncode == as_json.returncode
    return text, orjson.loads(as_json.stdout)


async def test_the_command_answers_for_each_state_in_text_and_json(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Not seen (exit 3), stored (exit 0), dead-lettered (exit 3), waiting (exit 3), each in
    text and in --json; the runtime role's password is never printed."""
    await declare(settings)
    tenant, stray = await make_tenant(conn), await orphan(conn)
    stored, dead, waiting = event_doc(tenant), event_doc(stray), event_doc(tenant)

    text, data = trace_cli(settings, stored["event_id"])
    assert text.returncode == 3
    assert data["state"] == "not_found"
    assert text.stdout.startswith(f"event {stored['event_id']}: not seen anywhere")

    async with running(Worker(settings)):
        await publish_doc(settings, stored)
        await publish_doc(settings, dead)
        await wait_until(lambda: _stored(conn, 1), message="the event stored")
        await wait_until(lambda: dead_letter_depth_is(settings, 1), message="dead-lettered")
    await publish_doc(settings, waiting)

    text, data = trace_cli(settings, stored["event_id"])
    assert text.returncode == 0
    assert data["state"] == "stored"
    assert data["stored"]["template_id"] == tenant.template_id
    assert data["stored"]["committed_at"] is None
    assert data["stored"]["commit_time_note"] == trace.COMMIT_TIME_UNTRACKED
    assert "committed at  unknown (track_commit_timestamp is off)" in text.stdout

    text, data = trace_cli(settings, dead["event_id"])
    assert text.returncode == 3
    assert data["state"] == "dead_lettered"
    assert data["dead_letters"][0]["reason"] == "unknown_template"
    assert "dead letter   unknown_template: " in text.stdout

    text, data = trace_cli(settings, waiting["event_id"])
    assert text.returncode == 3
    assert data["state"] == "waiting"
    assert data["summary"] == (
        f"not stored yet; 1 message waiting in {settings.queue}, "
        f"0 messages waiting in {settings.replay_queue}"
    )
    assert [q["ready"] for q in data["queues"]] == [1, 0]
    assert await queue_depth(settings.queue) == 1


async def _stored(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


def test_an_invalid_event_id_is_a_usage_error() -> None:
    """A value that is not a UUID exits 2 with a message naming EVENT_ID, before any
    server is contacted; `trace` is listed by --help."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    out = run_cli("trace", "not-a-uuid", env=env)
    assert out.returncode == 2
    assert "Invalid value for EVENT_ID: 'not-a-uuid' is not a UUID" in out.stderr
    assert "Traceback" not in out.stderr
    listing = run_cli("--help", env=env)
    assert any(line.split()[:1] == ["trace"] for line in listing.stdout.splitlines())


def test_the_command_s_default_limit_is_the_module_s() -> None:
    """The CLI repeats the default (to keep --help fast); both agree."""
    from worker import cli

    assert cli.DEFAULT_TRACE_DEAD_LETTERS == trace.DEFAULT_DEAD_LETTER_LIMIT


# --- the commit time, on a server that tracks it ----------------------------------------------


@pytest.fixture(scope="module")
def tracking_postgres() -> Iterator[str]:
    """A private PostgreSQL cluster (tests/faults/servers.py) with
    track_commit_timestamp = on, migrated; its URL. Skipped where it cannot start, except
    in CI, where that fails."""
    from tests.faults.servers import Certificates, PrivatePostgres, ServerError, free_port
    from worker.store import migrations

    base = Path(tempfile.mkdtemp(prefix="prompter-trace-"))
    base.chmod(0o755)
    pg: PrivatePostgres | None = None
    try:
        try:
            certs = Certificates.make(base / "certs")
            for path in (base / "certs").iterdir():
                path.chmod(0o644)
            pg = PrivatePostgres(base / "pg", free_port(), certs)
            pg.start()
            with (pg.data / "postgresql.conf").open("a") as conf:
                conf.write("track_commit_timestamp = on\n")
            pg.restart_fast()
        except (ServerError, OSError) as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"a private PostgreSQL did not start: {exc}", pytrace=False)
            pytest.skip(f"a private PostgreSQL did not start: {exc}")
        asyncio.run(pg.execute("CREATE DATABASE prompter"))
        url = pg.url("prompter")
        migrations.upgrade(url)
        yield url
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_the_commit_time_is_the_batch_s_when_tracked(tracking_postgres: str) -> None:
    """With track_commit_timestamp on, the answer gives the commit time of the transaction
    that stored the event: the same for every event of one batch, after they occurred, and
    within the call that stored them."""
    from worker.store.pool import create_pool

    conn = await asyncpg.connect(tracking_postgres)
    pool = await create_pool(tracking_postgres, max_size=2)
    try:
        assert await conn.fetchval("SHOW track_commit_timestamp") == "on"
        tenant = await make_tenant(conn)
        batch = [event(tenant), event(tenant)]
        before = datetime.now(UTC)
        await Store(pool).ingest(batch)
        after = datetime.now(UTC)
        found = [await trace.find_stored(conn, e.event_id) for e in batch]
    finally:
        await pool.close()
        await conn.close()
    first, second = found
    assert first is not None
    assert second is not None
    assert first.commit_time_note is None
    assert first.committed_at is not None
    assert first.committed_at == second.committed_at
    assert before <= first.committed_at <= after
    assert first.committed_at > first.occurred_at
    text = trace.render(trace.Trace(event_id=first.event_id, database="", broker="", stored=first))
    assert "s after it occurred; the batch's transaction)" in text


def test_the_dead_letter_limit_is_refused_beyond_what_is_looked_at() -> None:
    """--dead-letter-limit goes as far as a listing can (65,535, a prefetch): a larger
    value is a usage error naming the option, not a limit silently capped while the answer
    says "--dead-letter-limit looks further"."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    out = run_cli("trace", str(uuid.uuid4()), "--dead-letter-limit", "70000", env=env)
    assert out.returncode == 2
    assert "--dead-letter-limit" in out.stderr
    assert "65535" in out.stderr
