"""The ``prompter-worker`` command. Thin: parses, wires, runs.

Every setting of :class:`worker.config.Settings` can be given as an environment variable or
as the matching flag (the flag wins); commands declare which settings they take with
:func:`settings_options`.
"""

from __future__ import annotations

import asyncio
import sys

import click

from worker import __version__
from worker.commands.backfill_cli import publish, replay
from worker.commands.deadletters_cli import dead_letters
from worker.commands.options import (
    BROKER_SETTINGS,
    check_uuid,
    exit_2,
    run_async,
    settings_options,
)
from worker.commands.templates_cli import templates
from worker.config import Settings
from worker.errors import WorkerError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prompter-worker")
def main() -> None:
    """Ingest Prompter V7 prompt run events from RabbitMQ into PostgreSQL."""


@main.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it (no database).")
@click.option(
    "--create-database", is_flag=True, help="Create the database first if it does not exist."
)
@click.option(
    "--lock-timeout",
    type=click.FloatRange(0, 86_400),
    envvar="PROMPTER_MIGRATION_LOCK_TIMEOUT",
    default=10.0,
    show_default=True,
    help="Seconds a statement waits for a lock (a busy table, another migrate) before the "
    "migration fails; 0 waits for ever. [env: PROMPTER_MIGRATION_LOCK_TIMEOUT]",
)
@click.option(
    "--adopt-alembic-version",
    is_flag=True,
    help="Move prompter's revision from alembic_version to its own version table even "
    "though the database holds other tables (a record an older prompter-worker wrote).",
)
@settings_options("database_url", "log_level", "log_format")
def migrate(
    *,
    settings: Settings,
    revision: str,
    sql: bool,
    create_database: bool,
    lock_timeout: float,
    adopt_alembic_version: bool,
) -> None:
    """Bring the database schema up to date (alembic upgrade), in prompter's own version
    table (PROMPTER_VERSION_TABLE, default prompter_alembic_version).

    Exits 2 with one line if it cannot (the traceback with --log-level debug).
    """
    from worker.store import migrations

    def note(line: str) -> None:
        click.echo(line, err=True)

    try:
        if create_database and not sql:
            created = asyncio.run(migrations.create_database(settings.database_url))
            note("database created" if created else "database exists")
        outcome = migrations.upgrade(
            settings.database_url,
            revision,
            sql=sql,
            lock_timeout=lock_timeout,
            adopt_alembic_version=adopt_alembic_version,
            note=note,
        )
    except WorkerError as exc:
        exit_2(exc)
    if outcome.schema is not None:
        note(outcome.schema.describe())
        for warning in outcome.schema.warnings:
            note(f"warning: {warning}")


RUN_SETTINGS = tuple(f.name for f in Settings.fields())


@main.command()
@settings_options(*RUN_SETTINGS)
def run(settings: Settings) -> None:
    """Consume prompt run events and store them (the worker). Stops gracefully on SIGTERM."""
    from worker.ingest.worker import run as run_worker

    sys.exit(run_worker(settings))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@settings_options(
    "database_url",
    "amqp_url",
    "queue",
    "replay_queue",
    "dead_letter_queue",
    "log_level",
    "log_format",
)
def status(settings: Settings, as_json: bool) -> None:
    """Queue depths and consumers, rows per table, the newest result and the lag.

    Exits 1 if a server could not be reached (what could be read is still printed).
    """
    import orjson

    from worker.commands import status as st

    report = run_async(st.collect(settings))
    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(st.render(report))
    if report.errors:
        sys.exit(1)


# Repeated from worker.commands.trace, imported only when the command runs (--help stays fast);
# tests/test_trace.py checks that they agree.
DEFAULT_TRACE_DEAD_LETTERS = 10_000
DEFAULT_DEMO_EVENTS = 300
DEMO_ORG_ID = "d3e0d3e0-0000-4000-8000-00000000000a"
DEMO_WORKSPACE_ID = "d3e0d3e0-0000-4000-8000-00000000000b"


@main.command()
@click.argument("event_id", metavar="EVENT_ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--dead-letter-limit",
    default=DEFAULT_TRACE_DEAD_LETTERS,
    show_default=True,
    type=click.IntRange(1, 65_535),  # what one listing takes (a prefetch count)
    help="Most dead letters to look at (from the head of the dead-letter queue).",
)
@settings_options(
    "database_url",
    "amqp_url",
    "queue",
    "replay_queue",
    "dead_letter_queue",
    "statement_cache_size",
    "log_level",
    "log_format",
)
def trace(settings: Settings, event_id: str, as_json: bool, dead_letter_limit: int) -> None:
    """Where is this event? Stored (when, its template and version, the batch's commit
    time), dead-lettered (reason, detail, when), waiting in a queue, or not seen anywhere.

    Looks the event up by primary key, reads at most --dead-letter-limit dead letters and
    hands them back, and only counts the live and replay queues (browsing them would count
    as deliveries toward the delivery limit). Exits 0 if the event is stored, 3 if it is
    not (dead-lettered, waiting or not seen), 1 if a server could not be read.
    """
    import orjson

    from worker.commands import trace as tr

    check_uuid(event_id, "EVENT_ID")
    result = run_async(tr.trace(settings, event_id, dead_letter_limit=dead_letter_limit))
    if as_json:
        click.echo(orjson.dumps(result.as_dict()).decode())
    else:
        click.echo(tr.render(result))
    if result.state == tr.STORED:
        return
    sys.exit(1 if result.errors else 3)


@main.command()
@click.option(
    "--events",
    "count",
    default=DEFAULT_DEMO_EVENTS,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="How many events to publish.",
)
@click.option("--org", "org_id", default=DEMO_ORG_ID, show_default=True, help="Org (UUID).")
@click.option(
    "--workspace",
    "workspace_id",
    default=DEMO_WORKSPACE_ID,
    show_default=True,
    help="Workspace (UUID).",
)
@settings_options("database_url", *BROKER_SETTINGS, "max_event_bytes")
def demo(settings: Settings, count: int, org_id: str, workspace_id: str) -> None:
    """Register a sample template and publish realistic sample events (chat request, model
    response, usage) over the live routing key: data flowing end to end."""
    from worker.commands import demo as dm

    check_uuid(org_id, "--org")
    check_uuid(workspace_id, "--workspace")
    report = run_async(dm.run(settings, count=count, org_id=org_id, workspace_id=workspace_id))
    click.echo(dm.render(report))


main.add_command(templates)
main.add_command(publish)
main.add_command(replay)
main.add_command(dead_letters)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
