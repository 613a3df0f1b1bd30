"""Events of a batch whose ``event_id`` is stored already: a duplicate (same content) or a
conflicting duplicate (other content, or another tenant's row), judged against the stored
row, which always wins. A repeat is settled here and never written: nothing of it reaches
``prompt_results`` or ``prompt_versions``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from worker import events as ev
from worker.errors import DatabaseConflict, Rejection
from worker.events import Event
from worker.store.classify import sending_values
from worker.store.outcomes import Outcome, Settled
from worker.store.sql import SQL, body_positions, in_id_order, statement_span

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


async def settle_stored(
    conn: asyncpg.Connection,
    tracer: Tracer | None,
    events: Sequence[Event],
    todo: list[int],
    settled: Settled,
) -> list[int]:
    """Settle the events of ``todo`` (indexes into ``events``, distinct ids) whose id is
    stored already; return the others, still to write."""
    with sending_values():
        ids = " ".join([events[i].event_id for i in todo])
        with statement_span(tracer, "STORED_IDS"):
            rows = await conn.fetch(SQL.STORED_IDS, ids)
    if not rows:
        return todo
    stored = {r[0] for r in rows}
    repeats = [i for i in todo if events[i].event_id in stored]
    with statement_span(tracer, "COMPARE_STORED"):
        verdicts = await _compare(conn, [events[i] for i in repeats])
    for i in repeats:
        verdict = verdicts.get(events[i].event_id)
        if verdict is None:  # deleted by someone between the two statements
            raise DatabaseConflict("a result row vanished while being compared; retrying")
        settled[i] = verdict
    return [i for i in todo if events[i].event_id not in stored]


async def _compare(
    conn: asyncpg.Connection, repeats: list[Event]
) -> dict[str, Outcome | Rejection]:
    """Each repeat against its stored row: a duplicate, or a conflicting duplicate."""
    rows = in_id_order(repeats)
    bodies = [e.body for e in rows]
    with sending_values():
        found = await conn.fetch(
            SQL.COMPARE_STORED,
            " ".join([e.event_id for e in rows]),
            [e.org_id for e in rows],
            [e.workspace_id for e in rows],
            [e.template_id for e in rows],
            [e.provider_version_key for e in rows],
            [e.system_fingerprint for e in rows],
            [e.occurred_at for e in rows],
            *body_positions(bodies),
            b"".join(bodies),
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
