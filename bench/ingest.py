"""Micro-benchmark of ``Store.ingest`` alone, beside a plain COPY of the same rows.

Five contenders, each writing the same decoded events in batches of ``batch`` (default
1,000) into emptied tables, one transaction per batch, interleaved:

- ``copy (rows prebuilt)``: ``COPY`` of the result rows, built before the clock starts (the
  version rows are COPYed first): the database's floor, nothing decided per event;
- ``copy (rows from events)``: the same COPY, with each batch's rows built from the decoded
  events inside the clock (UUIDs, request/response serialized), as a COPY-based writer must;
- ``ingest (COPY)``: :meth:`worker.store.ingest.Store.ingest` as it runs on compact bodies (what
  orjson writes, like the benchmark's), everything included: tenant check, collapse,
  version upsert, the results COPYed from the JSON texts the decoder kept, the merge;
- ``ingest (unnest)``: the same events without those texts, as for bodies in any other
  form: the results by ``INSERT ... SELECT`` from arrays, PostgreSQL parsing each body;
- ``ingest (temp COPY)``: that SQL fed by COPY into temporary tables instead of arrays
  (the alternative the design asked to measure).

Decoding is outside the clock for all of them; keeping the texts costs the decoder about
5 µs per event of 2.3 KB (the end-to-end runs include it).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import orjson

from bench.data import make_events, make_templates, register_templates
from bench.harness import Series, interleaved, scratch_database, truncate
from worker.events import Event, decode
from worker.store import pool as pool_module
from worker.store.ingest import RESULT_COLUMNS, Store

COPY_PREBUILT = "copy (rows prebuilt)"
COPY_FROM_EVENTS = "copy (rows from events)"
INGEST = "ingest (COPY)"
UNNEST = "ingest (unnest)"
TEMP_COPY = "ingest (temp COPY)"


class TempCopyStore(Store):
    """The store with its results statement fed by COPY into a temporary table instead of
    arrays: the alternative the design asked to measure. Everything else is the store's."""

    _ready: set[int]

    async def _insert_results(
        self,
        conn: asyncpg.Connection,
        batch: list[Event],
        ids: dict[tuple[str, str, str, str], str],
        *,
        fast: bool,
    ) -> set[str] | None:
        if not hasattr(self, "_ready"):
            self._ready = set()
        if id(conn) not in self._ready:
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS bench_results (id uuid, version_id uuid,"
                " created_at timestamptz, body bytea) ON COMMIT DELETE ROWS"
            )
            self._ready.add(id(conn))
        rows = sorted(batch, key=lambda e: e.event_id)
        await conn.copy_records_to_table(
            "bench_results",
            records=[
                (uuid.UUID(e.event_id), uuid.UUID(ids[e.version_key]), e.occurred_at, e.body)
                for e in rows
            ],
        )
        guard = "" if fast else "ON CONFLICT (id) DO NOTHING RETURNING id::text"
        sql = f"""
            INSERT INTO prompt_results
                (id, org_id, workspace_id, template_id, version_id, provider_version_key,
                 system_fingerprint, request, response, analysis_config, created_at)
            SELECT r.id, v.org_id, v.workspace_id, v.template_id, r.version_id,
                   d.doc ->> 'provider_version_key', d.doc ->> 'system_fingerprint',
                   d.doc -> 'request', d.doc -> 'response',
                   NULLIF(d.doc -> 'analysis_config', 'null'::jsonb), r.created_at
            FROM bench_results r
            JOIN prompt_versions v ON v.id = r.version_id
            CROSS JOIN LATERAL (
                SELECT convert_from(r.body, 'UTF8')::jsonb AS doc OFFSET 0
            ) AS d
            ORDER BY r.id
            {guard}
        """
        if fast:
            await conn.execute(sql)
            await conn.execute("TRUNCATE bench_results")
            return None
        inserted = {r[0] for r in await conn.fetch(sql)}
        await conn.execute("TRUNCATE bench_results")
        return inserted


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def run(n_events: int, reps: int, batch: int = 1000) -> dict[str, Series]:
    tpls = make_templates()
    bodies = make_events(n_events, tpls)
    events: list[Event] = []
    for body in bodies:
        e = decode(body)
        assert isinstance(e, Event)
        events.append(e)
    docs = [orjson.loads(b) for b in bodies]
    keys = sorted({e.version_key for e in events})

    async with scratch_database() as url:
        setup = await asyncpg.connect(url)
        await register_templates(setup, tpls)
        await setup.close()

        def result_record(e: Event, doc: dict[str, Any], version_id: uuid.UUID) -> tuple[Any, ...]:
            return (
                uuid.UUID(e.event_id), uuid.UUID(e.org_id), uuid.UUID(e.workspace_id),
                uuid.UUID(e.template_id), version_id, e.provider_version_key,
                e.system_fingerprint, orjson.dumps(doc["request"]).decode(),
                orjson.dumps(doc["response"]).decode(), None, e.occurred_at,
            )  # fmt: skip

        async def copy_run(prebuilt: bool) -> float:
            await truncate(url)
            conn = await asyncpg.connect(url)
            try:
                version_ids = {k: uuid.uuid4() for k in keys}
                first = events[0].occurred_at
                rows = [
                    (vid, *(uuid.UUID(x) for x in k[:3]), "p", k[3], "m", None, first, first)
                    for k, vid in version_ids.items()
                ]
                records = []
                if prebuilt:  # built before the clock starts: only the database's work is timed
                    records = [
                        result_record(e, d, version_ids[e.version_key])
                        for e, d in zip(events, docs, strict=True)
                    ]
                start = time.perf_counter()
                await conn.copy_records_to_table(
                    "prompt_versions",
                    records=rows,
                    columns=[
                        "id",
                        "org_id",
                        "workspace_id",
                        "template_id",
                        "provider",
                        "provider_version_key",
                        "model_id",
                        "fingerprint_captured_at",
                        "first_seen_at",
                        "last_seen_at",
                    ],
                )
                for i in range(0, n_events, batch):
                    if prebuilt:
                        part = records[i : i + batch]
                    else:  # what a COPY-based writer does: rows from the decoded events
                        part = [
                            result_record(e, d, version_ids[e.version_key])
                            for e, d in zip(events[i : i + batch], docs[i : i + batch], strict=True)
                        ]
                    async with conn.transaction():
                        await conn.copy_records_to_table(
                            "prompt_results", records=part, columns=RESULT_COLUMNS
                        )
                return n_events / (time.perf_counter() - start)
            finally:
                await conn.close()

        textless = [e._replace(columns=None) for e in events]

        async def store_run(kind: type[Store], decoded: list[Event]) -> float:
            await truncate(url)
            pool = await pool_module.create_pool(url, max_size=1)
            try:
                store = kind(pool)
                start = time.perf_counter()
                for part in _chunks(decoded, batch):
                    result = await store.ingest(part)
                    assert result.stored == len(part), result.rejected[:3]
                return n_events / (time.perf_counter() - start)
            finally:
                await pool.close()

        size = sum(map(len, bodies)) // len(bodies)
        print(f"ingest micro-benchmark: {n_events:,} events of ~{size:,} B, batches of {batch}")
        return await interleaved(
            reps,
            {
                COPY_PREBUILT: lambda: copy_run(prebuilt=True),
                COPY_FROM_EVENTS: lambda: copy_run(prebuilt=False),
                INGEST: lambda: store_run(Store, events),
                UNNEST: lambda: store_run(Store, textless),
                TEMP_COPY: lambda: store_run(TempCopyStore, textless),
            },
            dict.fromkeys((COPY_PREBUILT, COPY_FROM_EVENTS, INGEST, UNNEST, TEMP_COPY), "events/s"),
        )


def report(series: dict[str, Series]) -> str:
    floor = series[COPY_PREBUILT].median
    fair = series[COPY_FROM_EVENTS].median
    lines = [
        "| contender | events/s (median) | min-max | vs COPY (prebuilt) | vs COPY (from events) |",
        "|---|---|---|---|---|",
    ]
    for s in series.values():
        lines.append(
            f"| {s.name} | {s.median:,.0f} | {s.low:,.0f}-{s.high:,.0f}"
            f" | {s.median / floor:.2f}x | {s.median / fair:.2f}x |"
        )
    return "\n".join(lines)
