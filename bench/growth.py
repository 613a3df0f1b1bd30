"""Sustained ingest as ``prompt_results`` grows: random (v4) vs time-ordered (v7) ids.

``Store.ingest`` alone (no broker), two connections each writing batches of 1,000 events
of about 2.3 KB, from an empty table to ``rows`` rows; the rate is measured per slice of
``slice_rows`` rows. v4 and v7 each write into a database of their own, slice by slice in
turn (v4 slice 1, v7 slice 1, v4 slice 2, ...), so that drift of the shared machine and
the other's checkpoints hit both alike. Only ``Store.ingest`` is timed: each chunk of
events is made (the data set's decoded events with fresh ids) before its clock starts.

A random key lands on any page of the primary-key index; once the index outgrows memory,
inserts read pages from disk, and after each checkpoint the first change to every page
touched writes a full-page image to the WAL. A time-ordered key lands on the rightmost
pages only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import uuid_utils

from bench.data import make_events, make_templates, register_templates
from bench.harness import scratch_database
from worker import store as store_module
from worker.events import Event, decode
from worker.store import Store

KINDS: dict[str, Callable[[], str]] = {
    "v4": lambda: str(uuid.uuid4()),
    "v7": lambda: str(uuid_utils.uuid7()),
}
BATCH = 1000
CONNECTIONS = 2
#: Events made ahead of each timed chunk (about 0.5 GB of bodies and texts at 2.3 KB).
CHUNK = 100_000


@dataclass
class Growth:
    """Rows at the end of each slice and the slice's rate, per id kind."""

    slice_rows: int
    event_bytes: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    bytes_per_row: dict[str, float] = field(default_factory=dict)

    def rows(self, kind: str) -> list[int]:
        return [self.slice_rows * (i + 1) for i in range(len(self.rates.get(kind, [])))]

    def ratio(self, kind: str) -> float:
        """Rate of the last slice over the first (the empty table's)."""
        r = self.rates.get(kind, [])
        return r[-1] / r[0] if len(r) >= 2 else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "slice_rows": self.slice_rows,
            "event_bytes": self.event_bytes,
            "rates": self.rates,
            "rows": {k: self.rows(k) for k in self.rates},
            "last_over_first": {k: self.ratio(k) for k in self.rates},
            "bytes_per_row": self.bytes_per_row,
        }


def _renamed(template: Event, new_id: str) -> Event:
    """The same event under another id (the body says so too)."""
    body = template.body.replace(template.event_id.encode(), new_id.encode(), 1)
    return template._replace(event_id=new_id, body=body)


async def ingest_batches(
    store: Store, batches: list[list[Event]], connections: int = CONNECTIONS
) -> float:
    """Store ``batches`` over ``connections`` concurrent writers; seconds taken."""
    queue: asyncio.Queue[list[Event]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    async def writer() -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            result = await store.ingest(batch)
            if result.stored != len(batch):
                raise RuntimeError(f"stored {result.stored} of {len(batch)}: {result.rejected[:3]}")

    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(connections)))
    return time.perf_counter() - start


async def run(rows: int, slice_rows: int, *, deadline: float | None = None) -> Growth:
    """Grow one table per id kind to ``rows`` rows (or as far as ``deadline``, a
    ``time.monotonic()`` value, allows: both kinds stop after the same slice)."""
    tpls = make_templates()
    bodies = make_events(20_000, tpls)
    templates_: list[Event] = []
    for body in bodies:
        e = decode(body)
        assert isinstance(e, Event)
        templates_.append(e)
    growth = Growth(slice_rows=slice_rows, event_bytes=sum(map(len, bodies)) // len(bodies))
    async with scratch_database() as url4, scratch_database() as url7:
        urls = {"v4": url4, "v7": url7}
        stores: dict[str, Store] = {}
        pools: list[asyncpg.Pool] = []
        try:
            for kind, url in urls.items():
                conn = await asyncpg.connect(url)
                await register_templates(conn, tpls)
                await conn.close()
                pool = await store_module.create_pool(url, max_size=CONNECTIONS)
                pools.append(pool)
                stores[kind] = Store(pool)
                growth.rates[kind] = []
            made = dict.fromkeys(KINDS, 0)
            slices = rows // slice_rows
            for s in range(slices):
                for kind, new_id in KINDS.items():
                    seconds = 0.0
                    todo = slice_rows
                    while todo:
                        n = min(CHUNK, todo)
                        chunk = [
                            _renamed(templates_[(made[kind] + i) % len(templates_)], new_id())
                            for i in range(n)
                        ]
                        made[kind] += n
                        batches = [chunk[i : i + BATCH] for i in range(0, n, BATCH)]
                        seconds += await ingest_batches(stores[kind], batches)
                        todo -= n
                    growth.rates[kind].append(slice_rows / seconds)
                    print(
                        f"  {kind} rows {slice_rows * (s + 1):>10,}: "
                        f"{slice_rows / seconds:,.0f} events/s",
                        flush=True,
                    )
                if deadline is not None and time.monotonic() > deadline:
                    print(f"  stopped at the deadline after {s + 1} of {slices} slices")
                    break
            for kind, url in urls.items():
                conn = await asyncpg.connect(url)
                try:
                    size, count = await conn.fetchrow(
                        "SELECT pg_total_relation_size('prompt_results'),"
                        " (SELECT count(*) FROM prompt_results)"
                    )
                    growth.bytes_per_row[kind] = size / max(count, 1)
                finally:
                    await conn.close()
        finally:
            for pool in pools:
                await pool.close()
    return growth


def report(g: Growth, plot_name: str | None = None) -> str:
    kinds = list(g.rates)
    lines = [
        f"Store.ingest alone, {CONNECTIONS} connections, batches of {BATCH:,}, events of "
        f"~{g.event_bytes:,} B; v4 and v7 slices in turn, each kind in its own database.",
        "",
        "| rows at end of slice | " + " | ".join(f"{k} events/s" for k in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for i, rows in enumerate(g.rows(kinds[0])):
        cells = [f"{g.rates[k][i]:,.0f}" if i < len(g.rates[k]) else "" for k in kinds]
        lines.append(f"| {rows:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
        "| last slice / first slice | " + " | ".join(f"{g.ratio(k):.2f}x" for k in kinds) + " |",
        "| bytes on disk per row | "
        + " | ".join(f"{g.bytes_per_row.get(k, float('nan')):,.0f}" for k in kinds)
        + " |",
        "",
    ]
    if "v7" in g.rates:
        ok = g.ratio("v7") >= 0.9
        lines.append(
            f"Target: rate at the last slice >= 0.9x the empty table's with v7 ids: "
            f"{'met' if ok else '**not met**'} ({g.ratio('v7'):.2f}x at "
            f"{g.rows('v7')[-1]:,} rows)."
        )
        lines.append("")
    if plot_name:
        lines += [f"![ingest rate by table size]({plot_name})", ""]
    return "\n".join(lines)
