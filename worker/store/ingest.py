"""PostgreSQL: the asyncpg pool and every SQL statement of ingestion, each named.

:meth:`Store.ingest` turns a batch of valid events into rows in ONE transaction of
set-based SQL (COPY, or arrays through ``unnest``), whatever the batch size:

1. the templates of the batch are checked for tenancy (a cache of ``id -> (org, workspace)``
   saves the round trip for templates already seen: those columns never change);
2. the events to write are known before anything is written: either the batch is taken to
   be new (the fast path: COPY or a plain INSERT fails on an id already stored), or the ids
   already stored are looked up first and those events only compared with the stored rows;
3. events sharing a version key are collapsed in Python (a multi-row upsert may not touch a
   row twice), and the keys are sorted, so concurrent workers lock rows in the same order;
4. version keys not seen before are inserted, the results are written, rows sorted by id
   (again: one lock order for all), and the existing version rows are merged, last.

So a version row only ever hears of the events whose result rows the same transaction
inserted: a repeated ``event_id`` never touches ``prompt_versions``. A repeat with the same
content is :attr:`Outcome.DUPLICATE`; one whose content differs from the stored row is
rejected as ``conflicting_duplicate``, naming the columns that differ (for another tenant's
row, none: only that the id belongs to another org or workspace). The first stored copy
always wins. Copies of one id within a batch are written in rounds (first copies, then
second copies, ...) in the same transaction, so a later copy is judged against the first
exactly as a copy in a later batch is.

The results are written one of three ways, each a single statement for the whole batch:
COPY, when every body is compact JSON as orjson writes it (the decoder then kept the exact
text of ``request``, ``response`` and ``analysis_config``: see
:func:`worker.events.exact_columns`), which spares PostgreSQL parsing the rest of each
body and inserts like COPY does; otherwise a plain ``INSERT ... SELECT`` from arrays that
parses each whole body; and, while bisecting or after a race, ``INSERT ... ON CONFLICT
(id) DO NOTHING RETURNING id``. A batch taken to be new that holds a stored id fails with a
unique violation; it is then redone with the look-up first, and so are the next
:data:`SAFE_BATCHES_AFTER_REPEAT` batches. An id stored by another worker between the
look-up and the insert fails the insert the same way: the transaction is then redone under
a savepoint per round with ``ON CONFLICT``, and a savepoint whose insert skipped an id is
rolled back and redone, its look-up now seeing that row.

The version row is a pure function of the *set* of stored events: first_seen = least,
last_seen = greatest, fingerprint_captured_at = greatest non-null, provider and model_id from
the event with the greatest ``(occurred_at, provider, model_id)``, strings compared by
code point (Python's ``str`` order, which is UTF-8 byte order, and ``COLLATE "C"`` in SQL),
so ties resolve the same in every database collation. Every one of these is an
associative, commutative maximum or minimum, so batches may arrive in any order, any number
of times, and converge.

If PostgreSQL refuses the batch for a *data* error (SQLSTATE classes 22, 23, 54), or asyncpg
cannot encode a value of it (an ``OverflowError`` for a timestamp beyond year 9999 in UTC,
say), the batch is bisected under savepoints until the offending events are found; they are
rejected and the rest is stored, still in one transaction. (Its halves take their locks
half by half, out of the one order: a concurrent batch on the same rows may then deadlock
with it. PostgreSQL breaks the cycle, and the batch it aborts is retried like any other
:class:`~worker.errors.DatabaseConflict`.) Every other failure is a
:class:`~worker.errors.TransientError` and the whole batch is left to the caller to retry.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, cast

import asyncpg
import orjson

from worker import events as ev
from worker import tracing
from worker.errors import (
    DatabaseConflict,
    Rejection,
    TransientError,
)
from worker.events import Event, JsonColumns
from worker.store.classify import classify, is_data_error, is_infrastructure
from worker.store.sql import SQL

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


class Outcome(enum.Enum):
    """What happened to one valid event: stored, or a duplicate of a stored event with the
    same content (one with other content is a Rejection, ``conflicting_duplicate``)."""

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


# --- ingestion --------------------------------------------------------------------------

#: The columns of ``prompt_results`` a batch writes, in the order of COPY's records.
RESULT_COLUMNS: Final = (
    "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
    "system_fingerprint", "request", "response", "analysis_config", "created_at",
)  # fmt: skip

#: After a batch held a repeated event, this many batches look their ids up before writing
#: instead of taking them to be new: replaying stored history costs one failed attempt per
#: 16 batches, and a look-up per batch.
SAFE_BATCHES_AFTER_REPEAT: Final = 16
RESULTS_PRIMARY_KEY: Final = "prompt_results_pkey"
VersionKey = tuple[str, str, str, str]
#: Where the outcomes of one attempt are kept until its transaction commits.
Settled = dict[int, Outcome | Rejection]


class Store:
    """Ingestion into PostgreSQL through a pool.

    It caches what never changes: a template's tenancy (``id -> (org, workspace)``) and a
    version key's row id. Both caches are bounded and only ever hold committed rows.
    """

    def __init__(
        self, pool: asyncpg.Pool, *, cache_size: int = 100_000, tracer: Tracer | None = None
    ) -> None:
        self.pool = pool
        self.tracer = tracer  # None: no spans (tracing off)
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
            with tracing.span(self.tracer, tracing.INGEST, {"prompter.events": len(events)}):
                return await self._ingest_batch(events, outcomes)
        except TransientError:
            raise
        except Exception as exc:
            if isinstance(exc, asyncpg.PostgresError) or is_infrastructure(exc):
                raise classify(exc) from exc
            raise

    async def _ingest_batch(
        self, events: Sequence[Event], outcomes: list[Outcome | Rejection | None]
    ) -> IngestResult:
        async with self.pool.acquire() as conn:
            await self._check_tenants(conn, events, outcomes)
            rounds = self._rounds(events, outcomes)
            if rounds:
                await self._ingest(conn, events, rounds, outcomes)
        final: list[Outcome | Rejection] = []
        for o in outcomes:
            assert o is not None, "every event has an outcome"
            final.append(o)
        return IngestResult(outcomes=final)

    async def _ingest(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        rounds: list[list[int]],
        outcomes: list[Outcome | Rejection | None],
    ) -> None:
        """The batch's transaction, redone until it commits, each time more cautiously.

        The first attempt takes the batch to be new (unless a repeat was seen lately), the
        next looks its ids up first; if another worker stores one of them between look-up
        and insert, the next writes under savepoints, skipping stored ids, and redoes a
        savepoint that skipped one (the skipped ids are committed by then, so each redo
        settles them for good: no livelock). After a data error, the batch is bisected.
        """
        mode = _Mode.FAST if self._safe_batches == 0 else _Mode.CHECKED
        self._safe_batches = max(self._safe_batches - 1, 0)
        forgot_versions = False
        while True:
            settled: Settled = {}
            learned: dict[VersionKey, str] = {}
            try:
                with self._traced("transaction", mode.name.lower()):
                    async with conn.transaction():
                        for n, todo in enumerate(rounds):
                            if mode is _Mode.BISECT:
                                await self._bisect(conn, events, todo, settled, learned)
                            elif mode is _Mode.CAREFUL:
                                await self._careful(conn, events, todo, settled, learned)
                            else:
                                fast = mode is _Mode.FAST and n == 0
                                await self._round(conn, events, todo, settled, learned, fast=fast)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != RESULTS_PRIMARY_KEY or mode not in _TAKES_NEW:
                    raise
                # FAST: a repeated event it did not look for (a redelivery, a replay): look
                # from now on. CHECKED: another worker stored an id since the look-up.
                self._safe_batches = SAFE_BATCHES_AFTER_REPEAT
                mode = _Mode.CHECKED if mode is _Mode.FAST else _Mode.CAREFUL
                continue
            except asyncpg.ForeignKeyViolationError as exc:
                if (
                    exc.constraint_name == "prompt_results_version_id_fkey"
                    and not forgot_versions
                    and mode is not _Mode.BISECT
                ):
                    # A cached version id whose row was deleted by someone: forget them all.
                    self._versions.clear()
                    forgot_versions = True
                    continue
                if mode is _Mode.BISECT or not is_data_error(exc):
                    raise
                mode = _Mode.BISECT
                continue
            except Exception as exc:
                if mode is _Mode.BISECT or not _is_data_fault(exc):
                    raise
                # The database refused the data of some event: find which, store the rest.
                mode = _Mode.BISECT
                continue
            for i, outcome in settled.items():
                outcomes[i] = outcome
            self._remember(learned)
            return

    async def _round(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        todo: list[int],
        settled: Settled,
        learned: dict[VersionKey, str],
        *,
        fast: bool,
    ) -> None:
        """Write the events ``todo`` (distinct event ids) in the caller's transaction with
        COPY or a plain INSERT, which fail on a stored id: all of them if ``fast``, else
        those not stored when looked up (the stored ones are settled)."""
        if not fast:
            todo = await self._settle_stored(conn, events, todo, settled)
            if not todo:
                return
        _, found = await self._write(conn, [events[i] for i in todo], fast=True, pending=learned)
        learned.update(found)
        for i in todo:
            settled[i] = Outcome.STORED

    async def _careful(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        todo: list[int],
        settled: Settled,
        learned: dict[VersionKey, str],
    ) -> None:
        """Settle the stored events of ``todo`` and write the others under a savepoint,
        skipping (ON CONFLICT) any id stored meanwhile; if one was skipped, the versions
        counted it: roll the savepoint back and do it again, the id now being stored.

        Each redo settles at least the ids the last one skipped, so there are at most
        ``len(todo)`` of them; past that something else is wrong, and the caller retries.
        """
        for _ in range(len(todo) + 1):
            mine: Settled = {}
            found: dict[VersionKey, str] = {}
            try:
                async with conn.transaction():  # a savepoint inside the batch's transaction
                    new = await self._settle_stored(conn, events, todo, mine)
                    if new:
                        batch = [events[i] for i in new]
                        inserted, found = await self._write(
                            conn, batch, fast=False, pending=learned
                        )
                        if inserted != {e.event_id for e in batch}:
                            raise _Raced
                        mine.update(dict.fromkeys(new, Outcome.STORED))
            except _Raced:
                continue
            learned.update(found)  # visible to the later savepoints of this transaction
            settled.update(mine)
            return
        raise DatabaseConflict("event ids kept being skipped as stored yet not found; retrying")

    async def _settle_stored(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        todo: list[int],
        settled: Settled,
    ) -> list[int]:
        """Settle the events of ``todo`` whose id is stored already (a duplicate, or a
        conflicting duplicate); the others, still to write."""
        with _encoding():
            ids = " ".join([events[i].event_id for i in todo])
            with self._sql("STORED_IDS"):
                rows = await conn.fetch(SQL.STORED_IDS, ids)
        if not rows:
            return todo
        stored = {r[0] for r in rows}
        repeats = [i for i in todo if events[i].event_id in stored]
        with self._sql("COMPARE_STORED"):
            verdicts = await self._compare(conn, [events[i] for i in repeats])
        for i in repeats:
            verdict = verdicts.get(events[i].event_id)
            if verdict is None:  # deleted by someone between the two statements
                raise DatabaseConflict("a result row vanished while being compared; retrying")
            settled[i] = verdict
        return [i for i in todo if events[i].event_id not in stored]

    @staticmethod
    async def _compare(
        conn: asyncpg.Connection, repeats: list[Event]
    ) -> dict[str, Outcome | Rejection]:
        """Each repeat against its stored row: a duplicate, or a conflicting duplicate."""
        rows = sorted(repeats, key=_by_id)
        lengths = [len(e.body) for e in rows]
        with _encoding():
            found = await conn.fetch(
                SQL.COMPARE_STORED,
                " ".join([e.event_id for e in rows]),
                [e.org_id for e in rows],
                [e.workspace_id for e in rows],
                [e.template_id for e in rows],
                [e.provider_version_key for e in rows],
                [e.system_fingerprint for e in rows],
                [e.occurred_at for e in rows],
                " ".join(map(str, itertools.accumulate(lengths[:-1], initial=1))),
                " ".join(map(str, lengths)),
                b"".join([e.body for e in rows]),
            )
        verdicts: dict[str, Outcome | Rejection] = {}
        for event_id, other_tenant, differing in found:
            if other_tenant:
                verdicts[event_id] = Rejection(
                    ev.CONFLICTING_DUPLICATE,
                    '"event_id" is already stored for another org or workspace;'
                    " nothing of this copy was stored",
                )
            elif differing:
                names = ", ".join(f'"{name}"' for name in differing)
                verdicts[event_id] = Rejection(
                    ev.CONFLICTING_DUPLICATE,
                    f'"event_id" is already stored with another {names};'
                    " the stored copy is kept, nothing of this one was stored",
                )
            else:
                verdicts[event_id] = Outcome.DUPLICATE
        return verdicts

    async def _write(
        self,
        conn: asyncpg.Connection,
        batch: list[Event],
        *,
        fast: bool,
        pending: dict[VersionKey, str] | None = None,
    ) -> tuple[set[str] | None, dict[VersionKey, str]]:
        """The three statements of a batch of events to store (distinct ids, none stored as
        far as the caller knows), inside the caller's transaction or savepoint: upsert new
        version keys, insert the results, merge the known version keys.

        Returns the ids inserted (None: all of them) and the version ids learned (applied
        to the cache by the caller, only once the transaction has committed; ``pending``
        holds those learned earlier in the same, uncommitted transaction). With ``fast``
        False the results skip a stored id instead of failing: the caller must then check
        that every id was inserted, since the versions took every event into account.
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
            with _encoding(), self._sql("INSERT_VERSIONS"):
                rows = await conn.fetch(
                    SQL.INSERT_VERSIONS, *([m[j] for m in uncached] for j in range(9))
                )
            for vid, org, ws, tpl, pvk in rows:
                learned[(org, ws, tpl, pvk)] = vid
            fresh = set(learned)
            existing = [m for m in uncached if m[:4] not in fresh]
            if existing:
                with self._sql("VERSION_IDS"):
                    known = await conn.fetch(
                        SQL.VERSION_IDS, *([m[j] for m in existing] for j in range(4))
                    )
                for vid, org, ws, tpl, pvk in known:
                    learned[(org, ws, tpl, pvk)] = vid
            ids.update(learned)
            if len(ids) < len(merged):  # a row deleted between the two statements
                raise DatabaseConflict("a version row vanished while being resolved; retrying")
        with _encoding():
            inserted = await self._insert_results(conn, batch, ids, fast=fast)
        merge = sorted((m for m in merged if m[:4] not in fresh), key=lambda m: ids[m[:4]])
        if merge:
            args = ([ids[m[:4]] for m in merge], *([m[j] for m in merge] for j in range(4, 9)))
            with _encoding(), self._sql("MERGE_VERSIONS"):
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
            with self._sql("COPY_RESULTS"):
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
            with self._sql("INSERT_RESULTS_FAST"):
                await conn.execute(SQL.INSERT_RESULTS_FAST, *args)
            return None
        with self._sql("INSERT_RESULTS"):
            inserted = await conn.fetch(SQL.INSERT_RESULTS, *args)
        return {r[0] for r in inserted}

    def _sql(self, name: str) -> AbstractContextManager[object]:
        """The span of one named statement (:class:`SQL`), when tracing."""
        if self.tracer is None:
            return nullcontext()
        return tracing.span(
            self.tracer,
            tracing.SQL_PREFIX + name,
            {"db.system.name": "postgresql", "db.query.summary": name},
        )

    def _traced(self, name: str, mode: str) -> AbstractContextManager[object]:
        """The span of one attempt at the batch's transaction (BEGIN to COMMIT)."""
        if self.tracer is None:
            return nullcontext()
        return tracing.span(
            self.tracer,
            tracing.SQL_PREFIX + name,
            {"db.system.name": "postgresql", "prompter.mode": mode},
        )

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
            with self._sql("TEMPLATE_TENANTS"):
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
    def _rounds(
        events: Sequence[Event], outcomes: list[Outcome | Rejection | None]
    ) -> list[list[int]]:
        """Indexes of the events to write, in rounds of distinct event ids: the first copy
        of each id in the batch, then the second copies, and so on (nearly always one)."""
        copies: dict[str, int] = {}
        rounds: list[list[int]] = []
        for i, e in enumerate(events):
            if outcomes[i] is not None:
                continue
            n = copies.get(e.event_id, 0)
            copies[e.event_id] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(i)
        return rounds

    async def _bisect(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        todo: list[int],
        settled: Settled,
        learned: dict[VersionKey, str],
    ) -> None:
        """Find the events the database refuses, under savepoints; store the rest."""
        try:
            await self._careful(conn, events, todo, settled, learned)
        except Exception as exc:
            if not _is_data_fault(exc):
                raise
            if len(todo) == 1:
                settled[todo[0]] = _rejection_for(exc)
                return
            middle = len(todo) // 2
            await self._bisect(conn, events, todo[:middle], settled, learned)
            await self._bisect(conn, events, todo[middle:], settled, learned)


