"""Sustained ingest as ``prompt_results`` grows: random (v4) vs time-ordered (v7) ids.

``Store.ingest`` alone (no broker), two connections each writing batches of 1,000 events
of about 2.3 KB, from an empty table to ``rows`` rows; the rate is measured per slice of
``slice_rows`` rows. v4 and v7 each write into a database of their own, a chunk (a tenth
of a slice, at most 50,000 rows) at a time in turn, and between them a third database takes
half a chunk of v7 ids into a table emptied before each of its chunks: the empty-table rate
at that moment. Drift of the shared machine (other work on it, checkpoints) hits the three
alike, so each slice's rates compare with each other, and with the empty table's. Only
``Store.ingest`` is timed: each chunk of events is made (the data set's decoded events with
fresh ids, and ``occurred_at`` one millisecond after the previous event's, as live traffic
comes in time order) before its clock starts.

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
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
import uuid_utils

from bench.data import START, make_events, make_templates, register_templates
from bench.harness import scratch_database
from worker.events import Event, decode
from worker.store import pool as store_module
from worker.store.ingest import Store

KINDS: dict[str, Callable[[], str]] = {
    "v4": lambda: str(uuid.uuid4()),
    "v7": lambda: str(uuid_utils.uuid7()),
}
KINDS_ORDER = tuple(KINDS)
#: The reference: v7 ids into a table emptied before each of its chunks, measured between
#: the growing tables' chunks, so that it sees the same machine at the same moment.
EMPTY = "empty"
BATCH = 1000
MS = timedelta(milliseconds=1)
CONNECTIONS = 2
#: Events made ahead of each timed chunk (about 0.25 GB of bodies and texts at 2.3 KB).
CHUNK = 50_000


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

    def vs_empty(self, kind: str, i: int = -1) -> float:
        """Rate of slice ``i`` over the empty table's measured in that slice."""
        r, e = self.rates.get(kind, []), self.rates.get(EMPTY, [])
        return r[i] / e[i] if r and e else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "slice_rows": self.slice_rows,
            "event_bytes": self.event_bytes,
            "rates": self.rates,
            "rows": {k: self.rows(k) for k in self.rates},
            "last_over_first": {k: self.ratio(k) for k in self.rates},
            "last_over_empty": {k: self.vs_empty(k) for k in KINDS if k in self.rates},
            "bytes_per_row": self.bytes_per_row,
        }


