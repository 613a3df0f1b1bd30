"""``prompter-worker trace EVENT_ID``: where is this event?

Three places are looked at, each bounded, at the same time:

1. **PostgreSQL**: the result row by its primary key (``prompt_results.id`` = ``event_id``:
   one index probe, however large the table), joined to its template and version rows on
   their primary keys, and the commit time of the transaction that wrote it, which is the batch's:
   ``pg_xact_commit_timestamp(xmin)``, known only when the server runs with
   ``track_commit_timestamp = on`` (otherwise the answer says so).
2. **The dead-letter queue**: its first ``limit`` messages, looked at and handed back
   untouched (:func:`worker.commands.deadletters.list_dead_letters`), matched by ``message_id``,
   which the contract makes the ``event_id``.
3. **The live and replay queues**: their depth and consumers only. They are *not*
   browsed. Looking at a message of a quorum queue means taking it (``basic.get``) and
   handing it back, and RabbitMQ counts every hand-back as a delivery: the message's
   ``x-delivery-count`` grows, from 2 the worker takes it for a message that may have
   killed its consumers and processes it alone (slowly, on purpose), and after
   ``PROMPTER_DELIVERY_LIMIT`` deliveries the broker dead-letters it. Browsing to answer
   "where is my event?" could itself push healthy events into the dead-letter queue. It
   would not see much either: what the workers hold unacknowledged (up to their prefetch)
   cannot be fetched, and AMQP does not tell a message's position. So the answer for an
   event in neither place is "not stored yet; N messages waiting in <queue>".

Nothing here writes, and no password is printed: URLs are shown masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from worker.amqp import broker
from worker.backfill.reports import plural
from worker.commands import deadletters
from worker.commands.deadletters import DeadLetter
from worker.commands.status import QueueStatus, queue_status
from worker.config import Settings
from worker.errors import ConfigError, WorkerError
from worker.security import mask_url
from worker.store import pool
from worker.store.classify import classify

DEFAULT_DEAD_LETTER_LIMIT: Final = 10_000
QUERY_TIMEOUT_SECONDS: Final = 10

STORED: Final = "stored"
DEAD_LETTERED: Final = "dead_lettered"
WAITING: Final = "waiting"
NOT_FOUND: Final = "not_found"
UNKNOWN: Final = "unknown"  # a server could not be read, and the other did not have it

COMMIT_TIME_UNTRACKED: Final = "unknown (track_commit_timestamp is off)"
COMMIT_TIME_NEEDS_SELECT: Final = (
    "unknown (reading commit times needs SELECT on the whole prompt_results table; the "
    "worker's runtime role has column rights only: run trace as the owner)"
)
COMMIT_TIME_UNRECORDED: Final = (
    "unknown (not recorded: written before track_commit_timestamp was turned on, "
    "or its transaction is too old)"
)


class SQL:
    # One probe of prompt_results_pkey; the template and version joined on their keys.
    # The commit time is asked only when tracked: otherwise the function raises.
    # The version row through the unique key the result carries (the runtime role reads no
    # version_id). The commit time needs the row's xmin, a system column that only a
    # table-wide SELECT reads: the runtime role has column rights, so it gets FIND without
    # it (COMMIT_TIME_NEEDS_SELECT).
    _FIND: Final = """
        SELECT r.id, r.org_id, r.workspace_id, r.created_at, r.template_id,
               v.id AS version_id,
               t.name AS template_name, t.deleted_at AS template_deleted_at,
               v.provider, v.provider_version_key, v.model_id,
               v.first_seen_at, v.last_seen_at,
               current_setting('track_commit_timestamp')::boolean AS commit_time_tracked,
               {committed_at} AS committed_at
        FROM prompt_results r
        LEFT JOIN prompt_templates t ON t.id = r.template_id
        LEFT JOIN prompt_versions v
               ON (v.org_id, v.workspace_id, v.template_id, v.provider_version_key)
                = (r.org_id, r.workspace_id, r.template_id, r.provider_version_key)
        WHERE r.id = $1
    """
    FIND: Final = _FIND.format(
        committed_at="CASE WHEN current_setting('track_commit_timestamp')::boolean"
        " THEN pg_xact_commit_timestamp(r.xmin) END"
    )
    FIND_WITHOUT_COMMIT_TIME: Final = _FIND.format(committed_at="NULL::timestamptz")
    CAN_READ_XMIN: Final = "SELECT has_table_privilege('prompt_results', 'SELECT')"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """The stored result row of an event, with its template and version rows."""

    event_id: str
    org_id: str
    workspace_id: str
    occurred_at: datetime  # prompt_results.created_at is the event's occurred_at
    committed_at: datetime | None  # when the batch's transaction committed
    commit_time_note: str | None  # why committed_at is None
    template_id: str | None
    template_name: str | None
    template_deleted_at: datetime | None
    version_id: str | None
    provider: str | None
    provider_version_key: str | None
    model_id: str | None
    version_first_seen_at: datetime | None
    version_last_seen_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            name: value.isoformat() if isinstance(value, datetime) else value
            for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }


@dataclass(frozen=True, kw_only=True)
class Trace:
    """Everything found about one event, and what could not be looked at."""

    event_id: str
    database: str  # masked URL
    broker: str  # masked URL
    stored: StoredEvent | None = None
    dead_letters: tuple[DeadLetter, ...] = ()  # its copies in the dead-letter queue
    dead_letter_queue: QueueStatus | None = None
    dead_letters_scanned: int = 0
    queues: tuple[QueueStatus, ...] = ()  # the live and the replay queue
    errors: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        if self.stored is not None:
            return STORED
        if self.dead_letters:
            return DEAD_LETTERED
        if self.errors:
            return UNKNOWN
        if any(q.ready for q in self.queues):
            return WAITING
        return NOT_FOUND

    @property
    def dead_letter_scan_complete(self) -> bool:
        dlq = self.dead_letter_queue
        return dlq is None or dlq.ready is None or self.dead_letters_scanned >= dlq.ready

    def summary(self) -> str:
        """One sentence: where the event is."""
        state = self.state
        if state == STORED:
            return "stored"
        if state == DEAD_LETTERED:
            first = self.dead_letters[0]
            return f"dead-lettered ({first.reason})"
        if state == WAITING:
            return f"not stored yet; {_waiting(self.queues)}"
        if state == UNKNOWN:
            return "unknown: " + "; ".join(self.errors)
        return "not seen anywhere"

    def as_dict(self) -> dict[str, Any]:
        dlq = self.dead_letter_queue
        return {
            "event_id": self.event_id,
            "state": self.state,
            "summary": self.summary(),
            "stored": self.stored.as_dict() if self.stored else None,
            "dead_letters": [d.as_dict() for d in self.dead_letters],
            "dead_letter_queue": {
                "name": dlq.name if dlq else None,
                "ready": dlq.ready if dlq else None,
                "scanned": self.dead_letters_scanned,
                "complete": self.dead_letter_scan_complete,
            },
            "queues": [
                {"name": q.name, "ready": q.ready, "consumers": q.consumers} for q in self.queues
            ],
            "queues_browsed": False,
            "database": self.database,
            "broker": self.broker,
            "errors": list(self.errors),
        }


def _waiting(queues: tuple[QueueStatus, ...]) -> str:
    parts = []
    for q in queues:
        if q.ready is None:
            parts.append(f"{q.name} does not exist")
        else:
            parts.append(f"{plural(q.ready, 'message')} waiting in {q.name}")
    return ", ".join(parts)


def canonical_event_id(value: str) -> str:
    """The event id in the form the database stores (lowercase 8-4-4-4-12); ValueError if
    ``value`` is not a UUID."""
    return str(uuid.UUID(value))


async def find_stored(conn: asyncpg.Connection, event_id: str) -> StoredEvent | None:
    whole_table = await conn.fetchval(SQL.CAN_READ_XMIN, timeout=QUERY_TIMEOUT_SECONDS)
    query = SQL.FIND if whole_table else SQL.FIND_WITHOUT_COMMIT_TIME
    row = await conn.fetchrow(query, uuid.UUID(event_id), timeout=QUERY_TIMEOUT_SECONDS)
    if row is None:
        return None
    note = None
    if not row["commit_time_tracked"]:
        note = COMMIT_TIME_UNTRACKED
    elif not whole_table:
        note = COMMIT_TIME_NEEDS_SELECT
    elif row["committed_at"] is None:
        note = COMMIT_TIME_UNRECORDED
    return StoredEvent(
        event_id=str(row["id"]),
        org_id=str(row["org_id"]),
        workspace_id=str(row["workspace_id"]),
        occurred_at=row["created_at"],
        committed_at=row["committed_at"],
        commit_time_note=note,
        template_id=_text(row["template_id"]),
        template_name=row["template_name"],
        template_deleted_at=row["template_deleted_at"],
        version_id=_text(row["version_id"]),
        provider=row["provider"],
        provider_version_key=row["provider_version_key"],
        model_id=row["model_id"],
        version_first_seen_at=row["first_seen_at"],
        version_last_seen_at=row["last_seen_at"],
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


async def _database(settings: Settings, event_id: str) -> StoredEvent | None:
    async with pool.connect(settings) as conn:
        try:
            return await find_stored(conn, event_id)
        except (asyncpg.PostgresError, OSError) as exc:
            raise classify(exc) from None


@dataclass(frozen=True, kw_only=True)
class _BrokerView:
    queues: tuple[QueueStatus, ...]
    dead_letter_queue: QueueStatus
    dead_letters: tuple[DeadLetter, ...]
    scanned: int


async def _broker(settings: Settings, event_id: str, limit: int) -> _BrokerView:
    connection = await broker.connect(settings.amqp_url, name="prompter-worker trace")
    try:
        names = (settings.queue, settings.replay_queue, settings.dead_letter_queue)
        live, replay, dead = [await queue_status(connection, name) for name in names]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=10)
    copies: tuple[DeadLetter, ...] = ()
    scanned = 0
    if dead.ready:
        try:
            listing = await deadletters.list_dead_letters(settings, limit=limit)
        except ConfigError:  # deleted between the two looks: nothing to find there
            listing = deadletters.Listing(queue=dead.name, depth=0)
        scanned = len(listing.messages)
        copies = tuple(m for m in listing.messages if (m.event_id or "").lower() == event_id)
    return _BrokerView(
        queues=(live, replay), dead_letter_queue=dead, dead_letters=copies, scanned=scanned
    )


async def trace(
    settings: Settings, event_id: str, *, dead_letter_limit: int = DEFAULT_DEAD_LETTER_LIMIT
) -> Trace:
    """Where ``event_id`` is. A server that cannot be reached is reported in ``errors``,
    never raised: what the other one says is still worth having."""
    event_id = canonical_event_id(event_id)
    found, view = await asyncio.gather(
        _database(settings, event_id),
        _broker(settings, event_id, dead_letter_limit),
        return_exceptions=True,
    )
    errors: list[str] = []
    stored: StoredEvent | None = None
    if isinstance(found, BaseException):
        errors.append(_error("database", found))
    else:
        stored = found
    result = Trace(
        event_id=event_id,
        database=mask_url(settings.database_url),
        broker=mask_url(settings.amqp_url),
        stored=stored,
    )
    if isinstance(view, BaseException):
        errors.append(_error("broker", view))
        return dataclasses.replace(result, errors=tuple(errors))
    return dataclasses.replace(
        result,
        dead_letters=view.dead_letters,
        dead_letter_queue=view.dead_letter_queue,
        dead_letters_scanned=view.scanned,
        queues=view.queues,
        errors=tuple(errors),
    )


def _error(server: str, exc: BaseException) -> str:
    if isinstance(exc, WorkerError):
        return str(exc)
    if isinstance(exc, Exception):
        return f"{server}: {type(exc).__name__}: {exc}"
    raise exc  # KeyboardInterrupt, CancelledError: not ours to swallow


# --- rendering ------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


def render(result: Trace) -> str:
    lines = [f"event {result.event_id}: {result.summary()}"]
    stored = result.stored
    if stored is not None:
        lines.append(f"  occurred at   {_when(stored.occurred_at)} (prompt_results.created_at)")
        if stored.committed_at is not None:
            delay = (stored.committed_at - stored.occurred_at).total_seconds()
            lines.append(
                f"  committed at  {_when(stored.committed_at)} "
                f"({delay:,.3f} s after it occurred; the batch's transaction)"
            )
        else:
            lines.append(f"  committed at  {stored.commit_time_note}")
        lines.append(f"  org           {stored.org_id}")
        lines.append(f"  workspace     {stored.workspace_id}")
        template = stored.template_id or "-"
        if stored.template_name is not None:
            template += f' "{stored.template_name}"'
        if stored.template_deleted_at is not None:
            template += f" (deleted {_when(stored.template_deleted_at)})"
        lines.append(f"  template      {template}")
        if stored.version_id is not None:
            lines.append(
                f"  version       {stored.version_id}: {stored.provider} "
                f"{stored.provider_version_key} (model {stored.model_id}), seen "
                f"{_when(stored.version_first_seen_at)} to {_when(stored.version_last_seen_at)}"
            )
        else:
            lines.append("  version       -")
    for letter in result.dead_letters:
        who = "the worker" if letter.by == "worker" else "the broker"
        lines.append(f"  dead letter   {letter.reason}: {letter.detail}")
        lines.append(
            f"                by {who} at {letter.failed_at or '-'}, routing key "
            f"{letter.routing_key}, redriven {letter.redrives} times"
        )
    lines.extend(_places(result))
    if result.dead_letters and stored is None:
        lines.append(
            f"  after a fix:  prompter-worker dead-letters redrive --event-id {result.event_id}"
        )
    if result.dead_letters and stored is not None:
        lines.append(
            "  note          stored, and a dead-letter copy remains from an earlier delivery "
            "(redriving it is harmless: it is stored once)"
        )
    return "\n".join(lines)


def _places(result: Trace) -> list[str]:
    """Where was looked, and how far."""
    lines = []
    dlq = result.dead_letter_queue
    if dlq is not None:
        if dlq.ready is None:
            lines.append(f"  dead letters  {dlq.name} does not exist")
        elif not dlq.ready:
            lines.append(f"  dead letters  none: {dlq.name} is empty")
        else:
            n = len(result.dead_letters)
            found = f"{n} {'copy' if n == 1 else 'copies'}" if n else "none"
            if result.dead_letter_scan_complete:
                where = f"the {result.dead_letters_scanned:,} in {dlq.name}"
            else:
                where = (
                    f"the first {result.dead_letters_scanned:,} of {dlq.ready:,} in {dlq.name} "
                    "(--dead-letter-limit looks further)"
                )
            lines.append(f"  dead letters  {found} among {where}")
    if result.queues:
        lines.append(f"  queues        {_waiting(result.queues)} (not browsed: see README)")
        consumers = sum(q.consumers or 0 for q in result.queues)
        if result.stored is None and not result.dead_letters and consumers:
            lines.append(
                f"                {consumers} consumers hold deliveries not acked yet: an "
                "event published moments ago may be being written now"
            )
    lines.extend(f"  error         {error}" for error in result.errors)
    return lines
