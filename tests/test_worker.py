"""The worker against real RabbitMQ and PostgreSQL: at least once, nothing lost or doubled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
import uuid
from pathlib import Path

import aiormq
import asyncpg
import orjson
import pytest
from pamqp import commands as spec

from tests.conftest import AMQP_URL
from tests.factories import encode, event_doc, make_tenant
from tests.helpers import (
    close_connections_named,
    count,
    drain,
    header,
    publish,
    queue_depth,
    running,
    sample,
    wait_until,
)
from worker.config import Settings
from worker.ingest.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def bodies_for(tenant: object, n: int) -> list[bytes]:
    return [encode(event_doc(tenant)) for _ in range(n)]  # type: ignore[arg-type]


async def test_n_events_give_n_rows_and_an_empty_queue(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """N events published -> exactly N rows; the queue is empty; nothing left unacked."""
    t = await make_tenant(conn)
    worker = Worker(settings)
    async with running(worker):
        await publish(bodies_for(t, 1500), settings.exchange)
        await wait_until(lambda: _rows(conn, 1500), message="1500 rows")
        await wait_until(lambda: _all_acked(worker), message="every delivery acked")
    assert await count(conn) == 1500
    assert await queue_depth(settings.queue) == 0
    assert sample(worker, "prompter_events_stored_total") == 1500
    assert await queue_depth(settings.dead_letter_queue) == 0


async def _rows(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


async def _all_acked(worker: Worker) -> bool:
    return bool(worker.session.sources) and all(s.held == 0 for s in worker.session.sources)


async def test_poison_messages_are_dead_lettered_and_neighbours_stored(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Each kind of poison lands in the dead-letter queue with its reason; the good events
    around it are stored; the worker keeps consuming."""
    t = await make_tenant(conn)
    other = await make_tenant(conn)
    good = bodies_for(t, 20)
    poison = {
        "invalid_json": b"{nope",
        "not_an_object": b"[1, 2, 3]",
        "missing_field": orjson.dumps({k: v for k, v in event_doc(t).items() if k != "request"}),
        "invalid_field": encode(event_doc(t, occurred_at="yesterday")),
        "unsupported_schema_version": encode(event_doc(t, schema_version=7)),
        "payload_too_large": encode(event_doc(t, request={"x": "y" * 5000})),
        "unstorable_content": encode(event_doc(t, response={"text": "a\u0000b"})),
        "unknown_template": encode(event_doc(t, template_id=str(uuid.uuid4()))),
        "template_tenant_mismatch": encode(event_doc(t, workspace_id=other.workspace_id)),
    }
    worker = Worker(settings.replace(max_event_bytes=4096))
    async with running(worker):
        ids = {reason: f"poison-{reason}" for reason in poison}
        # One message per reason, each with a message_id saying which it is.
        for reason, body in poison.items():
            await publish(
                [body],
                settings.exchange,
                properties=spec.Basic.Properties(
                    delivery_mode=2, content_type="application/json", message_id=ids[reason]
                ),
            )
        await publish(good, settings.exchange)
        await publish(
            [b"plain text"],
            settings.exchange,
            properties=spec.Basic.Properties(content_type="text/plain", message_id="poison-ct"),
        )
        await wait_until(lambda: _rows(conn, 20), message="the good events")
        await wait_until(
            lambda: _depth_at_least(settings.dead_letter_queue, len(poison) + 1),
            message="every poison message dead-lettered",
        )
        # Still consuming after all that.
        await publish(bodies_for(t, 5), settings.exchange)
        await wait_until(lambda: _rows(conn, 25), message="events after the poison")
    dead = await drain(settings.dead_letter_queue)
    reasons = {m.header.properties.message_id: header(m, "x-error-reason") for m in dead}
    assert reasons == {**{ids[r]: r for r in poison}, "poison-ct": "unsupported_content_type"}
    for m in dead:
        assert header(m, "x-error-detail")
        assert header(m, "x-failed-at")
        assert header(m, "x-worker-version")
        assert m.header.properties.delivery_mode == 2
        if m.header.properties.message_id == "poison-invalid_json":
            assert m.body == b"{nope"  # the original body, untouched
    assert await count(conn) == 25


async def _depth_at_least(queue: str, n: int) -> bool:
    return await queue_depth(queue) >= n


