"""End-to-end measurements against the local servers: pre-filled queues drained by the
bare consumer, the naive consumer and ``prompter-worker run``; latency at a steady rate;
peak RSS on a large backlog.

Every run gets its own topology names and its own scratch database; all are removed after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
import asyncpg
from pamqp import commands as spec

from bench.harness import AMQP_URL
from worker import broker

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Names:
    exchange: str
    queue: str
    replay_queue: str
    dead_letter_exchange: str
    dead_letter_queue: str

    @classmethod
    def fresh(cls) -> Names:
        s = uuid.uuid4().hex[:8]
        return cls(
            f"bench.{s}.events",
            f"bench.{s}.ingest",
            f"bench.{s}.ingest.replay",
            f"bench.{s}.dlx",
            f"bench.{s}.ingest.dead",
        )

    def topology(self) -> broker.Topology:
        return broker.Topology(
            exchange=self.exchange,
            queue=self.queue,
            replay_queue=self.replay_queue,
            dead_letter_exchange=self.dead_letter_exchange,
            dead_letter_queue=self.dead_letter_queue,
            delivery_limit=20,
        )

    def env(self) -> dict[str, str]:
        return {
            "PROMPTER_EXCHANGE": self.exchange,
            "PROMPTER_QUEUE": self.queue,
            "PROMPTER_REPLAY_QUEUE": self.replay_queue,
            "PROMPTER_DEAD_LETTER_EXCHANGE": self.dead_letter_exchange,
            "PROMPTER_DEAD_LETTER_QUEUE": self.dead_letter_queue,
        }


@contextlib.asynccontextmanager
async def topology() -> AsyncIterator[Names]:
    """Fresh names, declared; deleted afterwards."""
    names = Names.fresh()
    connection = await aiormq.connect(AMQP_URL)
    try:
        await broker.open_topology(connection, names.topology(), passive=False)
        yield names
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            for q in (names.queue, names.replay_queue, names.dead_letter_queue):
                await channel.queue_delete(q)
            for e in (names.exchange, names.dead_letter_exchange):
                await channel.exchange_delete(e)
        await connection.close()


async def prefill(
    names: Names, bodies: Sequence[bytes], *, routing_key: str = broker.LIVE_ROUTING_KEY
) -> None:
    """Publish persistent messages with confirms, many outstanding at once."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        props = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
        window = 2000
        for i in range(0, len(bodies), window):
            await asyncio.gather(
                *(
                    channel.basic_publish(
                        b, exchange=names.exchange, routing_key=routing_key, properties=props
                    )
                    for b in bodies[i : i + window]
                )
            )
    finally:
        await connection.close()


async def queue_ready(names: Names) -> int:
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(names.queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


async def run_baseline(kind: str, names: Names, n: int, database_url: str = "") -> dict[str, Any]:
    """Run bench.baselines as a process on a pre-filled queue; its JSON result."""
    args = [sys.executable, "-m", "bench.baselines", kind, names.queue, str(n)]
    if database_url:
        args.append(database_url)
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"baseline {kind} failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, children excluded."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
            return True
    except OSError:
        return False


@dataclass
class WorkerRun:
    events: int
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int


@contextlib.asynccontextmanager
async def worker_process(
    names: Names, database_url: str, extra_env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``prompter-worker run`` as a process on these names; (process, metrics port)."""
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PROMPTER_")},
        **names.env(),
        "DATABASE_URL": database_url,
        "AMQP_URL": AMQP_URL,
        "PROMPTER_METRICS_PORT": str(port),
        "PROMPTER_LOG_FORMAT": "json",
        "PROMPTER_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_ready, port):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not become ready")
            await asyncio.sleep(0.02)
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def drain_with_worker(
    names: Names, database_url: str, n: int, extra_env: dict[str, str] | None = None
) -> WorkerRun:
    """Start the worker on a pre-filled queue; time from ready to the last row committed.

    Rows already written when the worker reports ready are subtracted, so the rate covers
    exactly the time measured.
    """
    conn = await asyncpg.connect(database_url)
    try:
        async with worker_process(names, database_url, extra_env) as (proc, _):
            t0 = time.perf_counter()
            cpu0 = proc_cpu_seconds(proc.pid)
            base = int(await conn.fetchval("SELECT count(*) FROM prompt_results"))
            while True:
                rows = int(await conn.fetchval("SELECT count(*) FROM prompt_results"))
                if rows >= n:
                    break
                if proc.returncode is not None:
                    raise RuntimeError("the worker exited during the run")
                await asyncio.sleep(0.02)
            t1 = time.perf_counter()
            cpu1 = proc_cpu_seconds(proc.pid)
            rss = proc_peak_rss(proc.pid)
        return WorkerRun(n - base, t1 - t0, cpu1 - cpu0, rss)
    finally:
        await conn.close()
