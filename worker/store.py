"""PostgreSQL: the asyncpg pool and every SQL statement of ingestion, each named.

:meth:`Store.ingest` turns a batch of valid events into rows in ONE transaction of
set-based SQL (COPY, or arrays through ``unnest``), whatever the batch size:

1. the templates of the batch are checked for tenancy (a cache of ``id -> (org, workspace)``
   saves the round trip for templates already seen: those columns never change);
2. events sharing a version key are collapsed in Python (a multi-row upsert may not touch a
   row twice), and the keys are sorted, so concurrent workers lock rows in the same order;
3. version keys not seen before are inserted, the results are written, rows sorted by id
   (again: one lock order for all), and the existing version rows are merged, last.

The results are written one of three ways, each a single statement for the whole batch:
COPY, when every body is compact JSON as orjson writes it (the decoder then kept the exact
text of ``request``, ``response`` and ``analysis_config``: see
:func:`worker.events.exact_columns`), which spares PostgreSQL parsing the rest of each
body and inserts like COPY does; otherwise a plain ``INSERT ... SELECT`` from arrays that
parses each whole body; and, for a while after a batch held an event already stored,
``INSERT ... ON CONFLICT (id) DO NOTHING``, since a repeated id fails the other two.

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
import contextlib
import enum
import itertools
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import asyncpg
import orjson

from worker import events as ev
from worker.config import Settings, asyncpg_dsn, mask_url
from worker.errors import (
    DatabaseConflict,
    DatabaseError,
    DatabaseUnavailable,
    Rejection,
    TransientError,
)
from worker.events import Event, JsonColumns


class SQL:
    """Every statement of the ingestion path, by name."""

    TEMPLATE_TENANTS: Final = """
        SELECT id::text, org_id::text, workspace_id::text
        FROM prompt_templates
        WHERE id = ANY($1::uuid[])
    """

    # Version keys whose id is not cached yet: inserted with the batch's values if new, with
    # ON CONFLICT DO NOTHING, which never locks an existing row (a key inserted concurrently
    # and not yet committed is waited for). $1..$9: one row per key, sorted by key.
    INSERT_VERSIONS: Final = """
        INSERT INTO prompt_versions AS v
            (org_id, workspace_id, template_id, provider_version_key, provider, model_id,
             fingerprint_captured_at, first_seen_at, last_seen_at)
        SELECT org_id, workspace_id, template_id, provider_version_key, provider, model_id,
               fingerprint_captured_at, first_seen_at, last_seen_at
        FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                    $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
             WITH ORDINALITY AS t(org_id, workspace_id, template_id, provider_version_key,
                                  provider, model_id, fingerprint_captured_at,
                                  first_seen_at, last_seen_at, ord)
        ORDER BY ord
        ON CONFLICT ON CONSTRAINT ux_versions_org_ws_tpl_pvk DO NOTHING
        RETURNING v.id::text, v.org_id::text, v.workspace_id::text, v.template_id::text,
                  v.provider_version_key
    """
    # The ids of keys that already existed (a new statement: it sees every row committed
    # before it, including one the INSERT above waited for). Through the unique index.
    VERSION_IDS: Final = """
        SELECT v.id::text, v.org_id::text, v.workspace_id::text, v.template_id::text,
               v.provider_version_key
        FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[])
             AS k(org_id, workspace_id, template_id, provider_version_key)
        JOIN prompt_versions v USING (org_id, workspace_id, template_id, provider_version_key)
    """

    # Existing version rows: merged LAST in the transaction, so their row locks are held
    # only until the commit that follows, and a concurrent batch on the same keys writes its
    # results meanwhile (the results' foreign-key checks take KEY SHARE locks, which do not
    # conflict with these). Rows the batch would not change are not touched at all (every
    # field only ever moves one way, so skipping on a stale snapshot is safe).
    # Its subquery locks the rows to change in id order: every transaction takes its locks
    # in one order (new version keys by key, results by id, existing version rows by id), so
    # workers never deadlock each other. (A plain UPDATE ... FROM locks in the order of its
    # plan's scan; two of them deadlocked within seconds with four connections.)
    # $1..$6: one row per key, sorted by version id.
    _CHANGES_SOURCE: Final = """
        unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
               $6::timestamptz[])
        AS u(id, provider, model_id, fingerprint_captured_at, first_seen_at, last_seen_at)
    """
    _CHANGES_NEEDED: Final = """
        v.id = u.id
        AND (u.first_seen_at < v.first_seen_at
             OR u.last_seen_at > v.last_seen_at
             OR (u.fingerprint_captured_at IS NOT NULL
                 AND (v.fingerprint_captured_at IS NULL
                      OR u.fingerprint_captured_at > v.fingerprint_captured_at))
             OR (u.last_seen_at, u.provider, u.model_id)
              > (v.last_seen_at, v.provider, v.model_id))
    """
    MERGE_VERSIONS: Final = f"""
        UPDATE prompt_versions AS v SET
            first_seen_at = LEAST(v.first_seen_at, l.first_seen_at),
            last_seen_at = GREATEST(v.last_seen_at, l.last_seen_at),
            fingerprint_captured_at =
                GREATEST(v.fingerprint_captured_at, l.fingerprint_captured_at),
            provider = CASE
                WHEN (l.last_seen_at, l.provider, l.model_id)
                   > (v.last_seen_at, v.provider, v.model_id)
                THEN l.provider ELSE v.provider END,
            model_id = CASE
                WHEN (l.last_seen_at, l.provider, l.model_id)
                   > (v.last_seen_at, v.provider, v.model_id)
                THEN l.model_id ELSE v.model_id END
        FROM (
            SELECT v.id, u.provider, u.model_id, u.fingerprint_captured_at,
                   u.first_seen_at, u.last_seen_at
            FROM prompt_versions AS v, {_CHANGES_SOURCE}
            WHERE {_CHANGES_NEEDED}
            ORDER BY v.id
            FOR NO KEY UPDATE OF v  -- locked in id order, before any row is updated
        ) AS l
        WHERE v.id = l.id
    """

    # The results, for batches that cannot be COPYed (a body not in compact form) or may
    # hold repeats. INSERT_RESULTS skips a repeated event ON CONFLICT (id) DO NOTHING (one
    # inserted concurrently by another worker is waited for, then skipped) and returns the
    # ids it inserted. INSERT_RESULTS_FAST is a plain INSERT: about 15% faster (no
    # speculative insertion, see bench/README.md), but one repeated event fails it with a
    # unique violation, as it fails COPY; the store uses either while batches hold new
    # events only.
    # (An anti-join, WHERE NOT EXISTS, was tried and rejected: its plan depends on table
    # statistics, and a generic plan made while the table was small seq-scans it forever.)
    # $1..$4: per version key (org, workspace, template, version id); $5..$9: one row per
    # event, sorted by event_id: id, the 1-based position of its key in $1..$4,
    # occurred_at (as Python parsed it, the same value the version row got), and where its
    # body sits in $10, every body concatenated. The text columns come from the body, as
    # PostgreSQL parses it (the same value as the decoder's: duplicate keys, last wins).
    # Whole numbers and UUIDs travel as space-separated text and bodies as one bytea:
    # asyncpg spends ~0.25 us per array element on shape checks and regrows its buffer by
    # ~1 KiB per element past 64 KiB, so fewer, flatter parameters cost the worker far less
    # CPU (bench/README.md has the numbers).
    _RESULTS_TEMPLATE: Final = """
        INSERT INTO prompt_results
            (id, org_id, workspace_id, template_id, version_id, provider_version_key,
             system_fingerprint, request, response, analysis_config, created_at)
        SELECT r.id,
               ($1::uuid[])[r.k], ($2::uuid[])[r.k], ($3::uuid[])[r.k], ($4::uuid[])[r.k],
               d.doc ->> 'provider_version_key', d.doc ->> 'system_fingerprint',
               d.doc -> 'request', d.doc -> 'response',
               NULLIF(d.doc -> 'analysis_config', 'null'::jsonb), r.created_at
        FROM unnest(string_to_array($5, ' ')::uuid[], string_to_array($6, ' ')::int[],
                    $7::timestamptz[], string_to_array($8, ' ')::int[],
                    string_to_array($9, ' ')::int[])
             AS r(id, k, created_at, body_start, body_length)
        -- OFFSET 0 keeps the subquery from being inlined: one parse per body, not five.
        CROSS JOIN LATERAL (
            SELECT convert_from(substring($10::bytea FROM r.body_start FOR r.body_length),
                                'UTF8')::jsonb AS doc
            OFFSET 0
        ) AS d
    """
    INSERT_RESULTS: Final = (
        _RESULTS_TEMPLATE + "        ON CONFLICT (id) DO NOTHING\n        RETURNING id::text\n"
    )
    INSERT_RESULTS_FAST: Final = _RESULTS_TEMPLATE


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


#: The first byte of jsonb's binary form: its format version.
_JSONB_VERSION: Final = b"\x01"


def _encode_jsonb(value: Any) -> bytes:
    return _JSONB_VERSION + orjson.dumps(value)


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(memoryview(data)[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    """Encode and decode json and jsonb with orjson on every pooled connection.

    In the binary format (JSON text, after a version byte for jsonb), which COPY requires;
    a value wrapped in :class:`orjson.Fragment` travels as the JSON text it already is.
    """
    await conn.set_type_codec(
        "json", encoder=orjson.dumps, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )


async def _on_release(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool beyond what asyncpg always
    does first (roll back a transaction left open): ingestion keeps no session state (no
    SET, LISTEN, cursors or advisory locks), and the default reset query would cost a
    round trip per batch."""


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
            reset=_on_release,
            server_settings={"application_name": "prompter-worker"},
        )
    except Exception as exc:
        raise classify(exc) from exc
    return pool


