"""Publishing and direct backfill throughput (``python -m bench --only publish``).

Publishing, on the same events (``bench.data.make_events``, about 2 KB each), interleaved,
each run against its own throwaway exchange and quorum queues (deleted afterwards):

- ``awaited``: ``Publisher.publish`` in a loop, each confirm awaited before the next
  publish: one broker round trip (a quorum-queue commit) per event;
- ``pipelined (window W)``: ``Publisher.publish_many``, up to W confirms outstanding; the
  default window and two others, to show where the curve flattens.

Both validate every event first, as the library always does; the ratio is what pipelining
buys. At most ``PUBLISH_EVENTS_MAX`` events are published per run: the awaited loop is
slow, and a rate needs no more.

Direct backfill: ``replay.run`` of the whole data set as a JSONL file into a
scratch database (tables truncated before each run), events/s from the first line read to
the last commit, to set beside the worker's end-to-end rate.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import asyncpg

from bench.data import make_events, make_templates, register_templates
from bench.harness import AMQP_URL, Series, delete_topology, interleaved, scratch_database
from worker.amqp import broker
from worker.backfill import replay
from worker.backfill.options import ReplayOptions
from worker.backfill.reports import render
from worker.config import Settings
from worker.publisher import DEFAULT_WINDOW, Publisher

PUBLISH_EVENTS_MAX: Final = 20_000
AWAITED = "awaited (one confirm at a time)"
DIRECT = "replay --direct"
WINDOWS: Final = tuple(sorted({32, DEFAULT_WINDOW, 2048}))


def pipelined(window: int) -> str:
    default = ", the default" if window == DEFAULT_WINDOW else ""
    return f"pipelined (window {window}{default})"


@contextlib.asynccontextmanager
async def throwaway_topology() -> AsyncIterator[broker.Topology]:
    """A topology under unique names; every queue and exchange of it deleted afterwards."""
    suffix = uuid.uuid4().hex[:10]
    topology = broker.Topology(
        exchange=f"bench.{suffix}.events",
        queue=f"bench.{suffix}.ingest",
        replay_queue=f"bench.{suffix}.ingest.replay",
        dead_letter_exchange=f"bench.{suffix}.dlx",
        dead_letter_queue=f"bench.{suffix}.ingest.dead",
        delivery_limit=20,
    )
    try:
        yield topology
    finally:
        await delete_topology(topology)


async def _publish_run(bodies: list[bytes], window: int | None) -> float:
    """Events/s of one run: ``window=None`` awaits each confirm in turn."""
    async with (
        throwaway_topology() as topology,
        Publisher(AMQP_URL, topology, window=window or 1) as publisher,
    ):
        start = time.perf_counter()
        if window is None:
            for body in bodies:
                await publisher.publish(body)
        else:
            assert await publisher.publish_many(bodies) == len(bodies)
        return len(bodies) / (time.perf_counter() - start)


async def run(n_events: int, reps: int) -> dict[str, Series]:
    tpls = make_templates()
    bodies = make_events(n_events, tpls)
    published = bodies[:PUBLISH_EVENTS_MAX]
    size = sum(map(len, bodies)) // len(bodies)
    print(
        f"publish benchmark: {len(published):,} events of ~{size:,} B per publishing run, "
        f"{n_events:,} per direct backfill run"
    )
    with tempfile.TemporaryDirectory(prefix="prompter-bench-") as tmp:
        path = Path(tmp) / "events.jsonl"
        path.write_bytes(b"\n".join(bodies) + b"\n")
        async with scratch_database() as url:
            setup = await asyncpg.connect(url)
            try:
                await register_templates(setup, tpls)
            finally:
                await setup.close()
            settings = Settings.from_env({}, database_url=url, amqp_url=AMQP_URL)

            async def direct_run() -> float:
                conn = await asyncpg.connect(url)
                try:
                    await conn.execute("TRUNCATE prompt_results, prompt_versions")
                    await conn.execute("VACUUM ANALYZE prompt_results")
                finally:
                    await conn.close()
                options = ReplayOptions(
                    paths=[str(path)], mode="direct", rejects_path=str(Path(tmp) / "rejects.jsonl")
                )
                report = await replay.run(settings, options)
                assert report.ok, render(report)
                return n_events / report.elapsed

            runs = {AWAITED: lambda: _publish_run(published, None)}
            for window in WINDOWS:
                runs[pipelined(window)] = lambda w=window: _publish_run(published, w)  # type: ignore[misc]
            runs[DIRECT] = direct_run
            return await interleaved(reps, runs, dict.fromkeys(runs, "events/s"))


def report(series: dict[str, Series]) -> str:
    """A markdown table: events/s (median, min-max) and each row's ratio to the awaited loop."""
    base = series[AWAITED].median
    lines = [
        "| contender | events/s (median) | min-max | vs awaited |",
        "|---|---|---|---|",
    ]
    for s in series.values():
        lines.append(
            f"| {s.name} | {s.median:,.0f} | {s.low:,.0f}-{s.high:,.0f} | {s.median / base:.1f}x |"
        )
    return "\n".join(lines)
