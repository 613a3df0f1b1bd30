"""The worker under infrastructure faults (issue 19): a misbehaving broker at connect time,
a database outage while the broker connection flaps, a metrics endpoint that cannot be
served, a stop while the database does not answer."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time

import asyncpg
import pytest

from tests.conftest import ADMIN_URL, ROOT
from tests.factories import encode, event_doc, make_tenant
from tests.helpers import (
    close_connections_named,
    count,
    publish,
    queue_depth,
    running,
    sample,
    wait_until,
)
from tests.test_backfill_cli import environment
from tests.test_publisher_faults import Server, run_on
from worker.config import Settings
from worker.ingest.worker import Worker


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("mode", ["close", "eof", "garbage", "bad-frame", "hang"])
def test_a_misbehaving_broker_never_stops_the_worker(
    settings: Settings, loop: str, mode: str
) -> None:
    """(case 2) A node that accepts TCP and then closes, ends the stream, answers garbage or
    never answers: the worker keeps retrying (readiness false, naming the broker) and stops
    cleanly when asked, on either event loop."""

    async def scenario(url: str) -> tuple[bool, dict[str, str], int]:
        worker = Worker(settings.replace(amqp_url=url))
        task = asyncio.create_task(worker.run())

        async def tried() -> bool:
            return "broker" in worker.health.problems or task.done()

        await wait_until(tried, within=30, message="a failed connection attempt")
        await asyncio.sleep(1.5)  # more attempts: still running
        alive = not task.done()
        problems = dict(worker.health.problems)
        worker.stop()
        return alive, problems, await asyncio.wait_for(task, 30)

    with Server(mode) as server:
        alive, problems, code = run_on(loop, scenario(server.url))
    assert alive
    assert "s3cret-pw" not in problems["broker"]
    assert code == 0


async def _rows(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


async def test_a_database_outage_with_a_flapping_broker_dead_letters_nothing(
    settings: Settings, conn: asyncpg.Connection, runtime_role: tuple[str, str]
) -> None:
    """(case 1) The database refuses the worker while it holds deliveries, and the broker
    connection is closed five times, more than the delivery limit (3): nothing is
    dead-lettered; once the database is back every event is stored once."""
    role = runtime_role[0]
    t = await make_tenant(conn)
    name = "test-outage-flapping"
    worker = Worker(settings.replace(delivery_limit=3, retry_max_seconds=0.5), name=name)
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        async with running(worker):
            await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            await publish([encode(event_doc(t)) for _ in range(300)], settings.exchange)

            async def down() -> bool:
                return not worker.health.database_ok

            await wait_until(down, within=30, message="the database down")
            for _ in range(5):
                await asyncio.to_thread(close_connections_named, f"{name}-consumer")
                await asyncio.sleep(1.5)
            assert await count(conn) == 0
            held_back = worker.health.consumers == 0  # nothing taken while it is down
            await admin.execute(f'ALTER ROLE "{role}" LOGIN')
            await wait_until(lambda: _rows(conn, 300), within=60, message="every event stored")
            await wait_until(lambda: _ready(worker), message="consuming again")
    finally:
        await admin.execute(f'ALTER ROLE "{role}" LOGIN')
        await admin.close()
    assert await queue_depth(settings.dead_letter_queue) == 0
    assert await count(conn) == 300
    assert await queue_depth(settings.queue) == 0
    assert held_back
    assert sample(worker, "prompter_reconnects_total", server="broker") >= 5


async def _ready(worker: Worker) -> bool:
    return worker.health.ready


async def _start(settings: Settings, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        *args,
        cwd=ROOT,
        env=environment(settings, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("where", ["port in use", "unknown host"])
async def test_a_metrics_endpoint_that_cannot_be_served_is_a_configuration_error(
    settings: Settings, where: str
) -> None:
    """(case 7) A metrics port already in use, or a host that does not resolve: exit 2 with
    one line naming the setting, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = "127.0.0.1" if where == "port in use" else "no-such-host.invalid"
        process = await _start(
            settings, PROMPTER_METRICS_PORT=str(port), PROMPTER_METRICS_HOST=host
        )
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2, err
    text = err.decode()
    assert "PROMPTER_METRICS_PORT" in text
    assert "Traceback" not in text


async def test_a_stop_interrupts_a_database_that_does_not_answer(settings: Settings) -> None:
    """(case 7) The database accepts TCP and never answers: SIGINT stops the worker at once
    (exit 0), not after the 10 s connection timeout."""
    with Server("hang") as server:
        url = f"postgresql://u:p@127.0.0.1:{server.port}/db"
        process = await _start(settings, DATABASE_URL=url)
        assert process.stderr is not None
        await asyncio.wait_for(process.stderr.readline(), timeout=30)  # "starting"

        async def connecting() -> bool:
            return server.accepted >= 1

        await wait_until(connecting, within=30, message="the worker connecting")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), timeout=30)
        took = time.monotonic() - started
    assert process.returncode == 0
    assert took < 5


async def test_the_database_returning_while_reading_is_paused_resumes_without_a_reconnect(
    settings: Settings, conn: asyncpg.Connection, runtime_role: tuple[str, str]
) -> None:
    """The worker holds its whole byte budget (reading paused) when the database goes away,
    and its consumers are cancelled; when the database answers again, consuming resumes
    without waiting for a broker reply that sits behind the paused deliveries: every event
    is stored, the connection is never dropped."""
    role = runtime_role[0]
    t = await make_tenant(conn)
    small = settings.replace(
        max_held_bytes=2 * 1_048_576,
        max_event_bytes=512 * 1024,
        batch_max_bytes=1_048_576,
        retry_max_seconds=0.5,
        db_pool_size=1,  # one batch in flight: nothing else frees bytes meanwhile
    )
    worker = Worker(small)
    pad = "x" * 300_000
    bodies = [encode(event_doc(t, request={"pad": pad})) for _ in range(40)]
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        async with running(worker):
            # The first batch waits on a lock while the rest fill the budget; then the
            # database goes away under it. (Taking the database away first raced with the
            # publishing: on a loaded machine the worker saw the outage and cancelled its
            # consumers before the budget was full.)
            held = conn.transaction()
            await held.start()
            await conn.execute("LOCK TABLE prompt_results IN ACCESS EXCLUSIVE MODE")
            try:
                await publish(bodies, settings.exchange)

                async def full() -> bool:
                    return worker.dispatcher.full

                await wait_until(full, within=30, message="the budget held")
                await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    role,
                )
            finally:
                await held.rollback()

            async def full_and_down() -> bool:
                return worker.dispatcher.full and not worker.health.database_ok

            await wait_until(full_and_down, within=30, message="the budget held, the database down")
            await admin.execute(f'ALTER ROLE "{role}" LOGIN')
            await wait_until(lambda: _rows(conn, 40), within=60, message="every event stored")
    finally:
        await admin.execute(f'ALTER ROLE "{role}" LOGIN')
        await admin.close()
    assert sample(worker, "prompter_reconnects_total", server="broker") == 0
    assert await queue_depth(settings.dead_letter_queue) == 0