def _renamed(template: Event, new_id: str, at: datetime) -> Event:
    """The same event under another id, happened ``at`` (the body says so too)."""
    old_at = template.body[template.body.index(b'"occurred_at":"') + 15 :].split(b'"', 1)[0]
    body = template.body.replace(template.event_id.encode(), new_id.encode(), 1).replace(
        old_at, at.isoformat().replace("+00:00", "Z").encode(), 1
    )
    return template._replace(event_id=new_id, body=body, occurred_at=at)


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
    chunk_rows = max(1, min(CHUNK, slice_rows // 10))
    probe_rows = max(1, chunk_rows // 2)
    made = 0

    def chunk(n: int, new_id: Callable[[], str]) -> list[list[Event]]:
        # Events happen in time order, as live traffic does: occurred_at (the results'
        # created_at, in the (template_id, created_at) index) one millisecond apart.
        nonlocal made
        events = [
            _renamed(templates_[(made + i) % len(templates_)], new_id(), START + (made + i) * MS)
            for i in range(n)
        ]
        made += n
        return [events[i : i + BATCH] for i in range(0, n, BATCH)]

    async with AsyncExitStack() as stack:
        urls = {k: await stack.enter_async_context(scratch_database()) for k in (*KINDS, EMPTY)}
        stores: dict[str, Store] = {}
        for kind, url in urls.items():
            conn = await asyncpg.connect(url)
            await register_templates(conn, tpls)
            await conn.close()
            pool = await store_module.create_pool(url, max_size=CONNECTIONS)
            stack.push_async_callback(pool.close)
            stores[kind] = Store(pool)
            growth.rates[kind] = []
        probe = await asyncpg.connect(urls[EMPTY])
        stack.push_async_callback(probe.close)
        slices = rows // slice_rows
        for s in range(slices):
            seconds = dict.fromkeys(urls, 0.0)
            done = dict.fromkeys(urls, 0)
            turn = 0
            while done[KINDS_ORDER[0]] < slice_rows:
                n = min(chunk_rows, slice_rows - done[KINDS_ORDER[0]])
                order = (*KINDS_ORDER, EMPTY) if turn % 2 == 0 else (EMPTY, *KINDS_ORDER[::-1])
                turn += 1
                for kind in order:
                    if kind == EMPTY:
                        await probe.execute("TRUNCATE prompt_results")
                        m = min(n, probe_rows)
                        batches = chunk(m, KINDS["v7"])
                    else:
                        m = n
                        batches = chunk(m, KINDS[kind])
                    seconds[kind] += await ingest_batches(stores[kind], batches)
                    done[kind] += m
            for kind in urls:
                growth.rates[kind].append(done[kind] / seconds[kind])
            print(
                f"  rows {slice_rows * (s + 1):>10,}: "
                + ", ".join(f"{k} {growth.rates[k][-1]:,.0f}" for k in urls)
                + " events/s",
                flush=True,
            )
            if deadline is not None and time.monotonic() > deadline:
                print(f"  stopped at the deadline after {s + 1} of {slices} slices")
                break
        for kind in KINDS:
            conn = await asyncpg.connect(urls[kind])
            try:
                size, count = await conn.fetchrow(
                    "SELECT pg_total_relation_size('prompt_results'),"
                    " (SELECT count(*) FROM prompt_results)"
                )
                growth.bytes_per_row[kind] = size / max(count, 1)
            finally:
                await conn.close()
    return growth


def report(g: Growth, plot_name: str | None = None) -> str:
    kinds = [k for k in g.rates if k != EMPTY]
    cols = [*kinds, EMPTY] if EMPTY in g.rates else kinds
    lines = [
        f"Store.ingest alone, {CONNECTIONS} connections, batches of {BATCH:,}, events of "
        f"~{g.event_bytes:,} B; each kind in its own database, chunk by chunk in turn; "
        f"`{EMPTY}`: v7 ids into a table emptied before each of its chunks, measured "
        "between them (the empty-table rate at that moment).",
        "",
        "| rows at end of slice | "
        + " | ".join(f"{k} events/s" for k in cols)
        + " | "
        + " | ".join(f"{k} / {EMPTY}" for k in kinds)
        + " |",
        "|---|" + "---|" * (len(cols) + len(kinds)),
    ]
    for i, rows in enumerate(g.rows(kinds[0])):
        cells = [f"{g.rates[k][i]:,.0f}" for k in cols]
        cells += [f"{g.vs_empty(k, i):.2f}" for k in kinds if EMPTY in g.rates]
        lines.append(f"| {rows:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
        "| last slice / first slice | " + " | ".join(f"{g.ratio(k):.2f}x" for k in kinds) + " |",
        f"| last slice / {EMPTY} table, same moment | "
        + " | ".join(f"{g.vs_empty(k):.2f}x" for k in kinds)
        + " |",
        "| bytes on disk per row | "
        + " | ".join(f"{g.bytes_per_row.get(k, float('nan')):,.0f}" for k in kinds)
        + " |",
        "",
    ]
    if g.rates.get("v7"):
        ok = g.vs_empty("v7") >= 0.9
        lines.append(
            f"Target: rate at the last slice >= 0.9x the empty table's with v7 ids: "
            f"{'met' if ok else '**not met**'} ({g.vs_empty('v7'):.2f}x the empty table "
            f"measured alongside, {g.ratio('v7'):.2f}x the first slice, at "
            f"{g.rows('v7')[-1]:,} rows)."
        )
        lines.append("")
    if plot_name:
        lines += [f"![ingest rate by table size]({plot_name})", ""]
    return "\n".join(lines)
