"""The fault suite's session: private servers, a migrated template database, the data set.

If the private servers cannot start, the suite fails with the reason when ``CI=true`` (a
fault suite that silently runs nothing proves nothing) and is skipped with the reason
elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import secrets
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bench.data import Template, make_events, make_templates, register_templates
from tests.conftest import apply_runtime_role
from tests.faults import harness
from tests.faults.harness import (
    EVENTS_PER_SCENARIO,
    POISON_PER_SCENARIO,
    Message,
    Scenario,
    good_messages,
    interleave,
    poison_messages,
)
from tests.faults.servers import (
    Certificates,
    PrivatePostgres,
    PrivateRabbit,
    ServerError,
    free_port,
)

TEMPLATE_DATABASE = "faults_template"


@dataclass(frozen=True)
class Servers:
    pg: PrivatePostgres
    mq: PrivateRabbit
    certs: Certificates
    base: Path
    logs: Path
    role: tuple[str, str]
    templates: list[Template]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the fault suite's private servers did not start: {reason}", pytrace=False)
    pytest.skip(f"the fault suite's private servers did not start: {reason}")


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    """A private PostgreSQL cluster and RabbitMQ node, on free 127.0.0.1 ports, torn down
    at the end; a migrated template database with the data set's templates and the
    least-privilege runtime role. Worker logs are kept (and named) if a test failed."""
    base = Path(tempfile.mkdtemp(prefix="prompter-faults-"))
    logs = Path(tempfile.mkdtemp(prefix="prompter-faults-logs-"))
    base.chmod(0o755)
    pg: PrivatePostgres | None = None
    mq: PrivateRabbit | None = None
    try:
        try:
            certs = Certificates.make(base / "certs")
            for path in (base / "certs").iterdir():
                path.chmod(0o644)
            pg = PrivatePostgres(base / "pg", free_port(), certs)
            pg.start()
            mq = PrivateRabbit(base / "mq", free_port(), free_port(), free_port(), certs)
            mq.start()
        except (ServerError, OSError, LookupError) as exc:
            _unavailable(str(exc))
        assert pg is not None
        assert mq is not None
        role = (f"prompter_faults_rt_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(18))
        templates = make_templates(seed=7)
        asyncio.run(_template_database(pg, role, templates))
        yield Servers(pg, mq, certs, base, logs, role, templates)
    finally:
        if mq is not None:
            mq.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)
        if request.session.testsfailed:
            print(f"\nfault suite: worker logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)


async def _template_database(
    pg: PrivatePostgres, role: tuple[str, str], templates: list[Template]
) -> None:
    from worker.store import migrations

    await pg.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
    url = pg.url(TEMPLATE_DATABASE)
    await asyncio.to_thread(migrations.upgrade, url)
    await asyncio.to_thread(apply_runtime_role, url, role[0], role[1])
    conn = await asyncpg.connect(url)
    try:
        await register_templates(conn, templates)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def good_stream(servers: Servers) -> list[Message]:
    """The data set's good events (about 2 KB each), the same for every scenario."""
    return good_messages(make_events(EVENTS_PER_SCENARIO, servers.templates, seed=11))


ScenarioFactory = Callable[..., Awaitable[Scenario]]


@pytest.fixture
async def scenario(servers: Servers, good_stream: list[Message]) -> AsyncIterator[ScenarioFactory]:
    """Make this test's scenario: its own database (a copy of the template), its own queue
    names, the stream of good events with poison interleaved; workers left running are
    killed at the end, and the database is dropped."""
    made: list[Scenario] = []

    async def make(name: str, *, messages: list[Message] | None = None, seed: int = 1) -> Scenario:
        rng = random.Random(f"{name}-{seed}")
        database = f"faults_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        stream = messages or interleave(
            good_stream, poison_messages(servers.templates, rng, POISON_PER_SCENARIO), rng
        )
        s = Scenario(
            name=name,
            pg=servers.pg,
            mq=servers.mq,
            database=database,
            role=servers.role,
            messages=stream,
            logs=servers.logs,
        )
        made.append(s)
        await servers.pg.execute(f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE_DATABASE}"')
        return s

    yield make
    for s in made:
        for w in s.workers:
            if w.alive:
                await w.kill()
        await servers.pg.execute(f'DROP DATABASE IF EXISTS "{s.database}" WITH (FORCE)')
        await _delete_queues(s)


async def _delete_queues(s: Scenario) -> None:
    import aiormq

    try:
        connection = await aiormq.connect(s.mq.amqp_url)
    except Exception:
        return
    try:
        channel = await connection.channel()
        for key in ("queue", "replay_queue", "dead_letter_queue"):
            await channel.queue_delete(s.names[key])
        for key in ("exchange", "dead_letter_exchange"):
            await channel.exchange_delete(s.names[key])
    finally:
        await connection.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist (`make test` runs two processes) the scenarios run in a worker
    process: their rows travel to the controller, which prints the table
    (``tests/conftest.py``)."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["fault_results"] = [dataclasses.astuple(r) for r in harness.RESULTS]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's table: one line per scenario (a run without pytest-xdist)."""
    if harness.RESULTS:
        harness.print_table(terminalreporter, harness.RESULTS)
