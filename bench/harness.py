"""Shared pieces: a scratch database, repetition with interleaving, summary statistics."""

from __future__ import annotations

import asyncio
import os
import statistics
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiormq
import asyncpg

from worker.amqp import broker
from worker.store import migrations

ADMIN_URL = os.environ.get(
    "PROMPTER_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("PROMPTER_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def database_url(name: str) -> str:
    parts = urllib.parse.urlsplit(ADMIN_URL)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A migrated database of the benchmark's own, dropped afterwards; its URL."""
    name = f"prompter_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        url = database_url(name)
        await asyncio.to_thread(migrations.upgrade, url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def truncate(url: str) -> None:
    """Empty the ingestion tables between runs, and start each run from a checkpoint."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE prompt_results, prompt_versions")
        await conn.execute("VACUUM ANALYZE prompt_results")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def delete_topology(topology: broker.Topology) -> None:
    """Delete a run's queues and exchanges, each on its own, on a fresh connection (one held
    through a long run may have been closed meanwhile), saying what could not be."""
    left = []
    connection = await aiormq.connect(AMQP_URL)
    try:
        for kind, name in (
            ("queue", topology.queue),
            ("queue", topology.replay_queue),
            ("queue", topology.dead_letter_queue),
            ("exchange", topology.exchange),
            ("exchange", topology.dead_letter_exchange),
        ):
            try:
                channel = await connection.channel()
                if kind == "queue":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
                await channel.close()
            except Exception as exc:  # reported below; the others still go
                left.append(f"{kind} {name} ({type(exc).__name__}: {exc})")
    finally:
        await connection.close()
    if left:
        print(f"  warning: left on the broker: {'; '.join(left)}", flush=True)


@dataclass
class Series:
    """Repeated measurements of one thing, in a unit where more is better (events/s) or
    less is better (seconds, bytes); ``unit`` says which."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def summary(self) -> str:
        return (
            f"{self.median:,.1f} {self.unit}"
            f" (min {self.low:,.1f}, max {self.high:,.1f}, n={len(self.values)})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "values": self.values,
        }


async def interleaved(
    reps: int, runs: dict[str, Callable[[], Awaitable[float]]], units: dict[str, str]
) -> dict[str, Series]:
    """Run each measurement ``reps`` times, round-robin (A B C A B C ...), so machine drift
    hits every contender alike. Each callable returns one value."""
    out = {name: Series(name, units[name]) for name in runs}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            value = await runs[name]()
            out[name].values.append(value)
            print(f"  {name:<34} rep {rep + 1}: {value:,.1f} {units[name]}", flush=True)
    return out
