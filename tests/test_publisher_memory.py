"""The memory ``publish_many`` holds: each event's JSON at its exact size, measured in a
process of its own (RSS growth over what the caller's own events take) on 100,000 events
through the real RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.conftest import AMQP_URL, ROOT

EVENTS = 100_000

# Run in a fresh interpreter: builds the events first (the caller's own memory), then
# measures the peak resident size during publish_many above that baseline (the peak is
# reset with /proc/self/clear_refs). The broker keeps almost nothing: the queues are
# classic, bounded to 100 messages, dropping the oldest, and the publisher only checks them
# (declare=False).
PROBE = """
import asyncio, gc, json, sys, uuid

import aiormq
import orjson

from tests.factories import Tenant, event_doc
from worker.amqp import broker
from worker.publisher import Publisher

AMQP_URL, PREFIX, N = sys.argv[1], sys.argv[2], int(sys.argv[3])


def kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise LookupError(field)


async def main():
    names = {
        "exchange": PREFIX + ".events",
        "queue": PREFIX + ".ingest",
        "replay_queue": PREFIX + ".ingest.replay",
        "dead_letter_exchange": PREFIX + ".dlx",
        "dead_letter_queue": PREFIX + ".ingest.dead",
    }
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel()
    try:
        for key in ("exchange", "dead_letter_exchange"):
            await channel.exchange_declare(names[key], exchange_type="topic", durable=True)
        for key in ("queue", "replay_queue", "dead_letter_queue"):
            await channel.queue_declare(
                names[key], arguments={"x-max-length": 100, "x-overflow": "drop-head"}
            )
        await channel.queue_bind(names["queue"], names["exchange"], routing_key="prompt_run.*")
        tenant = Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))
        docs = []
        for i in range(N):
            doc = event_doc(tenant)
            doc["response"]["choices"][0]["message"]["content"] = f"It ships today, {i}. " * 80
            docs.append(doc)
        body_bytes = sum(len(orjson.dumps(d)) for d in docs)
        gc.collect()
        baseline = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # the peak resident size starts again from here
        topology = broker.Topology(**names, delivery_limit=20)
        async with Publisher(AMQP_URL, topology, declare=False) as publisher:
            confirmed = await publisher.publish_many(docs)
        peak = kib("VmHWM")
    finally:
        for key in ("queue", "replay_queue", "dead_letter_queue"):
            await channel.queue_delete(names[key])
        for key in ("exchange", "dead_letter_exchange"):
            await channel.exchange_delete(names[key])
        await connection.close()
    print(json.dumps({
        "confirmed": confirmed,
        "body_bytes": body_bytes,
        "baseline_kib": baseline,
        "peak_kib": peak,
    }))


asyncio.run(main())
"""


@pytest.mark.timeout(900)
def test_publish_many_holds_each_event_at_its_exact_size() -> None:
    """publish_many of 100,000 dict events of ~2.3 KB: the process grows by about the JSON
    of the events (all validated before any is sent), not by orjson's worst-case buffers
    (~16 KB each, 1.3 GB more here before the fix). Bound: 1.5x the bodies plus 64 MiB for
    the interpreter, the window in flight and the allocator's slack."""
    prefix = f"test.publisher-memory.{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, AMQP_URL, prefix, str(EVENTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["confirmed"] == EVENTS
    growth = (result["peak_kib"] - result["baseline_kib"]) * 1024
    bodies = result["body_bytes"]
    print(f"bodies {bodies / 2**20:.0f} MiB, RSS growth {growth / 2**20:.0f} MiB")
    assert bodies > EVENTS * 2000  # the events are the size the bound is about
    assert growth < 1.5 * bodies + 64 * 2**20, (growth, bodies)
