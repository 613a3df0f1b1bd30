"""Fault scenarios of issues 14 and 19: a backlog of large events with a SIGKILL mid-stream,
and a database outage while the broker connection flaps and the worker restarts. Each ends
in the total-queue check of harness.py (every confirmed event stored exactly once, the
dead-letter queue exactly the poison)."""

from __future__ import annotations

import asyncio
import base64
import random
import uuid

import orjson
import pytest

from tests.faults.conftest import ScenarioFactory
from tests.faults.harness import Message, declare, good_messages, interleave

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

MIB = 1_048_576


def large(body: bytes, size: int, rng: random.Random) -> bytes:
    """``body`` (an event) grown to about ``size`` bytes with text that does not compress."""
    doc = orjson.loads(body)
    doc["request"]["documents"] = [base64.b64encode(rng.randbytes(size * 3 // 4)).decode()]
    return orjson.dumps(doc)


async def test_large_events(scenario: ScenarioFactory) -> None:
    """A backlog of 300 events of mixed sizes up to 15 MiB (median 64 KiB, about 250 MiB in
    all) and the poison, one of 17 MiB (over the 16 MiB event limit, copied to the
    dead-letter queue whole), with default memory settings; the worker is SIGKILLed
    mid-stream and restarted: nothing lost, nothing twice."""
    s = await scenario("large-events")
    rng = random.Random(1400)
    base = [m for m in s.messages if m.good][:300]
    sizes = [15 * MIB, 8 * MIB] + [
        max(2048, min(int(rng.lognormvariate(11.1, 1.6)), 15 * MIB)) for _ in base[2:]
    ]
    good = good_messages(large(m.body, n, rng) for m, n in zip(base, sizes, strict=True))
    poison = [m for m in s.messages if not m.good and len(m.body) < 60_000]
    too_large = Message(
        f"poison-too-large-{uuid.uuid4().hex[:8]}",
        large(base[0].body, 17 * MIB, rng),
        False,
    )
    s.messages = interleave(good, [*poison, too_large], rng)
    defaults = {"max_event_bytes": 16 * MIB, "prefetch": 2000, "batch_size": 500}
    await declare(s)
    w = await s.worker(**defaults).start()
    await w.ready()
    publisher = s.publisher(window=16)
    publishing = asyncio.create_task(publisher.publish(s.messages))
    await s.wait_rows(60, within=180)
    await w.kill()
    await (await s.worker(**defaults).start()).ready()
    await publishing
    result = await s.account(publisher, consumers=1)
    assert result.stored == 300
    await s.stop_workers()


async def test_database_outage_with_a_flapping_broker(scenario: ScenarioFactory) -> None:
    """The database stops while events flow; meanwhile the broker closes every connection
    six times (twice the delivery limit of 3) and the worker is SIGKILLed and started again;
    then the database comes back: not one valid event dead-lettered, none lost or twice."""
    s = await scenario("outage-flapping")
    limit = {"delivery_limit": 3}
    await declare(s, **limit)
    w = await s.worker(**limit).start()
    await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=4000))
    await s.wait_rows(3000)
    await asyncio.to_thread(s.pg.pg_ctl, "stop", "-m", "fast")
    try:
        for k in range(6):
            await asyncio.sleep(1.5)
            await asyncio.to_thread(s.mq.close_all_connections)
            if k == 2:
                await w.kill()
                w = await s.worker(**limit).start()
        await publishing
    finally:
        await asyncio.to_thread(s.pg.pg_ctl, "start")
    await w.ready(within=120)
    await s.account(publisher, consumers=1)
    await s.stop_workers()