async def test_a_nacked_dead_letter_copy_is_sent_again_on_a_new_channel(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """The broker nacks a dead-letter copy: the worker sends it again on a new channel of
    the same connection (no reconnection; the nacking channel is closed), and the poison
    lands in the dead-letter queue once the broker takes it; the worker consumes on.
    (RabbitMQ 3.10 nacks every publish to a quorum queue, for the life of the channel, once
    the channel's first publish to it met a leader that had just died: retried on that
    channel, the copy would never be confirmed and the poison never acked; found by
    tests/faults/test_cluster.py.) Here a queue bound beside the dead-letter queue refuses
    every message until it goes away."""
    t = await make_tenant(conn)
    worker = Worker(settings)
    async with running(worker):
        original = worker.session.publish_channel
        refusing = await aiormq.connect(AMQP_URL)
        try:
            channel = await refusing.channel()
            full = f"{settings.dead_letter_queue}.full"
            await channel.queue_declare(
                full,
                exclusive=True,  # gone with this connection
                arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
            )
            await channel.queue_bind(full, settings.dead_letter_exchange, routing_key="#")
            await publish(
                [b"{nope"],
                settings.exchange,
                properties=spec.Basic.Properties(
                    delivery_mode=2, content_type="application/json", message_id="poison-nacked"
                ),
            )
            await wait_until(
                lambda: _metric(worker, "prompter_retries_total", 2, kind="dead_letter"),
                message="the dead-letter copy nacked, twice",
            )
        finally:
            await refusing.close()
        await wait_until(
            lambda: _depth_at_least(settings.dead_letter_queue, 1), message="dead-lettered"
        )
        await publish(bodies_for(t, 5), settings.exchange)
        await wait_until(lambda: _rows(conn, 5), message="consuming on")
        assert worker.session.publish_channel != original
        assert worker.session.publisher is not None
        assert original not in worker.session.publisher.confirms.channels  # retired, closed
        assert sample(worker, "prompter_reconnects_total", server="broker") == 0
    # Each nacked copy reached the dead-letter queue too (a publish routed to two queues is
    # nacked if either refuses it): at least once, and only the poison.
    dead = await drain(settings.dead_letter_queue)
    assert {m.header.properties.message_id for m in dead} == {"poison-nacked"}


async def test_one_event_published_three_times_is_one_row(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Publishing the same event three times stores it once; the repeats count as duplicates."""
    t = await make_tenant(conn)
    body = encode(event_doc(t))
    worker = Worker(settings)
    async with running(worker):
        await publish([body], settings.exchange)
        await wait_until(lambda: _rows(conn, 1))
        await publish([body, body], settings.exchange)
        await wait_until(
            lambda: _metric(worker, "prompter_events_duplicate_total", 2),
            message="two duplicates counted",
        )
    assert await count(conn) == 1
    assert await queue_depth(settings.dead_letter_queue) == 0


async def _metric(worker: Worker, name: str, value: float, **labels: str) -> bool:
    return sample(worker, name, **labels) >= value


async def test_database_connections_killed_mid_stream(
    settings: Settings, conn: asyncpg.Connection, database: str
) -> None:
    """pg_terminate_backend on the worker's connections in the middle of its statements,
    repeatedly, while events flow: the worker recovers by itself; nothing lost, nothing
    doubled, nothing dead-lettered."""
    t = await make_tenant(conn)
    bodies = bodies_for(t, 3000)
    worker = Worker(settings.replace(batch_size=100, prefetch=300))
    locker = await asyncpg.connect(database)
    killed = 0
    try:
        async with running(worker):
            publisher = asyncio.create_task(_publish_slowly(bodies, settings, chunks=30))
            for round_ in range(1, 6):
                # Hold the table so the worker's next statement waits, then kill it there.
                async with locker.transaction():
                    await locker.execute("LOCK TABLE prompt_results IN SHARE MODE")
                    await wait_until(lambda: _worker_waits(conn), message="a statement waiting")
                    killed += await conn.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE application_name = 'prompter-worker'"
                        " AND datname = current_database() AND wait_event_type = 'Lock'"
                    )
                await wait_until(
                    lambda n=round_: _metric(
                        worker, "prompter_retries_total", n, kind="DatabaseUnavailable"
                    ),
                    message="the worker saw its statement killed",
                )
            await publisher
            await wait_until(lambda: _rows(conn, 3000), within=60, message="all rows")
            await wait_until(lambda: _all_acked(worker))
    finally:
        await locker.close()
    assert killed >= 5
    assert sample(worker, "prompter_retries_total", kind="DatabaseUnavailable") >= 5
    assert await count(conn) == 3000
    assert await conn.fetchval("SELECT count(DISTINCT id) FROM prompt_results") == 3000
    assert await queue_depth(settings.dead_letter_queue) == 0
    assert await queue_depth(settings.queue) == 0


async def _worker_waits(conn: asyncpg.Connection) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'prompter-worker'"
        " AND datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(n)


async def _publish_slowly(bodies: list[bytes], settings: Settings, *, chunks: int) -> None:
    """Publish in chunks, each once the worker has taken the one before off the queue: a
    stream paced by the consumer, flowing while the test breaks things."""
    size = len(bodies) // chunks
    for i in range(0, len(bodies), size):
        await publish(bodies[i : i + size], settings.exchange)
        await wait_until(lambda: _taken(settings.queue), within=60, message="the chunk taken")


async def _taken(queue: str) -> bool:
    return await queue_depth(queue) == 0


async def test_broker_connection_closed_mid_stream(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """The broker closes the worker's connection twice while events flow: it reconnects,
    consumes again, and every event is stored exactly once."""
    t = await make_tenant(conn)
    bodies = bodies_for(t, 3000)
    name = f"test-worker-{uuid.uuid4().hex[:8]}"
    worker = Worker(settings.replace(batch_size=100, prefetch=500), name=name)
    async with running(worker):
        publisher = asyncio.create_task(_publish_slowly(bodies, settings, chunks=30))
        closed = 0
        for k in (1, 2):
            await wait_until(lambda: _is_ready(worker), message="consuming")
            await wait_until(lambda: _mid_stream(worker, publisher), message="events in flight")
            closed += await asyncio.to_thread(close_connections_named, f"{name}-consumer")
            await wait_until(
                lambda k=k: _metric(worker, "prompter_reconnects_total", k, server="broker"),
                within=20,
                message="reconnected",
            )
        await publisher
        await wait_until(lambda: _rows(conn, 3000), within=60, message="every event stored")
        await wait_until(lambda: _is_ready(worker), message="consuming again")
        await wait_until(lambda: _all_acked(worker))
    assert closed == 2
    assert sample(worker, "prompter_reconnects_total", server="broker") >= 2
    assert await count(conn) == 3000
    assert await conn.fetchval("SELECT count(DISTINCT id) FROM prompt_results") == 3000
    assert await queue_depth(settings.queue) == 0
    assert await queue_depth(settings.dead_letter_queue) == 0


async def _is_ready(worker: Worker) -> bool:
    return worker.health.ready


async def _mid_stream(worker: Worker, publisher: asyncio.Task[None]) -> bool:
    """The worker holds deliveries not acked yet (or the stream has ended)."""
    return await _held(worker, 1) or publisher.done()


async def test_stop_with_a_batch_in_flight_commits_and_acks_it(
    settings: Settings, conn: asyncpg.Connection, database: str
) -> None:
    """A stop while a batch waits on the database: the batch still commits and is acked,
    the worker returns 0, and nothing is left to redeliver."""
    t = await make_tenant(conn)
    worker = Worker(settings)
    locker = await asyncpg.connect(database)
    try:
        async with running(worker) as task:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE prompt_results IN SHARE MODE")
            await publish(bodies_for(t, 50), settings.exchange)
            await wait_until(lambda: _held(worker, 50), message="the batch in flight")
            worker.stop()
            await wait_until(lambda: _draining(worker), message="draining what it holds")
            assert not task.done()  # waiting for its batch
            await tx.rollback()
            assert await asyncio.wait_for(task, 30) == 0
    finally:
        await locker.close()
    assert await count(conn) == 50
    assert await queue_depth(settings.queue) == 0


async def _held(worker: Worker, n: int) -> bool:
    return sum(s.held for s in worker.session.sources) >= n


async def _draining(worker: Worker) -> bool:
    """Consuming stopped; the worker waits for what it holds to settle."""
    return worker.dispatcher.draining


async def test_replayed_events_use_their_own_queue_and_live_goes_first(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """prompt_run.v1.replay lands in the replay queue, never the live one; both are stored,
    and with both backlogged the live events are written first."""
    t = await make_tenant(conn)
    live = [encode(event_doc(t, version_key="live")) for _ in range(200)]
    replay = [encode(event_doc(t, version_key="replay")) for _ in range(600)]
    worker = Worker(settings.replace(batch_size=100))
    # Declare the topology, then fill both queues before the worker consumes.
    async with running(worker):
        pass
    await publish(replay, settings.exchange, routing_key="prompt_run.v1.replay")
    await publish(live, settings.exchange)
    assert await queue_depth(settings.replay_queue) == 600
    assert await queue_depth(settings.queue) == 200
    worker = Worker(settings.replace(batch_size=100))
    async with running(worker):
        await wait_until(lambda: _rows(conn, 800), message="both queues stored")
    # Live rows were inserted before most replay rows (xmin orders the transactions).
    ranks = await conn.fetch(
        "SELECT provider_version_key, xmin::text::bigint AS tx FROM prompt_results"
    )
    last_live = max(r["tx"] for r in ranks if r["provider_version_key"] == "live")
    replay_before = sum(
        1 for r in ranks if r["provider_version_key"] == "replay" and r["tx"] < last_live
    )
    assert replay_before <= settings.replay_prefetch


async def test_three_workers_share_one_queue(settings: Settings, conn: asyncpg.Connection) -> None:
    """Three worker processes on one queue: every event stored exactly once."""
    t = await make_tenant(conn)
    env = _env(settings)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "run", env=env, cwd=ROOT
        )
        for _ in range(3)
    ]
    try:
        await wait_until(lambda: _consumers(settings.queue, 3), message="three consumers")
        bodies = bodies_for(t, 4000)
        await publish(bodies, settings.exchange)
        await wait_until(lambda: _rows(conn, 4000), within=90, message="4000 rows")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 60) for p in procs]
    assert codes == [0, 0, 0]
    assert await count(conn) == 4000
    assert await queue_depth(settings.queue) == 0


async def _consumers(queue: str, n: int) -> bool:
    import aiormq

    from tests.conftest import AMQP_URL

    try:
        connection = await aiormq.connect(AMQP_URL)
    except Exception:
        return False
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.consumer_count or 0) >= n
    except Exception:
        return False
    finally:
        await connection.close()


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTER_")}
    for f in Settings.fields():
        env[f.metadata["env"]] = (
            str(getattr(settings, f.name)).lower()
            if isinstance(getattr(settings, f.name), bool)
            else str(getattr(settings, f.name))
        )
    env["PROMPTER_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_process_from_start_to_sigterm(settings: Settings, conn: asyncpg.Connection) -> None:
    """`prompter-worker run` as a process configured by its environment: it serves
    /healthz, /readyz and /metrics, stores events, logs JSON without secrets, and exits 0
    on SIGTERM."""
    t = await make_tenant(conn)
    port = _free_port()
    env = _env(settings, PROMPTER_METRICS_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until(lambda: _http_ok(port, "/readyz"), message="ready")
        assert await _http_ok(port, "/healthz")
        await publish(bodies_for(t, 100), settings.exchange)
        await wait_until(lambda: _rows(conn, 100))
        metrics = await asyncio.to_thread(_get, port, "/metrics")
        assert "prompter_events_stored_total 100.0" in metrics
        assert "prompter_consumers 2.0" in metrics
        ready = json.loads(await asyncio.to_thread(_get, port, "/readyz"))
        assert ready["ready"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["message"] == "stopped" for r in lines)
    assert "guest:guest" not in stderr


async def _http_ok(port: int, path: str) -> bool:
    try:
        await asyncio.to_thread(_get, port, path)
    except OSError:
        return False
    return True


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return str(r.read().decode())


async def test_readiness_follows_the_database(settings: Settings, conn: asyncpg.Connection) -> None:
    """Readiness turns false while PostgreSQL refuses the worker, and true again after."""
    worker = Worker(settings)
    async with running(worker):
        assert worker.health.ready
        worker.health.database_ok = True
        # Make every query of the worker fail: revoke its database... by renaming the table.
        await conn.execute("ALTER TABLE prompt_results RENAME TO prompt_results_away")
        t = await make_tenant(conn)
        await publish(bodies_for(t, 3), settings.exchange)
        await wait_until(lambda: _is_unready_db(worker), message="not ready")
        await conn.execute("ALTER TABLE prompt_results_away RENAME TO prompt_results")
        await wait_until(lambda: _rows(conn, 3), message="stored after the fix")
        await wait_until(lambda: _is_ready(worker), message="ready again")
    assert await queue_depth(settings.dead_letter_queue) == 0


async def _is_unready_db(worker: Worker) -> bool:
    return not worker.health.database_ok and not worker.health.ready


@pytest.mark.parametrize("declare", [False])
async def test_passive_declaration_refuses_a_missing_topology(
    settings: Settings, declare: bool
) -> None:
    """With --no-declare and no topology, the worker stops with a clear error (exit 2)."""
    worker = Worker(settings.replace(declare=declare))
    code = await asyncio.wait_for(worker.run(), 30)
    assert code == 2
