"""The ``dead-letters`` commands: list, redrive and purge the dead-letter queue
(:mod:`worker.commands.deadletters`)."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import click

from worker.commands.options import (
    BROKER_SETTINGS,
    F,
    check_uuid,
    run_async,
    settings_options,
    window_option,
)
from worker.config import Settings


@click.group("dead-letters")
def dead_letters() -> None:
    """List, redrive and purge the dead-letter queue."""


@dead_letters.command("list")
@click.option(
    "--limit",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 65_535),
    help="Most messages to look at (from the head of the queue).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@settings_options("amqp_url", "dead_letter_queue", "log_level", "log_format")
def dead_letters_list(settings: Settings, limit: int, as_json: bool) -> None:
    """Event id (or key), reason, detail and time of each dead letter, and the count by
    reason.

    Nothing is consumed: every message goes back to the queue as it was. A message without
    a readable message id is named by its key (sha256:...), which --id takes.
    """
    import orjson

    from worker.commands import deadletters

    listing = run_async(deadletters.list_dead_letters(settings, limit=limit))
    if as_json:
        click.echo(orjson.dumps(listing.as_dict()).decode())
    else:
        click.echo(deadletters.render_listing(listing))


def _selection(
    reasons: tuple[str, ...], event_ids: tuple[str, ...], keys: tuple[str, ...], limit: int | None
) -> Any:
    from worker.commands import deadletters

    for value in event_ids:
        check_uuid(value, "--event-id")
    return deadletters.Selection(
        reasons=frozenset(reasons),
        event_ids=frozenset([*(str(uuid.UUID(e)) for e in event_ids), *keys]),
        limit=limit,
    )


selection_options = [
    click.option(
        "--reason", "reasons", multiple=True, help="Only messages dead-lettered for this reason."
    ),
    click.option("--event-id", "event_ids", multiple=True, help="Only this event (repeatable)."),
    click.option(
        "--id",
        "keys",
        multiple=True,
        help="Only the message with this key, as `list` shows it (repeatable): for messages "
        "whose id is not a UUID or cannot be read.",
    ),
    click.option("--limit", type=click.IntRange(1, None), help="At most this many messages."),
]


def _with_selection(func: F) -> F:
    for option in reversed(selection_options):
        func = option(func)
    return func


def _finish_scan(report: Any, *, as_json: bool) -> None:
    """Print a redrive (or selective purge) report; exit 130 if interrupted, 1 if anything
    selected could not be handled."""
    import orjson

    from worker.commands import deadletters

    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(deadletters.render_redrive(report))
    if report.interrupted:
        sys.exit(130)
    if report.error:
        click.echo(f"Error: {report.error}", err=True)
        sys.exit(1)


@dead_letters.command("redrive")
@_with_selection
@click.option("--all", "everything", is_flag=True, help="Every message, when nothing narrows it.")
@window_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@settings_options(*BROKER_SETTINGS, "max_held_bytes")
def dead_letters_redrive(
    *,
    settings: Settings,
    reasons: tuple[str, ...],
    event_ids: tuple[str, ...],
    keys: tuple[str, ...],
    limit: int | None,
    everything: bool,
    window: int,
    as_json: bool,
) -> None:
    """Re-publish dead letters to the main exchange (after a fix), with their original
    routing key.

    Each dead-letter copy is removed only after its re-publish is confirmed, so an
    interruption loses nothing; messages not selected stay in the queue untouched. Ctrl-C
    stops after the re-publishes in flight and says what was moved (exit 130). Exits 1 if
    any selected message could not be redriven.
    """
    from worker.commands import deadletters

    if not (reasons or event_ids or keys or limit or everything):
        raise click.UsageError(
            "say which messages to redrive: --reason, --event-id, --id, --limit or --all"
        )
    selection = _selection(reasons, event_ids, keys, limit)
    report = run_async(deadletters.redrive(settings, selection, window=window))
    _finish_scan(report, as_json=as_json)


@dead_letters.command("purge")
@click.option("--yes", is_flag=True, help="Confirm the deletion.")
@_with_selection
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with a selection).")
@settings_options("amqp_url", "dead_letter_queue", "max_held_bytes", "log_level", "log_format")
def dead_letters_purge(
    *,
    settings: Settings,
    yes: bool,
    reasons: tuple[str, ...],
    event_ids: tuple[str, ...],
    keys: tuple[str, ...],
    limit: int | None,
    as_json: bool,
) -> None:
    """Delete every message of the dead-letter queue, or only the selected ones (needs
    --yes either way)."""
    from worker.backfill.reports import plural
    from worker.commands import deadletters

    selected = bool(reasons or event_ids or keys or limit)
    if not yes:
        count = run_async(deadletters.depth(settings))
        what = "the selected messages of" if selected else f"{plural(count, 'message')} from"
        raise click.UsageError(
            f"refusing to delete {what} {settings.dead_letter_queue} without --yes"
        )
    if selected:
        selection = _selection(reasons, event_ids, keys, limit)
        _finish_scan(run_async(deadletters.purge_selected(settings, selection)), as_json=as_json)
        return
    purged = run_async(deadletters.purge(settings))
    click.echo(f"purged {plural(purged, 'message')} from {settings.dead_letter_queue}")
