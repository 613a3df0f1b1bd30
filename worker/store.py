"""PostgreSQL: the asyncpg pool and every SQL statement of ingestion, each named.

:meth:`Store.ingest` turns a batch of valid events into rows in ONE transaction of
set-based SQL (arrays through ``unnest``), whatever the batch size:

1. the templates of the batch are checked for tenancy (a cache of ``id -> (org, workspace)``
   saves the round trip for templates already seen: those columns never change);
2. events sharing a version key are collapsed in Python (a multi-row upsert may not touch a
   row twice), and the keys are sorted, so concurrent workers lock rows in the same order;
3. one statement upserts ``prompt_versions`` and inserts ``prompt_results``
   ``ON CONFLICT (id) DO NOTHING``, rows sorted by id (again: one lock order for all).

The version row is a pure function of the *set* of events: first_seen = least,
last_seen = greatest, fingerprint_captured_at = greatest non-null, provider and model_id from
the event with the greatest ``(occurred_at, provider, model_id)``. Every one of these is an
associative, commutative maximum or minimum, so batches may arrive in any order, any number
of times, and converge.

If PostgreSQL refuses the batch for a *data* error (SQLSTATE classes 22, 23, 54), the batch
is bisected under savepoints until the offending events are found; they are rejected and the
rest is stored, still in one transaction. Every other failure is a
:class:`~worker.errors.TransientError` and the whole batch is left to the caller to retry.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson

from worker import events as ev
from worker.config import asyncpg_dsn
from worker.errors import (
    DatabaseConflict,
    DatabaseError,
    DatabaseUnavailable,
    Rejection,
    TransientError,
)
from worker.events import Event


class SQL:
    """Every statement of the ingestion path, by name."""

    TEMPLATE_TENANTS: Final = """
        SELECT id::text, org_id::text, workspace_id::text
        FROM prompt_templates
        WHERE id = ANY($1::uuid[])
    """

    # INGEST inserts results ON CONFLICT (id) DO NOTHING: a repeated event is skipped, and
    # one inserted concurrently by another worker is waited for, then skipped. INGEST_FAST
    # is the same statement with a plain INSERT: about 15% faster (no speculative insertion,
    # see bench/README.md), but a single repeated event fails the whole statement with a
    # unique violation. The store runs INGEST_FAST while batches hold new events only, and
    # falls back to INGEST (for this batch and the next few) as soon as one does not.
    # (An anti-join, WHERE NOT EXISTS, was tried and rejected: its plan depends on table
    # statistics, and a generic plan made while the table was small seq-scans it forever.)
    # $1..$9: one row per collapsed version key, sorted by key (small: at most one per event).
    # $10..$16: one row per event, sorted by event_id: ids, the 1-based position of the
    # event's version key in $1..$9 (org, workspace and template come from there), the
    # text columns, occurred_at, and where its body sits in $17, every body concatenated.
    # Whole numbers and UUIDs travel as space-separated text and bodies as one bytea: asyncpg
    # spends ~0.25 us per array element on shape checks and regrows its buffer by ~1 KiB per
    # element past 64 KiB, so fewer, flatter parameters cost the worker far less CPU
    # (bench/README.md has the numbers).
    _INGEST_TEMPLATE: Final = """
        WITH version_rows AS (
            SELECT *
            FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                        $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
                 WITH ORDINALITY AS t(org_id, workspace_id, template_id, provider_version_key,
                                      provider, model_id, fingerprint_captured_at,
                                      first_seen_at, last_seen_at, ord)
        ),
        versions AS (
            INSERT INTO prompt_versions AS v
                (org_id, workspace_id, template_id, provider_version_key, provider, model_id,
                 fingerprint_captured_at, first_seen_at, last_seen_at)
            SELECT org_id, workspace_id, template_id, provider_version_key, provider, model_id,
                   fingerprint_captured_at, first_seen_at, last_seen_at
            FROM version_rows
            ORDER BY ord
            ON CONFLICT ON CONSTRAINT ux_versions_org_ws_tpl_pvk DO UPDATE SET
                first_seen_at = LEAST(v.first_seen_at, EXCLUDED.first_seen_at),
                last_seen_at = GREATEST(v.last_seen_at, EXCLUDED.last_seen_at),
                fingerprint_captured_at =
                    GREATEST(v.fingerprint_captured_at, EXCLUDED.fingerprint_captured_at),
                provider = CASE
                    WHEN (EXCLUDED.last_seen_at, EXCLUDED.provider, EXCLUDED.model_id)
                       > (v.last_seen_at, v.provider, v.model_id)
                    THEN EXCLUDED.provider ELSE v.provider END,
                model_id = CASE
                    WHEN (EXCLUDED.last_seen_at, EXCLUDED.provider, EXCLUDED.model_id)
                       > (v.last_seen_at, v.provider, v.model_id)
                    THEN EXCLUDED.model_id ELSE v.model_id END
            RETURNING v.id, v.org_id, v.workspace_id, v.template_id, v.provider_version_key
        ),
        version_ids AS (  -- the upserted ids, in the order of the key arrays
            SELECT array_agg(versions.id ORDER BY version_rows.ord) AS ids
            FROM version_rows
            JOIN versions
              ON versions.org_id = version_rows.org_id
             AND versions.workspace_id = version_rows.workspace_id
             AND versions.template_id = version_rows.template_id
             AND versions.provider_version_key = version_rows.provider_version_key
        ),
        results AS (
            INSERT INTO prompt_results
                (id, org_id, workspace_id, template_id, version_id, provider_version_key,
                 system_fingerprint, request, response, analysis_config, created_at)
            SELECT r.id,
                   ($1::uuid[])[r.version_index],
                   ($2::uuid[])[r.version_index],
                   ($3::uuid[])[r.version_index],
                   (SELECT ids FROM version_ids)[r.version_index],
                   r.provider_version_key, r.system_fingerprint,
                   d.doc -> 'request', d.doc -> 'response',
                   NULLIF(d.doc -> 'analysis_config', 'null'::jsonb), r.created_at
            FROM unnest(string_to_array($10, ' ')::uuid[], string_to_array($11, ' ')::int[],
                        $12::text[], $13::text[], $14::timestamptz[],
                        string_to_array($15, ' ')::int[], string_to_array($16, ' ')::int[])
                 AS r(id, version_index, provider_version_key, system_fingerprint, created_at,
                      body_start, body_length)
            -- OFFSET 0 keeps the subquery from being inlined: one parse per body, not three.
            CROSS JOIN LATERAL (
                SELECT convert_from(substring($17::bytea FROM r.body_start FOR r.body_length),
                                    'UTF8')::jsonb AS doc
                OFFSET 0
            ) AS d
            {results_guard}
            RETURNING id::text
        )
        {results_tail}
    """
    # Returns the ids inserted (the others were repeats).
    INGEST: Final = _INGEST_TEMPLATE.replace(
        "{results_guard}", "ON CONFLICT (id) DO NOTHING"
    ).replace("{results_tail}", "SELECT id FROM results")
    # Returns one row, the count: when it succeeds, every event was inserted.
    INGEST_FAST: Final = _INGEST_TEMPLATE.replace("{results_guard}", "").replace(
        "{results_tail}", "SELECT count(*) FROM results"
    )


class Outcome(enum.Enum):
    """What happened to one valid event."""

    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestResult:
    """One entry per input event, in input order: an :class:`Outcome` or a Rejection."""

    outcomes: list[Outcome | Rejection]

    @property
    def stored(self) -> int:
        return sum(1 for o in self.outcomes if o is Outcome.STORED)

    @property
    def duplicates(self) -> int:
        return sum(1 for o in self.outcomes if o is Outcome.DUPLICATE)

    @property
    def rejected(self) -> list[tuple[int, Rejection]]:
        return [(i, o) for i, o in enumerate(self.outcomes) if isinstance(o, Rejection)]


# --- the pool -----------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """Encode and decode json and jsonb with orjson on every pooled connection."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog", format="text"
        )


