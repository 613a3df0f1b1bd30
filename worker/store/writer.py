"""One attempt at a batch's transaction (:class:`BatchWriter`): writes the batch's rounds
of events the way :class:`Mode` says, and keeps what it settled and learned until the
transaction commits.

Writing events (distinct ids, none stored as far as the writer knows) takes three
statements: the version keys not seen before are inserted, the results are written
(rows sorted by id: one lock order for all), and the existing version rows are merged,
last. The version rows count an event only if its result row was inserted: with
:attr:`Mode.FAST` and :attr:`Mode.CHECKED` an id stored meanwhile fails the insert and the
whole transaction; under a savepoint (:attr:`Mode.CAREFUL`) a skipped id rolls the
savepoint back. So a repeated ``event_id`` never touches ``prompt_versions``.

The results are written one of three ways, each a single statement for the whole batch:
COPY, when every body is compact JSON as orjson writes it (the decoder then kept the exact
text of ``request``, ``response`` and ``analysis_config``: see
:func:`worker.events.exact_columns`), which spares PostgreSQL parsing the rest of each
body and inserts like COPY does; otherwise a plain ``INSERT ... SELECT`` from arrays that
parses each whole body; and, while bisecting or after a race, ``INSERT ... ON CONFLICT
(id) DO NOTHING RETURNING id``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import asyncpg
import orjson

from worker.errors import DatabaseConflict
from worker.events import Event, JsonColumns
from worker.store.classify import is_data_fault, rejection_for, sending_values
from worker.store.outcomes import Outcome, Settled
from worker.store.repeats import settle_stored
from worker.store.sql import SQL, body_positions, in_id_order, statement_span
from worker.store.versions import (
    VersionIds,
    VersionKey,
    collapse,
    key_columns,
    seen_columns,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

#: The columns of ``prompt_results`` a batch writes, in the order of COPY's records.
RESULT_COLUMNS: Final = (
    "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
    "system_fingerprint", "request", "response", "analysis_config", "created_at",
)  # fmt: skip


class Mode(enum.Enum):
    """How an attempt at a batch's transaction writes its events."""

    FAST = "take the events to be new"
    CHECKED = "look the ids up, then take the others to be new"
    CAREFUL = "look the ids up, then write under a savepoint skipping any stored meanwhile"
    BISECT = "careful, and split the batch under savepoints to find the data at fault"


#: The modes in which a stored id fails the insert (a unique violation) rather than being
#: skipped.
TAKES_NEW: Final = frozenset({Mode.FAST, Mode.CHECKED})


class InsertResults(Protocol):
    """How the result rows are written: :func:`insert_results`, through the store's
    ``_insert_results`` (which a subclass may replace: ``bench/ingest.py`` does)."""

    async def __call__(
        self,
        conn: asyncpg.Connection,
        batch: list[Event],
        ids: dict[VersionKey, str],
        *,
        fast: bool,
    ) -> set[str] | None: ...


class _Raced(Exception):
    """An event id this transaction took to be new was stored by another one meanwhile."""


