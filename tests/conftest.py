"""Fixtures against the real local PostgreSQL and RabbitMQ.

Every test gets its own database, copied from a template database migrated once per
session, and its own queue and exchange names. Fixtures drop what they created and touch
nothing else. Servers are named by ``PROMPTER_TEST_ADMIN_URL`` (a superuser connection to a
maintenance database) and ``PROMPTER_TEST_AMQP_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store.ingest import Store

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get(
    "PROMPTER_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("PROMPTER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def database_url(name: str) -> str:
    parts = urllib.parse.urlsplit(ADMIN_URL)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def admin(sql: str) -> None:
    asyncio.run(_admin(sql))


def create_database(name: str, template: str = "template0") -> str:
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}" ENCODING \'UTF8\'')
    return database_url(name)


def drop_database(name: str) -> None:
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


RUNTIME_ROLE_SQL = ROOT / "sql" / "runtime_role.sql"


def apply_runtime_role(url: str, role: str, password: str | None = None) -> None:
    """Run the shipped ``sql/runtime_role.sql`` with psql, as an operator does."""
    args = ["psql", url, "-X", "-q", "-v", f"role={role}", "-f", str(RUNTIME_ROLE_SQL)]
    if password is not None:
        args[4:4] = ["-v", f"password={password}"]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=60)


def with_user(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user`` with ``password`` instead of its own credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = f"{urllib.parse.quote(user)}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


@pytest.fixture(scope="session")
def migrated_template() -> Iterator[str]:
    """A database migrated to head once per session; tests get copies of it."""
    from worker.store import migrations

    name = unique_name("prompter_test_tpl")
    url = create_database(name)
    try:
        migrations.upgrade(url)
        yield name
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def runtime_role(migrated_template: str) -> Iterator[tuple[str, str]]:
    """The least-privilege runtime role (``sql/runtime_role.sql``), unique to this session,
    granted on the template database (so every test database copied from it has the
    grants); dropped at the end. Its (name, password)."""
    role, password = unique_name("prompter_rt"), secrets.token_urlsafe(18)
    apply_runtime_role(database_url(migrated_template), role, password)
    try:
        yield role, password
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(database_url(migrated_template))
            try:
                await conn.execute(f'DROP OWNED BY "{role}"')
            finally:
                await conn.close()
            await _admin(f'DROP ROLE IF EXISTS "{role}"')

        asyncio.run(drop())


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A fresh, empty database (no migrations) of this test's own; its URL."""
    name = unique_name("prompter_test")
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


@contextlib.contextmanager
def own_database(template: str) -> Iterator[str]:
    """A database copied from ``template``, dropped on the way out; its URL."""
    name = unique_name("prompter_test")
    url = create_database(name, template=template)
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def database(migrated_template: str) -> Iterator[str]:
    """A migrated database of this test's own; its URL."""
    with own_database(migrated_template) as url:
        yield url


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to this test's database, for setup and assertions."""
    connection = await asyncpg.connect(database)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    """The worker's own pool (orjson codecs) on this test's database."""
    from worker.store.pool import create_pool

    p = await create_pool(database, max_size=4)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def store(pool: asyncpg.Pool) -> Store:
    from worker.store.ingest import Store

    return Store(pool)


# --- RabbitMQ -----------------------------------------------------------------------------


@pytest.fixture
async def topology(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, str]]:
    """Unique exchange and queue names for this test (as Settings overrides); everything
    declared under them is deleted afterwards."""
    import aiormq

    suffix = f"{request.node.name[:40]}.{uuid.uuid4().hex[:8]}"
    names = {
        "exchange": f"test.{suffix}.events",
        "queue": f"test.{suffix}.ingest",
        "replay_queue": f"test.{suffix}.ingest.replay",
        "dead_letter_exchange": f"test.{suffix}.dlx",
        "dead_letter_queue": f"test.{suffix}.ingest.dead",
    }
    yield names
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for key in ("queue", "replay_queue", "dead_letter_queue"):
            await channel.queue_delete(names[key])
        for key in ("exchange", "dead_letter_exchange"):
            await channel.exchange_delete(names[key])
    finally:
        await connection.close()


@pytest.fixture
def settings(database: str, topology: dict[str, str], runtime_role: tuple[str, str]) -> Settings:
    """Worker settings on this test's database and names; small batches, fast retries.
    The worker logs in as the least-privilege runtime role, as in production."""
    from worker.config import Settings

    return Settings.from_env(
        {},
        database_url=with_user(database, *runtime_role),
        amqp_url=AMQP_URL,
        batch_wait_ms=20,
        retry_max_seconds=1.0,
        shutdown_timeout=20.0,
        log_format="text",
        **topology,
    )


# --- pytest-xdist: `make test` runs the suite in two processes ------------------------------
#: The fault scenarios' rows, sent by the xdist worker that ran them (tests/faults/conftest.py).
_FAULT_ROWS: list[tuple[object, ...]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault scenarios run one after the other in one process (each starts its own
    servers and loads the machine); everything else is spread over both."""
    for item in items:
        if item.get_closest_marker("faults") or item.get_closest_marker("faults_slow"):
            item.add_marker(pytest.mark.xdist_group("faults"))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    _FAULT_ROWS.extend(getattr(node, "workeroutput", {}).get("fault_results", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FAULT_ROWS:
        from tests.faults import harness

        # One worker ran them all, in order (the "faults" group).
        harness.print_table(terminalreporter, [harness.Result(*r) for r in _FAULT_ROWS])  # type: ignore[arg-type]
