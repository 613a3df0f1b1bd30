"""``prompter-worker status``: queue depths, consumers, rows per table, freshness.

Everything here is cheap on a large deployment: queue depths come from passive
declarations, row counts from the planner's estimate once a table is large, and the newest
result from the ``ix_results_workspace`` index, one workspace at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiormq
import aiormq.exceptions
import asyncpg

from worker.amqp import broker
from worker.config import Settings, asyncpg_dsn
from worker.errors import BrokerUnavailable, DatabaseUnavailable
from worker.security import mask_url
from worker.store import schema
from worker.store.classify import classify
from worker.store.schema import SchemaState

EXACT_COUNT_BELOW: Final = 1_000_000
TABLES: Final = ("prompt_templates", "prompt_versions", "prompt_results")


class SQL:
    ESTIMATES: Final = """
        SELECT relname, GREATEST(reltuples, 0)::bigint AS estimate
        FROM pg_class WHERE relname = ANY($1::text[]) AND relkind = 'r'
    """
    # A loose index scan over ix_results_workspace: one probe per workspace.
    NEWEST_RESULT: Final = """
        WITH RECURSIVE workspaces AS (
            (SELECT workspace_id FROM prompt_results ORDER BY workspace_id LIMIT 1)
            UNION ALL
            SELECT (SELECT r.workspace_id FROM prompt_results r
                    WHERE r.workspace_id > w.workspace_id
                    ORDER BY r.workspace_id LIMIT 1)
            FROM workspaces w WHERE w.workspace_id IS NOT NULL
        )
        SELECT max((SELECT r.created_at FROM prompt_results r
                    WHERE r.workspace_id = w.workspace_id
                    ORDER BY r.created_at DESC LIMIT 1))
        FROM workspaces w WHERE w.workspace_id IS NOT NULL
    """


@dataclass(frozen=True, kw_only=True)
class QueueStatus:
    name: str
    ready: int | None  # None: the queue does not exist
    consumers: int | None


@dataclass(frozen=True, kw_only=True)
class Status:
    broker: str
    database: str
    queues: list[QueueStatus]
    rows: dict[str, int]
    rows_estimated: list[str]
    newest_result_at: datetime | None
    lag_seconds: float | None
    errors: list[str]
    schema: SchemaState | None = None  # None: the database could not be read

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = self.schema.as_dict() if self.schema else None
        out["newest_result_at"] = (
            self.newest_result_at.isoformat() if self.newest_result_at else None
        )
        return out


async def queue_status(connection: aiormq.Connection, queue: str) -> QueueStatus:
    channel = await connection.channel()  # a failed passive declare closes its channel
    try:
        ok = await channel.queue_declare(queue, passive=True)
        return QueueStatus(
            name=queue, ready=int(ok.message_count or 0), consumers=int(ok.consumer_count or 0)
        )
    except aiormq.exceptions.ChannelNotFoundEntity:
        return QueueStatus(name=queue, ready=None, consumers=None)
    finally:
        if not channel.is_closed:
            await channel.close()


async def queue_statuses(settings: Settings, *, name: str) -> list[QueueStatus]:
    """The live, replay and dead-letter queues, in that order, over one connection named
    ``name`` (closed within 10 s whatever the broker does)."""
    connection = await broker.connect(settings.amqp_url, name=name)
    try:
        names = (settings.queue, settings.replay_queue, settings.dead_letter_queue)
        return [await queue_status(connection, queue) for queue in names]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=10)


async def _database(
    settings: Settings,
) -> tuple[dict[str, int], list[str], datetime | None, SchemaState]:
    try:
        conn = await asyncpg.connect(asyncpg_dsn(settings.database_url), timeout=10)
    except Exception as exc:
        raise classify(exc) from exc
    try:
        state = await schema.inspect(conn)
        if "table prompt_results" in state.missing or state.status == schema.MISSING:
            return {}, [], None, state
        estimates = {
            r["relname"]: int(r["estimate"]) for r in await conn.fetch(SQL.ESTIMATES, list(TABLES))
        }
        rows: dict[str, int] = {}
        estimated: list[str] = []
        for table in TABLES:
            if f"table {table}" in state.missing:
                continue
            if estimates.get(table, 0) < EXACT_COUNT_BELOW:
                rows[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            else:
                rows[table] = estimates[table]
                estimated.append(table)
        newest = await conn.fetchval(SQL.NEWEST_RESULT)
        return rows, estimated, newest, state
    finally:
        await conn.close()


async def collect(settings: Settings) -> Status:
    """Gather everything; a server that cannot be reached is reported, not raised."""
    errors: list[str] = []
    queues: list[QueueStatus] = []
    rows: dict[str, int] = {}
    estimated: list[str] = []
    newest: datetime | None = None
    state: SchemaState | None = None
    q, d = await asyncio.gather(
        queue_statuses(settings, name="prompter-status"),
        _database(settings),
        return_exceptions=True,
    )
    if isinstance(q, BaseException):
        errors.append(str(q) if isinstance(q, BrokerUnavailable) else f"broker: {q}")
    else:
        queues = q
    if isinstance(d, BaseException):
        errors.append(str(d) if isinstance(d, DatabaseUnavailable) else f"database: {d}")
    else:
        rows, estimated, newest, state = d
    lag = (datetime.now(UTC) - newest).total_seconds() if newest else None
    return Status(
        broker=mask_url(settings.amqp_url),
        database=mask_url(settings.database_url),
        queues=queues,
        rows=rows,
        rows_estimated=estimated,
        newest_result_at=newest,
        lag_seconds=lag,
        errors=errors,
        schema=state,
    )


def render(status: Status) -> str:
    lines = [f"broker    {status.broker}", f"database  {status.database}"]
    if status.schema is not None:
        lines.append(f"schema    {status.schema.describe().removeprefix('schema ')}")
    lines.append("")
    lines.append(f"{'queue':40} {'ready':>10} {'consumers':>10}")
    for q in status.queues:
        ready = "missing" if q.ready is None else f"{q.ready:,}"
        consumers = "-" if q.consumers is None else str(q.consumers)
        lines.append(f"{q.name:40} {ready:>10} {consumers:>10}")
    lines.append("")
    for table, n in status.rows.items():
        approx = " (estimate)" if table in status.rows_estimated else ""
        lines.append(f"{table:40} {n:>10,} rows{approx}")
    if status.newest_result_at is not None:
        lines.append("")
        lines.append(f"newest result   {status.newest_result_at.isoformat()}")
        lines.append(
            f"lag             {status.lag_seconds:,.1f} s (now minus the newest occurred_at)"
        )
    for error in status.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)
