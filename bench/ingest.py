"""Micro-benchmark of ``Store.ingest`` alone, beside a plain COPY of the same rows.

Four contenders, each writing the same decoded events in batches of ``batch`` (default
1,000) into emptied tables, one transaction per batch, interleaved:

- ``copy (rows prebuilt)``: ``COPY`` of the result rows, built before the clock starts (the
  version rows are COPYed first): the database's floor, nothing decided per event;
- ``copy (rows from events)``: the same COPY, with each batch's rows built from the decoded
  events inside the clock (UUIDs, request/response serialized), as a COPY-based writer must;
- ``ingest (unnest)``: :meth:`worker.store.Store.ingest`, everything included: tenant check,
  collapse, version upsert, idempotent result insert, one statement per batch;
- ``ingest (temp COPY)``: the same SQL fed by COPY into temporary tables instead of arrays
  (the alternative the design asked to measure).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import orjson

from bench.data import make_events, make_templates, register_templates
from bench.harness import Series, interleaved, scratch_database
from worker import store as store_module
from worker.events import Event, decode
from worker.store import Store

COPY_PREBUILT = "copy (rows prebuilt)"
COPY_FROM_EVENTS = "copy (rows from events)"
INGEST = "ingest (unnest)"
TEMP_COPY = "ingest (temp COPY)"

RESULT_COLUMNS = [
    "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
    "system_fingerprint", "request", "response", "analysis_config", "created_at",
]  # fmt: skip

TEMP_TABLES = """
    CREATE TEMP TABLE IF NOT EXISTS bench_versions (
        org_id uuid, workspace_id uuid, template_id uuid, provider_version_key text,
        provider text, model_id text, fingerprint_captured_at timestamptz,
        first_seen_at timestamptz, last_seen_at timestamptz, ord bigint
    ) ON COMMIT DELETE ROWS;
    CREATE TEMP TABLE IF NOT EXISTS bench_results (
        id uuid, version_index int, provider_version_key text, system_fingerprint text,
        created_at timestamptz, body bytea, org_id uuid, workspace_id uuid, template_id uuid
    ) ON COMMIT DELETE ROWS;
"""

# store.SQL.INGEST with its two unnest() sources replaced by the temporary tables.
TEMP_INGEST = (
    store_module.SQL.INGEST.replace(
        """SELECT *
            FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                        $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
                 WITH ORDINALITY AS t(org_id, workspace_id, template_id, provider_version_key,
                                      provider, model_id, fingerprint_captured_at,
                                      first_seen_at, last_seen_at, ord)""",
        "SELECT * FROM bench_versions",
    )
    .replace(
        """FROM unnest(string_to_array($10, ' ')::uuid[], string_to_array($11, ' ')::int[],
                        $12::text[], $13::text[], $14::timestamptz[],
                        string_to_array($15, ' ')::int[], string_to_array($16, ' ')::int[])
                 AS r(id, version_index, provider_version_key, system_fingerprint, created_at,
                      body_start, body_length)""",
        "FROM bench_results AS r",
    )
    .replace("substring($17::bytea FROM r.body_start FOR r.body_length)", "r.body")
    .replace("($1::uuid[])[r.version_index]", "r.org_id")
    .replace("($2::uuid[])[r.version_index]", "r.workspace_id")
    .replace("($3::uuid[])[r.version_index]", "r.template_id")
)


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE prompt_results, prompt_versions")
        await conn.execute("VACUUM ANALYZE prompt_results")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def run(n_events: int, reps: int, batch: int = 1000) -> dict[str, Series]:
    if TEMP_INGEST.count("bench_") != 2 or "$" in TEMP_INGEST:
        raise RuntimeError("store.SQL.INGEST changed shape: update TEMP_INGEST in the bench")
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
            await _truncate(url)
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

        async def ingest_run() -> float:
            await _truncate(url)
            pool = await store_module.create_pool(url, max_size=1)
            try:
                store = Store(pool)
                start = time.perf_counter()
                for part in _chunks(events, batch):
                    result = await store.ingest(part)
                    assert result.stored == len(part), result.rejected[:3]
                return n_events / (time.perf_counter() - start)
            finally:
                await pool.close()

        async def temp_copy_run() -> float:
            await _truncate(url)
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(TEMP_TABLES)
                start = time.perf_counter()
                for part in _chunks(events, batch):
                    versions = store_module._collapse(part)
                    position = {v[:4]: i for i, v in enumerate(versions, start=1)}
                    rows = sorted(part, key=lambda e: e.event_id)
                    async with conn.transaction():
                        await conn.copy_records_to_table(
                            "bench_versions",
                            records=[
                                (uuid.UUID(v[0]), uuid.UUID(v[1]), uuid.UUID(v[2]), *v[3:], i)
                                for i, v in enumerate(versions)
                            ],
                        )
                        await conn.copy_records_to_table(
                            "bench_results",
                            records=[
                                (
                                    uuid.UUID(e.event_id),
                                    position[e.version_key],
                                    e.provider_version_key,
                                    e.system_fingerprint,
                                    e.occurred_at,
                                    e.body,
                                    uuid.UUID(e.org_id),
                                    uuid.UUID(e.workspace_id),
                                    uuid.UUID(e.template_id),
                                )
                                for e in rows
                            ],
                        )
                        inserted = await conn.fetch(TEMP_INGEST)
                        assert len(inserted) == len(part)
                return n_events / (time.perf_counter() - start)
            finally:
                await conn.close()

        size = sum(map(len, bodies)) // len(bodies)
        print(f"ingest micro-benchmark: {n_events:,} events of ~{size:,} B, batches of {batch}")
        return await interleaved(
            reps,
            {
                COPY_PREBUILT: lambda: copy_run(prebuilt=True),
                COPY_FROM_EVENTS: lambda: copy_run(prebuilt=False),
                INGEST: ingest_run,
                TEMP_COPY: temp_copy_run,
            },
            dict.fromkeys((COPY_PREBUILT, COPY_FROM_EVENTS, INGEST, TEMP_COPY), "events/s"),
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
