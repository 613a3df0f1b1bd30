"""Fault scenarios: real ``prompter-worker run`` processes on private servers, a stream of
20,000 confirmed events (with poison among them), one kind of fault each, then the
total-queue check of harness.py. Each prints its line; the suite prints the table."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.factories import snapshot
from tests.faults.conftest import ScenarioFactory
from tests.faults.crashing_worker import EXIT_CODE, MARKER
from tests.faults.harness import (
    ConfirmedPublisher,
    Message,
    Scenario,
    WorkerProcess,
    declare,
    grep,
    wait_for,
)
from tests.faults.proxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def _worker_backends(s: Scenario, *, waiting: bool = False) -> int:
    conn = await s.connect()
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'prompter-worker'"
                + (" AND wait_event_type = 'Lock'" if waiting else "")
            )
        )
    finally:
        await conn.close()


async def _dead_ready(s: Scenario) -> int:
    return (await asyncio.to_thread(s.queues))[2][0]


# --- 1. SIGKILL at chosen points ----------------------------------------------------------


async def test_sigkill_before_commit(scenario: ScenarioFactory) -> None:
    """SIGKILL while the worker's batch waits inside its statement (a table lock holds it):
    the server rolls the batch back, nothing of it is committed; the restarted worker
    stores everything once."""
    s = await scenario("sigkill-before-commit")
    await declare(s)
    w = await s.worker().start()
    await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=8000))
    await s.wait_rows(3000)
    locker = await s.connect()
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE prompt_results IN SHARE MODE")

            async def waiting() -> bool:
                return await _worker_backends(s, waiting=True) > 0

            async def gone() -> bool:
                return await _worker_backends(s) == 0

            await wait_for(waiting, message="a batch waiting on the lock")
            before = await locker.fetchval("SELECT count(*) FROM prompt_results")
            await w.kill()
            await wait_for(gone, message="the killed worker's sessions gone")
        assert await s.rows() == before, "the killed batch committed nothing"
    finally:
        await locker.close()
    await (await s.worker().start()).ready()
    await publishing
    await s.account(publisher, consumers=1)
    await s.stop_workers()


@dataclass
class _Killed:
    committed: int  # rows committed when the worker was killed
    proxy: FaultProxy
    publisher: ConfirmedPublisher
    publishing: asyncio.Task[None]


async def _sigkill_before_acks(s: Scenario, *, wait_dead_letters: int) -> _Killed:
    """Run a worker whose acknowledgements the proxy swallows; SIGKILL it once it has
    committed rows (and confirmed ``wait_dead_letters`` dead-letter copies) that the broker
    still counts unacked; start its successor."""
    await declare(s)
    proxy = await FaultProxy(s.mq.port, amqp=True).start()
    proxy.drop_acks = True
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    w = await s.worker(amqp_url=url).start()
    await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=8000))
    await s.wait_rows(1500)

    async def dead_enough() -> bool:
        return await _dead_ready(s) >= wait_dead_letters

    await wait_for(dead_enough, message="dead-letter copies confirmed")
    assert proxy.stats.acks_dropped > 0
    await w.kill()
    committed = await s.rows()
    proxy.drop_acks = False
    await (await s.worker(amqp_url=url).start()).ready()
    return _Killed(committed, proxy, publisher, publishing)


async def test_sigkill_after_commit_before_ack(scenario: ScenarioFactory) -> None:
    """SIGKILL after batches committed but before their acks reached the broker: every
    one of them is redelivered to the restarted worker, counted as a duplicate, stored
    once."""
    s = await scenario("sigkill-after-commit")
    k = await _sigkill_before_acks(s, wait_dead_letters=0)
    try:
        await k.publishing
        await s.settled(consumers=1)
        duplicates = await s.workers[-1].metric("prompter_events_duplicate_total")
        await s.account(k.publisher, consumers=1)
        assert k.committed >= 1500
        assert duplicates >= k.committed
        assert k.proxy.stats.redelivered >= k.committed
    finally:
        await k.proxy.close()
    await s.stop_workers()


async def test_sigkill_while_dead_lettering(scenario: ScenarioFactory) -> None:
    """SIGKILL after poison messages were copied to the dead-letter queue (confirmed) but
    before their acks reached the broker: redelivered, dead-lettered again; the dead-letter
    queue holds each poison message (at least once), and nothing else."""
    s = await scenario("sigkill-dead-lettering")
    k = await _sigkill_before_acks(s, wait_dead_letters=4)
    try:
        await k.publishing
        result = await s.account(k.publisher, consumers=1)
        assert result.dead_copies > result.dead_lettered  # the window was really hit
    finally:
        await k.proxy.close()
    await s.stop_workers()


# --- 2. SIGTERM ---------------------------------------------------------------------------


async def test_sigterm_mid_stream_redelivers_nothing(scenario: ScenarioFactory) -> None:
    """SIGTERM while events stream in: the worker writes and acks what it holds and exits
    0; its successor is never handed a redelivery; every event is stored once."""
    s = await scenario("sigterm")
    await declare(s)
    proxy = await FaultProxy(s.mq.port, amqp=True).start()
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        first = await s.worker(amqp_url=url).start()
        await first.ready()
        publisher = s.publisher()
        publishing = asyncio.create_task(publisher.publish(s.messages, rate=6000))
        await s.wait_rows(5000)
        first.signal(signal.SIGTERM)
        assert await first.wait(60) == 0, first.tail()

        async def nothing_unacked() -> bool:
            _, unacked, _ = (await asyncio.to_thread(s.queues))[0]
            return unacked == 0

        # A quorum queue applies acks through its log: right after the exit it may still
        # count the last ones (one CI run saw 44). Whether they were really acked before
        # the exit is what the proxy's count of deliveries proves below: an unacked one
        # would be handed to the successor again.
        await wait_for(nothing_unacked, within=10, message="the first worker's acks applied")
        await (await s.worker(amqp_url=url).start()).ready()
        await publishing
        await s.account(publisher, consumers=1)
        stats = proxy.stats
        print(f"sigterm: {stats.deliveries} deliveries, {stats.redelivered} flagged redelivered")
        assert stats.deliveries == len(s.messages)
        assert set(stats.by_message_id) == {m.id for m in s.messages}
        assert stats.delivered_again == 0
    finally:
        await proxy.close()
    await s.stop_workers()


# --- 3. the broker ------------------------------------------------------------------------


async def test_broker_connections_closed_and_broker_restarted(scenario: ScenarioFactory) -> None:
    """`rabbitmqctl close_all_connections` twice and `stop_app`/`start_app` once while the
    stream is being published: the worker and the publisher reconnect; every confirmed
    event is stored once."""
    s = await scenario("broker")
    await declare(s)
    w = await s.worker().start()
    await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=3000))
    faults = (s.mq.close_all_connections, s.mq.close_all_connections, s.mq.restart_app)
    for k, (fault, confirmed) in enumerate(zip(faults, (3000, 8000, 13000), strict=True)):
        await wait_for(lambda n=confirmed: _confirmed(publisher, n), message=f"{confirmed} sent")
        # The publisher holds its stream (connection open, events still to send) while
        # rabbitmqctl acts, which takes seconds on a loaded machine: without the hold it
        # could finish the stream first and have nothing to reconnect for.
        publisher.going.clear()
        await asyncio.to_thread(fault)
        await wait_for(
            lambda k=k: _has_count(w.log, "reconnected to the broker", k + 1),
            message="the worker reconnected",
        )
        publisher.going.set()
    await publishing
    await s.account(publisher, consumers=1)
    assert publisher.reconnects >= len(faults)
    await s.stop_workers()


async def _confirmed(publisher: ConfirmedPublisher, n: int) -> bool:
    return len(publisher.confirmed) >= n


async def _has_count(path: Path, pattern: str, n: int) -> bool:
    return len(grep(path, pattern)) >= n


# --- 4. PostgreSQL ------------------------------------------------------------------------


async def test_postgres_backends_killed_and_server_restarted(scenario: ScenarioFactory) -> None:
    """pg_terminate_backend on the worker's sessions three times, then `pg_ctl restart -m
    fast`, mid-stream: retried, nothing dead-lettered but the poison, nothing lost."""
    s = await scenario("postgres")
    await declare(s)
    w = await s.worker().start()
    await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=4000))
    killed = 0
    for rows in (2000, 4000, 6000):
        await s.wait_rows(rows)
        killed += await s.pg.terminate(s.database, "prompter-worker")
    await s.wait_rows(9000)
    await asyncio.to_thread(s.pg.restart_fast)
    await publishing
    await s.account(publisher, consumers=1)
    assert killed >= 3
    assert grep(w.log, "database unavailable, retrying")
    await s.stop_workers()


# --- 5. locks and migrations --------------------------------------------------------------


async def test_table_lock_and_migration_under_load(scenario: ScenarioFactory) -> None:
    """A table locked far longer than the batch wait (the worker's lock_timeout fires:
    retried with backoff), then a migration applied under load that changes the type of a
    column the worker's prepared statements return (their cached plans are invalidated:
    retried, re-prepared), later events bringing new version keys: nothing dead-lettered
    but the poison, nothing lost."""
    s = await scenario("lock-and-migration")
    for i in range(len(s.messages) - 6000, len(s.messages)):
        m = s.messages[i]
        if m.good:
            doc = orjson.loads(m.body)
            doc["provider_version_key"] += "-after-migration"
            s.messages[i] = Message(m.id, orjson.dumps(doc), True, m.expect)
    role = s.role[0]
    await s.pg.execute(
        f'ALTER ROLE "{role}" IN DATABASE "{s.database}" SET lock_timeout = \'200ms\''
    )
    await declare(s)
    w = await s.worker().start()
    await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=4000))
    await s.wait_rows(3000)
    locker = await s.connect()
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE prompt_versions IN EXCLUSIVE MODE")
            await wait_for(
                lambda: _has(w.log, "55P03"), message="the worker's lock timeout, retried"
            )
            await asyncio.sleep(1.0)  # the fault: keep the lock through several retries
    finally:
        await locker.close()
    await s.wait_rows(8000)
    conn = await s.connect()
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE prompt_results ADD COLUMN fault_note text")
            await conn.execute(
                "ALTER TABLE prompt_versions ALTER COLUMN provider_version_key TYPE varchar(512)"
            )
        await conn.execute(
            "CREATE INDEX ix_fault_fingerprint ON prompt_results (system_fingerprint)"
        )
    finally:
        await conn.close()
    await publishing
    await s.account(publisher, consumers=1)
    assert grep(w.log, "55P03")
    assert grep(w.log, "0A000")  # InvalidCachedStatementError, retried
    await s.stop_workers()


async def _has(path: Path, pattern: str) -> bool:
    return bool(grep(path, pattern))


# --- 6. the network -----------------------------------------------------------------------


async def test_network_latency_blackhole_and_reset(scenario: ScenarioFactory) -> None:
    """Through fault-injecting proxies: 20 ms of latency each way, a broker path
    black-holed past the heartbeat (the worker notices and reconnects), a database path
    black-holed for 2 s (a stall), then every connection reset: nothing lost or doubled."""
    s = await scenario("network")
    await declare(s)
    mq_proxy = await FaultProxy(s.mq.port).start()
    pg_proxy = await FaultProxy(s.pg.port).start()
    try:
        w = await s.worker(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{mq_proxy.port}/?heartbeat=2",
            database_url=s.worker_database_url.replace(f":{s.pg.port}/", f":{pg_proxy.port}/"),
        ).start()
        await w.ready()
        publisher = s.publisher()
        publishing = asyncio.create_task(publisher.publish(s.messages, rate=4000))
        await s.wait_rows(2000)
        mq_proxy.latency = pg_proxy.latency = 0.02
        await s.wait_rows(5000)
        mq_proxy.latency = pg_proxy.latency = 0.0

        mq_proxy.blackhole()
        await wait_for(lambda: _not_ready(w), within=30, message="the worker to notice")
        mq_proxy.reset()
        mq_proxy.restore()
        await w.ready()

        await s.wait_rows(9000)
        pg_proxy.blackhole()
        await asyncio.sleep(2.0)  # the fault: a two-second stall of every database session
        pg_proxy.restore()

        await s.wait_rows(12000)
        assert pg_proxy.reset() > 0
        await s.wait_rows(14000)
        assert mq_proxy.reset() > 0
        await w.ready()
        await publishing
        await s.account(publisher, consumers=1)
        assert len(grep(w.log, "reconnected to the broker")) >= 2
    finally:
        await mq_proxy.close()
        await pg_proxy.close()
    await s.stop_workers()


async def _not_ready(w: WorkerProcess) -> bool:
    return await asyncio.to_thread(w._get, "/readyz") is None


# --- 7. a message that kills the worker ---------------------------------------------------


async def test_message_that_crashes_the_worker_every_time(scenario: ScenarioFactory) -> None:
    """Three messages that kill the worker process whenever it decodes them, among 20,000:
    a supervisor restarts it each time; after the delivery limit the broker dead-letters
    each; every innocent event, including those in the same prefetch window, is stored."""
    rng = random.Random(7)
    base = await scenario("crash-every-time")
    messages = list(base.messages)
    for i, at in enumerate((50, 7000, 14000)):
        doc = orjson.loads(messages[at if messages[at].good else at + 1].body)
        doc.update(event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        doc["request"] = {"note": MARKER.decode()}
        messages.insert(at, Message(f"crasher-{i}", orjson.dumps(doc), False))
    base.messages[:] = messages
    s = base
    limit = 3
    await declare(s, delivery_limit=limit)
    w = s.worker(argv=["-m", "tests.faults.crashing_worker"], delivery_limit=limit, prefetch=500)
    await w.start()
    await w.ready()
    crashes = 0
    stop = asyncio.Event()

    async def supervise() -> None:
        nonlocal crashes
        while not stop.is_set():
            assert w.proc is not None
            code = await w.proc.wait()
            if stop.is_set():
                return
            assert code == EXIT_CODE, w.tail()
            crashes += 1
            await w.start()

    supervisor = asyncio.create_task(supervise())
    publisher = s.publisher()
    await publisher.publish(s.messages, rate=8000)

    async def all_dead() -> bool:
        # Counted in crashes, not only in dead-letter copies: a poison message whose copy
        # was confirmed but whose ack died with the process is dead-lettered again, so the
        # copies can reach the poison's count while a crasher is still to come.
        poison = len([m for m in s.messages if not m.good])
        return crashes >= 3 * limit and await _dead_ready(s) >= poison

    await wait_for(all_dead, within=180, message="every crasher dead-lettered")
    # The supervisor keeps restarting the worker until the queues are settled: a crash
    # the check did not foresee is then a worker restarted, not a consumer gone for good.
    result = await s.account(publisher, consumers=1)
    stop.set()
    supervisor.cancel()
    assert crashes >= 3 * limit
    dead = [line for line in grep(w.log, "event rejected") if "crasher" in line]
    assert dead == []  # the broker dead-lettered them, the worker never could
    assert result.stored == len({m.id for m in s.messages if m.good})
    await s.stop_workers()


# --- 8. three workers, one killed repeatedly ----------------------------------------------


async def test_three_workers_one_killed_repeatedly(scenario: ScenarioFactory) -> None:
    """Three workers on one queue, one SIGKILLed and restarted four times, every version
    key shared between them and 2,000 events published twice: no deadlock, every event
    stored once, and both tables equal those of a serial single-worker run."""
    rng = random.Random(8)
    s = await scenario("three-workers")
    good = [m for m in s.messages if m.good]
    for m in rng.sample(good, 2000):
        s.messages.insert(rng.randrange(len(s.messages) // 2, len(s.messages)), m)
    await declare(s)
    workers = [await s.worker().start() for _ in range(3)]
    for w in workers:
        await w.ready()
    publisher = s.publisher()
    publishing = asyncio.create_task(publisher.publish(s.messages, rate=5000))
    victim = workers[2]
    for k in range(4):
        await s.wait_rows(3000 * (k + 1))
        await victim.kill()
        await victim.start()
        await victim.ready()
    await publishing
    await s.account(publisher, consumers=3)
    for w in s.workers:
        assert grep(w.log, "40P01|deadlock") == [], w.log.name
    assert victim.starts == 5

    serial = await scenario("three-workers-serial", messages=s.messages)
    await declare(serial)
    await (await serial.worker().start()).ready()
    serial_publisher = serial.publisher()
    await serial_publisher.publish(serial.messages)
    await serial.account(serial_publisher, consumers=1)
    a, b = await s.connect(), await serial.connect()
    try:
        assert await snapshot(a) == await snapshot(b)
    finally:
        await a.close()
        await b.close()
    await s.stop_workers()
    await serial.stop_workers()