@contextlib.asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection outside a pool, for the commands other than ``run``: the pool's
    codecs and statement-cache setting. Raises :class:`DatabaseUnavailable` naming the
    server (password masked) when it cannot connect."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            asyncpg_dsn(settings.database_url),
            timeout=10,
            statement_cache_size=settings.statement_cache_size,
        )
    except Exception as exc:
        raise unreachable(settings.database_url, classify(exc)) from None
    try:
        await init_connection(conn)
        yield conn
    finally:
        await conn.close()


def unreachable(database_url: str, reason: BaseException) -> DatabaseUnavailable:
    """The error for a database that cannot be reached."""
    return DatabaseUnavailable(f"cannot reach PostgreSQL at {mask_url(database_url)}: {reason}")


# --- error classification ---------------------------------------------------------------

_UNAVAILABLE_STATES: Final = frozenset(
    {"57P01", "57P02", "57P03", "57P04", "57P05", "53300", "53100", "53200", "53400", "0A000"}
)
_CONFLICT_STATES: Final = frozenset({"40001", "40P01", "55P03", "57014", "55006"})
_DATA_CLASSES: Final = frozenset({"22", "23", "54"})
# Failures of the connection itself rather than of a statement.
_INFRASTRUCTURE: Final = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


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
    if isinstance(exc, _INFRASTRUCTURE):
        return DatabaseUnavailable(message)
    return DatabaseError(message)


