"""The two consumers the worker is measured against, each run as its own process.

- ``bare``: an aio-pika consumer that only acks (prefetch 1000, one multiple-ack per 100):
  the cost of just receiving the messages, with no work at all.
- ``naive``: the consumer a typical user writes: aio-pika, ``message.process()`` per
  message, ``json.loads``, one transaction per message (version upsert, result insert).

Run as ``python -m bench.baselines bare|naive QUEUE N [DATABASE_URL]``; prints one JSON
line: events, seconds (first delivery to last ack), cpu_seconds (the process's user+sys
over that span), peak_rss_bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import asyncpg
import orjson
from pamqp import commands as spec

from bench.data import make_events, make_templates

AMQP_URL = os.environ.get("PROMPTER_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(n: int, started: float, cpu_start: float) -> None:
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "events": n,
                "seconds": elapsed,
                "cpu_seconds": _cpu() - cpu_start,
                "peak_rss_bytes": peak,
            }
        ),
        flush=True,
    )


async def bare(queue_name: str, n: int) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    queue = await channel.get_queue(queue_name, ensure=False)
    done = asyncio.Event()
    seen = 0
    started = cpu_start = 0.0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen, started, cpu_start
        if seen == 0:
            started, cpu_start = time.perf_counter(), _cpu()
        seen += 1
        if seen % 100 == 0 or seen == n:
            await message.ack(multiple=True)
        if seen == n:
            done.set()

    await queue.consume(on_message)
    await done.wait()
    _report(n, started, cpu_start)
    await connection.close()


UPSERT_VERSION = """
    INSERT INTO prompt_versions (org_id, workspace_id, template_id, provider, provider_version_key,
                                 model_id, fingerprint_captured_at, first_seen_at, last_seen_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
    ON CONFLICT (org_id, workspace_id, template_id, provider_version_key) DO UPDATE
    SET last_seen_at = GREATEST(prompt_versions.last_seen_at, EXCLUDED.last_seen_at),
        first_seen_at = LEAST(prompt_versions.first_seen_at, EXCLUDED.first_seen_at),
        model_id = EXCLUDED.model_id
    RETURNING id
"""
INSERT_RESULT = """
    INSERT INTO prompt_results (id, org_id, workspace_id, template_id, version_id,
                                provider_version_key, system_fingerprint, request, response,
                                analysis_config, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (id) DO NOTHING
"""


async def naive(queue_name: str, n: int, database_url: str) -> None:
    """The way a typical user writes it: one message, one transaction."""

    async def init(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, init=init)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await channel.get_queue(queue_name, ensure=False)
    done = asyncio.Event()
    seen = 0
    started = cpu_start = 0.0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen, started, cpu_start
        if seen == 0:
            started, cpu_start = time.perf_counter(), _cpu()
        async with message.process():
            event: dict[str, Any] = json.loads(message.body)
            occurred = datetime.fromisoformat(event["occurred_at"])
            async with pool.acquire() as conn, conn.transaction():
                version_id = await conn.fetchval(
                    UPSERT_VERSION,
                    event["org_id"],
                    event["workspace_id"],
                    event["template_id"],
                    event["provider"],
                    event["provider_version_key"],
                    event["model_id"],
                    None,
                    occurred,
                )
                await conn.execute(
                    INSERT_RESULT,
                    event["event_id"],
                    event["org_id"],
                    event["workspace_id"],
                    event["template_id"],
                    version_id,
                    event["provider_version_key"],
                    event.get("system_fingerprint"),
                    event["request"],
                    event["response"],
                    event.get("analysis_config"),
                    occurred,
                )
        seen += 1
        if seen == n:
            done.set()

    await queue.consume(on_message)
    await done.wait()
    _report(n, started, cpu_start)
    await connection.close()
    await pool.close()


async def pace(exchange: str, rate: int, seconds: float) -> None:
    """Publish at a steady ``rate``, each event stamped ``occurred_at`` = the moment it is
    handed to the connection; report how far behind schedule the publisher ever fell."""
    docs = [orjson.loads(b) for b in make_events(1000, make_templates())]
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    props = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
    total = int(rate * seconds)
    start = time.perf_counter()
    pending: set[asyncio.Future[Any]] = set()
    worst = 0.0
    for i in range(total):
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            worst = max(worst, now - due)
        doc = dict(docs[i % len(docs)])
        doc["event_id"] = str(uuid.uuid4())
        doc["occurred_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        publish = channel.basic_publish(
            orjson.dumps(doc),
            exchange=exchange,
            routing_key="prompt_run.v1",
            properties=props,
            wait=False,
        )
        task = asyncio.ensure_future(publish)
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    print(json.dumps({"events": total, "seconds": elapsed, "worst_lag_seconds": worst}), flush=True)
    await connection.close()


def main() -> None:
    kind = sys.argv[1]
    if kind == "pace":
        asyncio.run(pace(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        return
    queue, n = sys.argv[2], int(sys.argv[3])
    if kind == "bare":
        asyncio.run(bare(queue, n))
    elif kind == "naive":
        asyncio.run(naive(queue, n, sys.argv[4]))
    else:
        raise SystemExit(f"unknown baseline {kind!r}")


if __name__ == "__main__":
    main()
