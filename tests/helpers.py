"""Helpers for tests that cross RabbitMQ: publishing, inspecting queues, running a worker."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiormq
import asyncpg
from pamqp import commands as spec

from tests.conftest import AMQP_URL, ROOT
from worker.ingest.worker import Worker


def run_cli(
    *args: str, env: Mapping[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m worker ARGS`` from the project's root, as a user runs it; its output."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, within: float = 30, message: str = ""
) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for: {message or predicate}")
        await asyncio.sleep(0.05)


async def publish(
    bodies: Sequence[bytes],
    exchange: str,
    *,
    routing_key: str = "prompt_run.v1",
    properties: spec.Basic.Properties | None = None,
) -> None:
    """Publish persistent messages with confirms (as a well-behaved service does)."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await asyncio.gather(
            *(
                channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties
                    or spec.Basic.Properties(delivery_mode=2, content_type="application/json"),
                )
                for body in bodies
            )
        )
    finally:
        await connection.close()


async def queue_depth(queue: str) -> int:
    """Messages ready in ``queue`` (unacked ones are not counted until returned)."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


async def drain(queue: str, amqp_url: str = AMQP_URL) -> list[aiormq.abc.DeliveredMessage]:
    """Take every ready message out of ``queue``."""
    connection = await aiormq.connect(amqp_url)
    out = []
    try:
        channel = await connection.channel()
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                return out
            out.append(message)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[int]]:
    """Run ``worker`` in this event loop; wait until it consumes; stop it on the way out."""
    task = asyncio.create_task(worker.run())

    async def consuming() -> bool:
        if task.done():
            task.result()  # raise what killed it
        return worker.health.ready

    await wait_until(consuming, within=30, message="the worker to be ready")
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=60)


async def count(conn: asyncpg.Connection, sql: str = "SELECT count(*) FROM prompt_results") -> int:
    value = await conn.fetchval(sql)
    return int(value)


def rabbitmqctl(*args: str) -> str:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


def close_connections_named(name: str) -> int:
    """Close the broker connections whose client-given name is ``name``; how many."""
    closed = 0
    for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        if f'{{"connection_name","{name}"}}' in line:
            pid = line.split("\t", 1)[0]
            rabbitmqctl("close_connection", pid, "test: closing the worker's connection")
            closed += 1
    return closed


def header(message: aiormq.abc.DeliveredMessage, name: str) -> Any:
    headers = message.header.properties.headers or {}
    value = headers.get(name)
    return value.decode() if isinstance(value, bytes) else value


def sample(worker: Worker, name: str, **labels: str) -> float:
    """The current value of one of the worker's metrics (0 if never set)."""
    value = worker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