#: The first retry waits about this long; each next one twice as long (see :func:`backoff`).
BACKOFF_BASE_SECONDS: Final = 0.1


def backoff(attempt: int, cap: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0, 1, 2, ...) of a transient
    fault: exponential, ~0.1, 0.2, 0.4 ... capped at ``cap``, times a jitter of 0.5-1."""
    delay: float = min(cap, BACKOFF_BASE_SECONDS * 2.0 ** min(attempt, 30))
    return delay * random.uniform(0.5, 1.0)


# --- ingestion --------------------------------------------------------------------------

#: The columns of ``prompt_results`` a batch writes, in the order of COPY's records.
RESULT_COLUMNS: Final = (
    "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
    "system_fingerprint", "request", "response", "analysis_config", "created_at",
)  # fmt: skip

#: After a batch held a repeated event, this many batches use INSERT_RESULTS before trying
#: COPY or INSERT_RESULTS_FAST again: replaying stored history costs one failed attempt
#: per 16.
SAFE_BATCHES_AFTER_REPEAT: Final = 16
VersionKey = tuple[str, str, str, str]


class Store:
    """Ingestion into PostgreSQL through a pool.

    It caches what never changes: a template's tenancy (``id -> (org, workspace)``) and a
    version key's row id. Both caches are bounded and only ever hold committed rows.
    """

    def __init__(self, pool: asyncpg.Pool, *, cache_size: int = 100_000) -> None:
        self.pool = pool
        self._tenants: dict[str, tuple[str, str]] = {}
        self._versions: dict[VersionKey, str] = {}
        self._cache_size = cache_size
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
                    await self._ingest(conn, events, todo, outcomes)
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

    async def _ingest(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        todo: list[int],
        outcomes: list[Outcome | Rejection | None],
    ) -> None:
        batch = [events[i] for i in todo]
        for attempt in range(3):
            fast = self._safe_batches == 0
            self._safe_batches = max(self._safe_batches - 1, 0)
            try:
                async with conn.transaction():
                    inserted, learned = await self._write(conn, batch, fast=fast)
            except asyncpg.UniqueViolationError as exc:
                if not fast or exc.constraint_name != "prompt_results_pkey":
                    raise
                # A repeated event (a redelivery, a replay, another worker): run it again
                # with the statement that skips repeats.
                self._safe_batches = SAFE_BATCHES_AFTER_REPEAT
                continue
            except asyncpg.ForeignKeyViolationError as exc:
                if exc.constraint_name != "prompt_results_version_id_fkey" or attempt:
                    if not is_data_error(exc):
                        raise
                    break
                # A cached version id whose row was deleted by someone: forget them all.
                self._versions.clear()
                continue
            except asyncpg.PostgresError as exc:
                if not is_data_error(exc):
                    raise
                break
            self._remember(learned)
            for i in todo:
                stored = inserted is None or events[i].event_id in inserted
                outcomes[i] = Outcome.STORED if stored else Outcome.DUPLICATE
            return
        # The database refused the data of some event: find which, store the rest.
        learned = {}
        async with conn.transaction():
            await self._bisect(conn, events, todo, outcomes, learned)
        self._remember(learned)

    async def _write(
        self,
        conn: asyncpg.Connection,
        batch: list[Event],
        *,
        fast: bool,
        pending: dict[VersionKey, str] | None = None,
    ) -> tuple[set[str] | None, dict[VersionKey, str]]:
        """The three statements of a batch, inside the caller's transaction or savepoint:
        upsert new version keys, insert the results, merge the known version keys.

        Returns the ids inserted (None: all of them) and the version ids learned (applied
        to the cache by the caller, only once the transaction has committed; ``pending``
        holds those learned earlier in the same, uncommitted transaction).
        """
        merged = _collapse(batch)
        cache = self._versions
        if pending:
            cache = _Overlay(cache, pending)
        uncached = [m for m in merged if m[:4] not in cache]
        ids = {m[:4]: cache[m[:4]] for m in merged if m[:4] in cache}
        learned: dict[VersionKey, str] = {}
        fresh: set[VersionKey] = set()
        if uncached:
            for vid, org, ws, tpl, pvk in await conn.fetch(
                SQL.INSERT_VERSIONS, *([m[j] for m in uncached] for j in range(9))
            ):
                learned[(org, ws, tpl, pvk)] = vid
            fresh = set(learned)
            existing = [m for m in uncached if m[:4] not in fresh]
            if existing:
                for vid, org, ws, tpl, pvk in await conn.fetch(
                    SQL.VERSION_IDS, *([m[j] for m in existing] for j in range(4))
                ):
                    learned[(org, ws, tpl, pvk)] = vid
            ids.update(learned)
            if len(ids) < len(merged):  # a row deleted between the two statements
                raise DatabaseConflict("a version row vanished while being resolved; retrying")
        inserted = await self._insert_results(conn, batch, ids, fast=fast)
        merge = sorted((m for m in merged if m[:4] not in fresh), key=lambda m: ids[m[:4]])
        if merge:
            args = ([ids[m[:4]] for m in merge], *([m[j] for m in merge] for j in range(4, 9)))
            await conn.execute(SQL.MERGE_VERSIONS, *args)
        return inserted, learned

    async def _insert_results(
        self,
        conn: asyncpg.Connection,
        batch: list[Event],
        ids: dict[VersionKey, str],
        *,
        fast: bool,
    ) -> set[str] | None:
        """Insert the result rows (``ids``: the version id of every key of the batch);
        the ids inserted, or None for all of them."""
        rows = sorted(batch, key=_by_id)
        texts = [e.columns for e in rows]
        if fast and None not in texts:
            records = _copy_records(rows, cast(list[JsonColumns], texts), ids)
            await conn.copy_records_to_table(
                "prompt_results", records=records, columns=RESULT_COLUMNS
            )
            return None
        keys = list(ids)
        position = {key: k for k, key in enumerate(keys, start=1)}
        lengths = [len(e.body) for e in rows]
        args = (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [ids[k] for k in keys],
            " ".join([e.event_id for e in rows]),
            " ".join([str(position[e.version_key]) for e in rows]),
            [e.occurred_at for e in rows],
            " ".join(map(str, itertools.accumulate(lengths[:-1], initial=1))),
            " ".join(map(str, lengths)),
            b"".join([e.body for e in rows]),
        )
        if fast:
            await conn.execute(SQL.INSERT_RESULTS_FAST, *args)
            return None
        return {r[0] for r in await conn.fetch(SQL.INSERT_RESULTS, *args)}

    def _remember(self, learned: dict[VersionKey, str]) -> None:
        if len(self._versions) + len(learned) > self._cache_size:
            self._versions.clear()
        self._versions.update(learned)

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
            if len(tenants) + len(rows) > self._cache_size:
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
        learned: dict[VersionKey, str],
    ) -> None:
        """Find the events the database refuses, under savepoints; store the rest."""
        try:
            async with conn.transaction():  # a savepoint inside the batch's transaction
                inserted, found = await self._write(
                    conn, [events[i] for i in todo], fast=False, pending=learned
                )
        except asyncpg.PostgresError as exc:
            if not is_data_error(exc):
                raise
            if len(todo) == 1:
                outcomes[todo[0]] = _rejection_for(exc)
                return
            middle = len(todo) // 2
            await self._bisect(conn, events, todo[:middle], outcomes, learned)
            await self._bisect(conn, events, todo[middle:], outcomes, learned)
            return
        learned.update(found)  # visible to the later savepoints of this transaction
        assert inserted is not None
        for i in todo:
            outcomes[i] = Outcome.STORED if events[i].event_id in inserted else Outcome.DUPLICATE


class _Overlay(dict[VersionKey, str]):
    """The cache seen through the ids learned in an uncommitted transaction."""

    def __init__(self, base: dict[VersionKey, str], top: dict[VersionKey, str]) -> None:
        super().__init__(top)
        self._base = base

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or key in self._base

    def __getitem__(self, key: VersionKey) -> str:
        if super().__contains__(key):
            return super().__getitem__(key)
        return self._base[key]


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, _INFRASTRUCTURE)


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


def _by_id(e: Event) -> str:
    return e.event_id


def _copy_records(
    rows: list[Event], texts: list[JsonColumns], ids: dict[VersionKey, str]
) -> Iterator[tuple[Any, ...]]:
    """COPY's records (``texts``: each event's ``columns``): the JSON values travel as the
    exact text they have in the body (:class:`orjson.Fragment`), parsed once, by jsonb.

    A generator: asyncpg sends every 512 KiB as it goes, so building the later records
    overlaps with the server storing the first ones."""
    fragment = orjson.Fragment
    for e, (request, response, analysis) in zip(rows, texts, strict=True):
        yield (
            e.event_id,
            e.org_id,
            e.workspace_id,
            e.template_id,
            ids[e.version_key],
            e.provider_version_key,
            e.system_fingerprint,
            fragment(request),
            fragment(response),
            None if analysis is None else fragment(analysis),
            e.occurred_at,
        )