async def create_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 2,
    statement_cache_size: int = 100,
    command_timeout: float = 60.0,
    connect_timeout: float = 10.0,
) -> asyncpg.Pool:
    """An asyncpg pool for ingestion. ``statement_cache_size=0`` for PgBouncer (transaction
    mode). ``command_timeout`` bounds every statement, so a black-holed connection turns into
    a retryable error instead of a hang."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            asyncpg_dsn(database_url),
            min_size=min_size,
            max_size=max_size,
            statement_cache_size=statement_cache_size,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            init=init_connection,
            server_settings={"application_name": "prompter-worker"},
        )
    except Exception as exc:
        raise classify(exc) from exc
    return pool


# --- error classification ---------------------------------------------------------------

_UNAVAILABLE_STATES: Final = frozenset(
    {"57P01", "57P02", "57P03", "57P04", "57P05", "53300", "53100", "53200", "53400", "0A000"}
)
_CONFLICT_STATES: Final = frozenset({"40001", "40P01", "55P03", "57014", "55006"})
_DATA_CLASSES: Final = frozenset({"22", "23", "54"})


def is_data_error(exc: BaseException) -> bool:
    """The database refused the *data* (SQLSTATE class 22, 23 or 54): some event is at fault."""
    state = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, asyncpg.PostgresError)
        and isinstance(state, str)
        and state[:2] in _DATA_CLASSES
    )


def classify(exc: BaseException) -> TransientError:
    """Map a failure that is not the data's fault onto the transient branch of the tree.

    Connection loss, refusal and timeouts, server shutdown or startup, too many connections,
    resource exhaustion and a cached plan invalidated by a migration are
    :class:`DatabaseUnavailable`; deadlocks, serialization failures, lock and statement
    timeouts are :class:`DatabaseConflict`; anything else from PostgreSQL (a missing table or
    privilege) is :class:`DatabaseError`, retried like the others but logged as an error.
    """
    if isinstance(exc, TransientError):
        return exc
    state = getattr(exc, "sqlstate", None)
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, asyncpg.PostgresError) and isinstance(state, str):
        if state.startswith("08") or state in _UNAVAILABLE_STATES:
            return DatabaseUnavailable(f"[{state}] {message}")
        if state in _CONFLICT_STATES or state.startswith("40"):
            return DatabaseConflict(f"[{state}] {message}")
        return DatabaseError(f"[{state}] {message}")
    if isinstance(
        exc,
        (
            OSError,
            ConnectionError,
            TimeoutError,
            asyncio.TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ),
    ):
        return DatabaseUnavailable(message)
    return DatabaseError(message)


# --- ingestion --------------------------------------------------------------------------

#: After a batch held a repeated event, this many batches use INGEST before trying
#: INGEST_FAST again: replays of stored history then cost one failed attempt per 16 batches.
SAFE_BATCHES_AFTER_REPEAT: Final = 16


class Store:
    """Ingestion into PostgreSQL through a pool (or a single connection, for backfill)."""

    def __init__(self, pool: asyncpg.Pool, *, template_cache_size: int = 100_000) -> None:
        self.pool = pool
        self._tenants: dict[str, tuple[str, str]] = {}
        self._template_cache_size = template_cache_size
        self._safe_batches = 0

    async def ingest(self, events: Sequence[Event]) -> IngestResult:
        """Store a batch in one transaction; return one outcome per event, in order.

        Raises :class:`~worker.errors.TransientError` when the database, not the data,
        failed; nothing of the batch is then committed.
        """
        outcomes: list[Outcome | Rejection | None] = [None] * len(events)
        if not events:
            return IngestResult(outcomes=[])
        try:
            async with self.pool.acquire() as conn:
                await self._check_tenants(conn, events, outcomes)
                todo = self._first_occurrences(events, outcomes)
                if todo:
                    batch = [events[i] for i in todo]
                    try:
                        inserted = await self._insert(conn, batch)
                    except asyncpg.PostgresError as exc:
                        if not is_data_error(exc):
                            raise
                        async with conn.transaction():
                            await self._bisect(conn, events, todo, outcomes)
                    else:
                        for i in todo:
                            stored = events[i].event_id in inserted
                            outcomes[i] = Outcome.STORED if stored else Outcome.DUPLICATE
        except TransientError:
            raise
        except Exception as exc:
            if isinstance(exc, asyncpg.PostgresError) or _is_infrastructure(exc):
                raise classify(exc) from exc
            raise
        final: list[Outcome | Rejection] = []
        for o in outcomes:
            assert o is not None, "every event has an outcome"
            final.append(o)
        return IngestResult(outcomes=final)

    async def _insert(self, conn: asyncpg.Connection, batch: list[Event]) -> set[str]:
        """Run the batch, on the fast statement unless repeats were seen lately."""
        if self._safe_batches > 0:
            self._safe_batches -= 1
            return await _run(conn, batch, SQL.INGEST)
        try:
            inserted = await _run(conn, batch, SQL.INGEST_FAST)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "prompt_results_pkey":
                raise
        else:
            count = inserted.pop()
            assert count == str(len(batch)), (count, len(batch))
            return {e.event_id for e in batch}
        # A repeated event (a redelivery, a replay, another worker): nothing was written.
        self._safe_batches = SAFE_BATCHES_AFTER_REPEAT
        return await _run(conn, batch, SQL.INGEST)

    async def _check_tenants(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        outcomes: list[Outcome | Rejection | None],
    ) -> None:
        tenants = self._tenants
        unknown = {e.template_id for e in events if e.template_id not in tenants}
        if unknown:
            rows = await conn.fetch(SQL.TEMPLATE_TENANTS, list(unknown))
            if len(tenants) + len(rows) > self._template_cache_size:
                tenants.clear()
            for template_id, org_id, workspace_id in rows:
                tenants[template_id] = (org_id, workspace_id)
        for i, e in enumerate(events):
            owner = tenants.get(e.template_id)
            if owner is None:
                outcomes[i] = Rejection(
                    ev.UNKNOWN_TEMPLATE, f'"template_id" {e.template_id} is not a known template'
                )
            elif owner != (e.org_id, e.workspace_id):
                outcomes[i] = Rejection(
                    ev.TEMPLATE_TENANT_MISMATCH,
                    f'"template_id" {e.template_id} belongs to another org or workspace',
                )

    @staticmethod
    def _first_occurrences(
        events: Sequence[Event], outcomes: list[Outcome | Rejection | None]
    ) -> list[int]:
        """Indexes of the events to write; later repeats of an event_id are duplicates."""
        seen: set[str] = set()
        todo: list[int] = []
        for i, e in enumerate(events):
            if outcomes[i] is not None:
                continue
            if e.event_id in seen:
                outcomes[i] = Outcome.DUPLICATE
                continue
            seen.add(e.event_id)
            todo.append(i)
        return todo

    async def _bisect(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        todo: list[int],
        outcomes: list[Outcome | Rejection | None],
    ) -> None:
        """Find the events the database refuses, under savepoints; store the rest."""
        try:
            async with conn.transaction():  # a savepoint inside the batch's transaction
                inserted = await _run(conn, [events[i] for i in todo], SQL.INGEST)
        except asyncpg.PostgresError as exc:
            if not is_data_error(exc):
                raise
            if len(todo) == 1:
                outcomes[todo[0]] = _rejection_for(exc)
                return
            middle = len(todo) // 2
            await self._bisect(conn, events, todo[:middle], outcomes)
            await self._bisect(conn, events, todo[middle:], outcomes)
            return
        for i in todo:
            outcomes[i] = Outcome.STORED if events[i].event_id in inserted else Outcome.DUPLICATE


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (
            OSError,
            ConnectionError,
            TimeoutError,
            asyncio.TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ),
    )


def _rejection_for(exc: asyncpg.PostgresError) -> Rejection:
    state = exc.sqlstate
    if state == "23503":  # foreign_key_violation: the template went away under us
        return Rejection(ev.UNKNOWN_TEMPLATE, '"template_id" no longer exists')
    # The message only (never DETAIL, which may quote the payload).
    return Rejection(ev.UNSTORABLE_CONTENT, f"PostgreSQL refused the event [{state}]: {exc}")


def _collapse(
    batch: Sequence[Event],
) -> list[tuple[str, str, str, str, str, str, datetime | None, datetime, datetime]]:
    """One row per version key, sorted by key: (key..., provider, model_id, captured, first,
    last). provider/model_id come from the greatest (occurred_at, provider, model_id)."""
    groups: dict[tuple[str, str, str, str], list[Any]] = {}
    for e in batch:
        key = (e.org_id, e.workspace_id, e.template_id, e.provider_version_key)
        at = e.occurred_at
        g = groups.get(key)
        if g is None:
            groups[key] = [e.fingerprint_captured_at, at, at, (at, e.provider, e.model_id)]
            continue
        captured = e.fingerprint_captured_at
        if captured is not None and (g[0] is None or captured > g[0]):
            g[0] = captured
        g[1] = min(g[1], at)
        g[2] = max(g[2], at)
        newest = (at, e.provider, e.model_id)
        g[3] = max(g[3], newest)
    return [(*key, g[3][1], g[3][2], g[0], g[1], g[2]) for key, g in sorted(groups.items())]


async def _run(conn: asyncpg.Connection, batch: list[Event], statement: str) -> set[str]:
    """Run an ingest statement for ``batch``; the set of event_ids actually inserted."""
    versions = _collapse(batch)
    position = {v[:4]: i for i, v in enumerate(versions, start=1)}
    rows = sorted(batch, key=_by_id)
    lengths = [len(e.body) for e in rows]
    starts = list(itertools.accumulate(lengths[:-1], initial=1))  # 1-based, for substring
    records = await conn.fetch(
        statement,
        [v[0] for v in versions],
        [v[1] for v in versions],
        [v[2] for v in versions],
        [v[3] for v in versions],
        [v[4] for v in versions],
        [v[5] for v in versions],
        [v[6] for v in versions],
        [v[7] for v in versions],
        [v[8] for v in versions],
        " ".join([e.event_id for e in rows]),
        " ".join([str(position[e.version_key]) for e in rows]),
        [e.provider_version_key for e in rows],
        [e.system_fingerprint for e in rows],
        [e.occurred_at for e in rows],
        " ".join(map(str, starts)),
        " ".join(map(str, lengths)),
        b"".join([e.body for e in rows]),
    )
    return {str(r[0]) for r in records}


def _by_id(e: Event) -> str:
    return e.event_id