class BatchWriter:
    """One attempt at a batch's transaction on ``conn``: the caller opens the transaction
    and calls :meth:`write` for each round of the batch.

    ``settled`` (outcomes by event index) and ``learned`` (version ids) are the caller's
    to apply once the transaction has committed; ``versions`` is the committed cache of
    version ids, read only; ``insert_results`` writes the result rows.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        events: Sequence[Event],
        versions: dict[VersionKey, str],
        tracer: Tracer | None,
        insert_results: InsertResults,
    ) -> None:
        self.conn = conn
        self.events = events
        self.tracer = tracer
        self.settled: Settled = {}
        self.learned: dict[VersionKey, str] = {}
        self._versions = versions
        self._insert_results = insert_results

    async def write(self, todo: list[int], mode: Mode, *, first_round: bool) -> None:
        """Write the events ``todo`` (indexes into the batch, distinct event ids)."""
        if mode is Mode.BISECT:
            await self._bisect(todo)
        elif mode is Mode.CAREFUL:
            await self._careful(todo)
        else:
            await self._write_as_new(todo, look_up=mode is not Mode.FAST or not first_round)

    async def _write_as_new(self, todo: list[int], *, look_up: bool) -> None:
        """Write the events ``todo`` with COPY or a plain INSERT, which fail on a stored
        id: all of them, or, if ``look_up``, those not stored when looked up (the stored
        ones are settled)."""
        if look_up:
            todo = await settle_stored(self.conn, self.tracer, self.events, todo, self.settled)
            if not todo:
                return
        _, found = await self._write([self.events[i] for i in todo], fast=True)
        self.learned.update(found)
        for i in todo:
            self.settled[i] = Outcome.STORED

    async def _careful(self, todo: list[int]) -> None:
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
                async with self.conn.transaction():  # a savepoint in the batch's transaction
                    new = await settle_stored(self.conn, self.tracer, self.events, todo, mine)
                    if new:
                        batch = [self.events[i] for i in new]
                        inserted, found = await self._write(batch, fast=False)
                        if inserted != {e.event_id for e in batch}:
                            raise _Raced
                        mine.update(dict.fromkeys(new, Outcome.STORED))
            except _Raced:
                continue
            self.learned.update(found)  # visible to the later savepoints of this transaction
            self.settled.update(mine)
            return
        raise DatabaseConflict("event ids kept being skipped as stored yet not found; retrying")

    async def _bisect(self, todo: list[int]) -> None:
        """Find the events the database refuses, under savepoints; store the rest."""
        try:
            await self._careful(todo)
        except Exception as exc:
            if not is_data_fault(exc):
                raise
            if len(todo) == 1:
                self.settled[todo[0]] = rejection_for(exc)
                return
            middle = len(todo) // 2
            await self._bisect(todo[:middle])
            await self._bisect(todo[middle:])

    async def _write(
        self, batch: list[Event], *, fast: bool
    ) -> tuple[set[str] | None, dict[VersionKey, str]]:
        """The three statements of a batch of events to store, inside the caller's
        transaction or savepoint: insert new version keys, insert the results, merge the
        known version keys.

        Returns the ids inserted (None: all of them) and the version ids learned (put in
        ``learned`` by the caller once the savepoint, if any, is released). With ``fast``
        False the results skip a stored id instead of failing: the caller must then check
        that every id was inserted, since the versions took every event into account.
        """
        conn, span = self.conn, self.tracer
        rows = collapse(batch)
        known = VersionIds(self._versions, self.learned) if self.learned else self._versions
        ids = {key: known[key] for key in rows if key in known}
        learned: dict[VersionKey, str] = {}
        fresh: set[VersionKey] = set()
        new_keys = [key for key in rows if key not in ids]
        if new_keys:
            new = [rows[key] for key in new_keys]
            with sending_values(), statement_span(span, "INSERT_VERSIONS"):
                inserted_keys = await conn.fetch(
                    SQL.INSERT_VERSIONS, *key_columns(new), *seen_columns(new)
                )
            for vid, org, ws, tpl, pvk in inserted_keys:
                learned[(org, ws, tpl, pvk)] = vid
            fresh = set(learned)
            existing = [rows[key] for key in new_keys if key not in fresh]
            if existing:
                with statement_span(span, "VERSION_IDS"):
                    known_keys = await conn.fetch(SQL.VERSION_IDS, *key_columns(existing))
                for vid, org, ws, tpl, pvk in known_keys:
                    learned[(org, ws, tpl, pvk)] = vid
            ids.update(learned)
            if len(ids) < len(rows):  # a row deleted between the two statements
                raise DatabaseConflict("a version row vanished while being resolved; retrying")
        with sending_values():
            inserted = await self._insert_results(conn, batch, ids, fast=fast)
        merge = sorted((ids[key], row) for key, row in rows.items() if key not in fresh)
        if merge:
            version_ids = [vid for vid, _ in merge]
            with sending_values(), statement_span(span, "MERGE_VERSIONS"):
                await conn.execute(
                    SQL.MERGE_VERSIONS, version_ids, *seen_columns([row for _, row in merge])
                )
        return inserted, learned


async def insert_results(
    conn: asyncpg.Connection,
    tracer: Tracer | None,
    batch: list[Event],
    ids: dict[VersionKey, str],
    *,
    fast: bool,
) -> set[str] | None:
    """Insert the result rows of ``batch`` (``ids``: the version id of every key of the
    batch); the ids inserted, or None for all of them."""
    rows = in_id_order(batch)
    texts = [e.columns for e in rows]
    if fast and None not in texts:
        records = _copy_records(rows, cast(list[JsonColumns], texts), ids)
        with statement_span(tracer, "COPY_RESULTS"):
            await conn.copy_records_to_table(
                "prompt_results", records=records, columns=RESULT_COLUMNS
            )
        return None
    keys = list(ids)
    position = {key: k for k, key in enumerate(keys, start=1)}
    bodies = [e.body for e in rows]
    args = (  # per version key: org, workspace, template, version id; then per event
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [ids[k] for k in keys],
        " ".join([e.event_id for e in rows]),
        " ".join([str(position[e.version_key]) for e in rows]),
        [e.occurred_at for e in rows],
        *body_positions(bodies),
        b"".join(bodies),
    )
    if fast:
        with statement_span(tracer, "INSERT_RESULTS_FAST"):
            await conn.execute(SQL.INSERT_RESULTS_FAST, *args)
        return None
    with statement_span(tracer, "INSERT_RESULTS"):
        inserted = await conn.fetch(SQL.INSERT_RESULTS, *args)
    return {r[0] for r in inserted}


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
