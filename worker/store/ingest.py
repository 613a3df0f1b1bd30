"""The store: ingestion into PostgreSQL through a pool (:class:`Store`), the public face
of :mod:`worker.store`.

:meth:`Store.ingest` turns a batch of valid events into rows in ONE transaction of
set-based SQL (COPY, or arrays through ``unnest``), whatever the batch size:

1. the templates of the batch are checked for tenancy (a cache of ``id -> (org, workspace)``
   saves the round trip for templates already seen: those columns never change);
2. the events to write are known before anything is written: either the batch is taken to
   be new (the fast path: COPY or a plain INSERT fails on an id already stored), or the ids
   already stored are looked up first and those events only compared with the stored rows
   (:mod:`~worker.store.repeats`);
3. events sharing a version key are collapsed in Python (:mod:`~worker.store.versions`),
   and the keys are sorted, so concurrent workers lock rows in the same order;
4. version keys not seen before are inserted, the results are written, rows sorted by id
   (again: one lock order for all), and the existing version rows are merged, last
   (:class:`~worker.store.writer.BatchWriter`, one attempt at the transaction).

So a version row only ever hears of the events whose result rows the same transaction
inserted: a repeated ``event_id`` never touches ``prompt_versions``. A repeat with the same
content is :attr:`Outcome.DUPLICATE`; one whose content differs from the stored row is
rejected as ``conflicting_duplicate``, naming the columns that differ (for another tenant's
row, none: only that the id belongs to another org or workspace). The first stored copy
always wins. Copies of one id within a batch are written in rounds (first copies, then
second copies, ...) in the same transaction, so a later copy is judged against the first
exactly as a copy in a later batch is.

The transaction is redone until it commits, each time more cautiously (:meth:`Store._commit`).
A batch taken to be new that holds a stored id fails with a unique violation; it is then
redone with the look-up first, and so are the next :data:`SAFE_BATCHES_AFTER_REPEAT`
batches. An id stored by another worker between the look-up and the insert fails the
insert the same way: the transaction is then redone under a savepoint per round with
``ON CONFLICT``, and a savepoint whose insert skipped an id is rolled back and redone, its
look-up now seeing that row.

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import asyncpg

from worker import events as ev
from worker import tracing
from worker.errors import Rejection, TransientError
from worker.events import Event
from worker.store.classify import classify, is_data_error, is_data_fault, is_infrastructure
from worker.store.outcomes import IngestResult, Outcome
from worker.store.sql import SQL, statement_span, transaction_span
from worker.store.versions import VersionKey
from worker.store.writer import RESULT_COLUMNS, TAKES_NEW, BatchWriter, Mode, insert_results

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = ["RESULT_COLUMNS", "IngestResult", "Outcome", "Store"]

#: After a batch held a repeated event, this many batches look their ids up before writing
#: instead of taking them to be new: replaying stored history costs one failed attempt per
#: 16 batches, and a look-up per batch.
SAFE_BATCHES_AFTER_REPEAT: Final = 16
RESULTS_PRIMARY_KEY: Final = "prompt_results_pkey"
VERSION_FOREIGN_KEY: Final = "prompt_results_version_id_fkey"


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
            rounds = _rounds(events, outcomes)
            if rounds:
                await self._commit(conn, events, rounds, outcomes)
        final: list[Outcome | Rejection] = []
        for o in outcomes:
            assert o is not None, "every event has an outcome"
            final.append(o)
        return IngestResult(outcomes=final)

    async def _commit(
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
        mode = Mode.FAST if self._safe_batches == 0 else Mode.CHECKED
        self._safe_batches = max(self._safe_batches - 1, 0)
        forgot_versions = False
        while True:
            attempt = BatchWriter(conn, events, self._versions, self.tracer, self._insert_results)
            try:
                with transaction_span(self.tracer, mode.name.lower()):
                    async with conn.transaction():
                        for n, todo in enumerate(rounds):
                            await attempt.write(todo, mode, first_round=n == 0)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != RESULTS_PRIMARY_KEY or mode not in TAKES_NEW:
                    raise
                # FAST: a repeated event it did not look for (a redelivery, a replay): look
                # from now on. CHECKED: another worker stored an id since the look-up.
                self._safe_batches = SAFE_BATCHES_AFTER_REPEAT
                mode = Mode.CHECKED if mode is Mode.FAST else Mode.CAREFUL
                continue
            except asyncpg.ForeignKeyViolationError as exc:
                if (
                    exc.constraint_name == VERSION_FOREIGN_KEY
                    and not forgot_versions
                    and mode is not Mode.BISECT
                ):
                    # A cached version id whose row was deleted by someone: forget them all.
                    self._versions.clear()
                    forgot_versions = True
                    continue
                if mode is Mode.BISECT or not is_data_error(exc):
                    raise
                mode = Mode.BISECT
                continue
            except Exception as exc:
                if mode is Mode.BISECT or not is_data_fault(exc):
                    raise
                # The database refused the data of some event: find which, store the rest.
                mode = Mode.BISECT
                continue
            for i, outcome in attempt.settled.items():
                outcomes[i] = outcome
            self._remember(attempt.learned)
            return

    async def _insert_results(
        self,
        conn: asyncpg.Connection,
        batch: list[Event],
        ids: dict[VersionKey, str],
        *,
        fast: bool,
    ) -> set[str] | None:
        """How the result rows are written (:func:`~worker.store.writer.insert_results`):
        a seam to measure another way against it (``bench/ingest.py`` overrides it)."""
        return await insert_results(conn, self.tracer, batch, ids, fast=fast)

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
            with statement_span(self.tracer, "TEMPLATE_TENANTS"):
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


def _rounds(events: Sequence[Event], outcomes: list[Outcome | Rejection | None]) -> list[list[int]]:
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
