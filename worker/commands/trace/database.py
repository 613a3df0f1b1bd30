"""The database side of ``trace``: the event's result row, its template and version rows,
and when the batch that wrote it committed.

The result row is found by its primary key (``prompt_results.id`` = ``event_id``: one
index probe, however large the table), joined to its template and version rows on their
keys, with the commit time of the transaction that wrote it, which is the batch's:
``pg_xact_commit_timestamp(xmin)``, known only when the server runs with
``track_commit_timestamp = on`` (otherwise the answer says so). Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from worker.config import Settings
from worker.store import pool
from worker.store.classify import classify

QUERY_TIMEOUT_SECONDS: Final = 10

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


async def look_up_stored(settings: Settings, event_id: str) -> StoredEvent | None:
    async with pool.connect(settings) as conn:
        try:
            return await find_stored(conn, event_id)
        except (asyncpg.PostgresError, OSError) as exc:
            raise classify(exc) from None
