"""TOAST compression of ``request``, ``response`` and ``analysis_config``: PostgreSQL's
default ``pglz`` against ``lz4`` (``ALTER TABLE ... ALTER COLUMN ... SET COMPRESSION``).

Two databases, identical but for the columns' compression, each given the same events of
the size mix by ``Store.ingest`` (the worker's default batches: 500 events or 8 MiB, two
connections), interleaved. Measured per run: the ingest rate, the bytes on disk per event
(``pg_total_relation_size('prompt_results')`` / rows, the table with its TOAST table and
indexes, after a ``VACUUM``), and the time to read every stored value back
(``sum(octet_length(col::text))``, which decompresses them all).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import asyncpg

from bench.data import SizedEvents, make_templates, mix_sizes, register_templates
from bench.growth import ingest_batches
from bench.harness import Series, scratch_database, truncate
from worker.config import Settings
from worker.events import Event, decode
from worker.store import pool as store_module
from worker.store.ingest import Store

COLUMNS = ("request", "response", "analysis_config")
METHODS = ("pglz", "lz4")


@dataclass
class Toast:
    events: int
    mean_bytes: float
    rate: dict[str, Series] = field(default_factory=dict)
    bytes_per_event: dict[str, Series] = field(default_factory=dict)
    read_rate: dict[str, Series] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "events": self.events,
            "mean_bytes": self.mean_bytes,
            "events_per_second": {k: v.as_dict() for k, v in self.rate.items()},
            "bytes_per_event": {k: v.as_dict() for k, v in self.bytes_per_event.items()},
            "read_events_per_second": {k: v.as_dict() for k, v in self.read_rate.items()},
        }


async def supports_lz4(url: str) -> bool:
    """Whether the server was built with lz4 (``CREATE TABLE ... COMPRESSION lz4`` works)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TEMP TABLE bench_lz4_probe (x text COMPRESSION lz4)")
        return True
    except asyncpg.FeatureNotSupportedError:
        return False
    finally:
        await conn.close()


def batches_of(events: list[Event], settings: Settings) -> list[list[Event]]:
    """The worker's batches: at most ``batch_size`` events and ``batch_max_bytes`` bytes
    (a larger single event alone)."""
    out: list[list[Event]] = [[]]
    held = 0
    for e in events:
        if out[-1] and (
            len(out[-1]) >= settings.batch_size or held + len(e.body) > settings.batch_max_bytes
        ):
            out.append([])
            held = 0
        out[-1].append(e)
        held += len(e.body)
    return out


async def run(n_events: int, reps: int) -> Toast:
    tpls = make_templates()
    bodies = SizedEvents(tpls, seed=7).make(mix_sizes(n_events, seed=8))
    events = []
    for b in bodies:
        e = decode(b)
        assert isinstance(e, Event)
        events.append(e)
    settings = Settings.from_env({})
    batches = batches_of(events, settings)
    out = Toast(n_events, sum(map(len, bodies)) / len(bodies))
    async with AsyncExitStack() as stack:
        urls = {m: await stack.enter_async_context(scratch_database()) for m in METHODS}
        if not await supports_lz4(urls["lz4"]):
            raise RuntimeError("this PostgreSQL was built without lz4")
        for method, url in urls.items():
            conn = await asyncpg.connect(url)
            try:
                await register_templates(conn, tpls)
                for col in COLUMNS:
                    await conn.execute(
                        f"ALTER TABLE prompt_results ALTER COLUMN {col} SET COMPRESSION {method}"
                    )
            finally:
                await conn.close()
            out.rate[method] = Series(f"{method}: ingest", "events/s")
            out.bytes_per_event[method] = Series(f"{method}: on disk", "bytes/event")
            out.read_rate[method] = Series(f"{method}: read back", "events/s")
        for rep in range(reps):
            for method in METHODS if rep % 2 == 0 else tuple(reversed(METHODS)):
                url = urls[method]
                await truncate(url)
                pool = await store_module.create_pool(url, max_size=settings.db_pool_size)
                try:
                    seconds = await ingest_batches(Store(pool), batches, settings.db_pool_size)
                finally:
                    await pool.close()
                conn = await asyncpg.connect(url)
                try:
                    await conn.execute("VACUUM prompt_results")
                    size = await conn.fetchval("SELECT pg_total_relation_size('prompt_results')")
                    start = time.perf_counter()
                    await conn.fetchval(
                        "SELECT sum(octet_length(request::text) + octet_length(response::text)"
                        " + coalesce(octet_length(analysis_config::text), 0)) FROM prompt_results"
                    )
                    read = time.perf_counter() - start
                finally:
                    await conn.close()
                out.rate[method].values.append(n_events / seconds)
                out.bytes_per_event[method].values.append(size / n_events)
                out.read_rate[method].values.append(n_events / read)
                print(
                    f"  rep {rep + 1} {method}: {n_events / seconds:,.0f} events/s "
                    f"({n_events / seconds * out.mean_bytes / 1e6:,.1f} MB/s), "
                    f"{size / n_events:,.0f} bytes/event on disk, read back "
                    f"{n_events / read:,.0f} events/s",
                    flush=True,
                )
                await asyncio.sleep(0)
    return out


def report(t: Toast) -> str:
    lines = [
        f"{t.events:,} events of the size mix (mean body {t.mean_bytes / 1024:,.1f} KiB) by "
        "Store.ingest in the worker's default batches; medians (min - max).",
        "",
        "| compression | ingest events/s | MB/s | bytes on disk per event | vs body | "
        "read back events/s |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        r, b, rd = t.rate[m], t.bytes_per_event[m], t.read_rate[m]
        lines.append(
            f"| {m} | {r.median:,.0f} ({r.low:,.0f} - {r.high:,.0f}) | "
            f"{r.median * t.mean_bytes / 1e6:,.1f} | {b.median:,.0f} ({b.low:,.0f} - "
            f"{b.high:,.0f}) | {b.median / t.mean_bytes:.2f} | {rd.median:,.0f} |"
        )
    p, z = "pglz", "lz4"
    lines += [
        "",
        f"lz4 / pglz: ingest {t.rate[z].median / t.rate[p].median:.2f}x, bytes on disk "
        f"{t.bytes_per_event[z].median / t.bytes_per_event[p].median:.2f}x, read back "
        f"{t.read_rate[z].median / t.read_rate[p].median:.2f}x.",
        "",
    ]
    return "\n".join(lines)