class _Mode(enum.Enum):
    """How an attempt at a batch's transaction writes its events (see Store._ingest)."""

    FAST = "take the events to be new"
    CHECKED = "look the ids up, then take the others to be new"
    CAREFUL = "look the ids up, then write under a savepoint skipping any stored meanwhile"
    BISECT = "careful, and split the batch under savepoints to find the data at fault"


_TAKES_NEW: Final = frozenset({_Mode.FAST, _Mode.CHECKED})


class _Raced(Exception):
    """An event id this transaction took to be new was stored by another one meanwhile."""


class _Unencodable(Exception):
    """asyncpg could not encode a value of the batch (``__cause__``): the data's fault."""


@contextlib.contextmanager
def _encoding() -> Iterator[None]:
    """Around a statement that sends the batch's values: what asyncpg raises while
    encoding them (an ``OverflowError`` for a timestamp beyond year 9999 in UTC inside
    COPY, the ``DataError`` it makes of one in a statement's arguments) is the data's
    fault, bisected like PostgreSQL's own refusals."""
    try:
        yield
    except (OverflowError, ValueError, TypeError) as exc:
        raise _Unencodable(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        cause = exc.__cause__
        if getattr(exc, "severity", None) is None and cause is not None:  # never sent
            raise _Unencodable(f"{type(cause).__name__}: {cause}") from exc
        raise


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


def _is_data_fault(exc: BaseException) -> bool:
    """Some event of the batch is at fault: PostgreSQL refused its data, or asyncpg could
    not encode it."""
    return isinstance(exc, _Unencodable) or is_data_error(exc)


def _rejection_for(exc: BaseException) -> Rejection:
    if isinstance(exc, _Unencodable):
        # The exception's type and message (a reason such as "date value out of range"),
        # never asyncpg's own message, which quotes the start of the value.
        return Rejection(
            ev.UNSTORABLE_CONTENT,
            f"a value of the event cannot be sent to PostgreSQL ({exc})"[:300],
        )
    state = getattr(exc, "sqlstate", None)
    if state == "23503":  # foreign_key_violation: the template went away under us
        return Rejection(ev.UNKNOWN_TEMPLATE, '"template_id" no longer exists')
    # The message only (never DETAIL, which may quote the payload).
    return Rejection(ev.UNSTORABLE_CONTENT, f"PostgreSQL refused the event [{state}]: {exc}")


def _collapse(
    batch: Sequence[Event],
) -> list[tuple[str, str, str, str, str, str, datetime | None, datetime, datetime]]:
    """One row per version key, sorted by key: (key..., provider, model_id, captured, first,
    last). provider/model_id come from the greatest (occurred_at, provider, model_id), the
    strings compared as Python does, by code point: UTF-8 byte order, as ``COLLATE "C"``
    in MERGE_VERSIONS."""
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
