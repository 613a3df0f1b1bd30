"""``trace``'s text: what was found about the event, and where was looked and how far.
URLs are shown masked; no password is printed."""

from __future__ import annotations

from datetime import datetime

from worker.commands.trace.lookup import Trace, waiting_in_queues


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
        lines.append(
            f"  queues        {waiting_in_queues(result.queues)} (not browsed: see README)"
        )
        consumers = sum(q.consumers or 0 for q in result.queues)
        if result.stored is None and not result.dead_letters and consumers:
            lines.append(
                f"                {consumers} consumers hold deliveries not acked yet: an "
                "event published moments ago may be being written now"
            )
    lines.extend(f"  error         {error}" for error in result.errors)
    return lines
