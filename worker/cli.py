"""The ``prompter-worker`` command. Thin: parses, wires, runs.

Every setting of :class:`worker.config.Settings` can be given as an environment variable or
as the matching flag (the flag wins); commands declare which settings they take with
:func:`settings_options`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from worker import __version__, logs, tracing
from worker.config import Settings
from worker.errors import ConfigError, SchemaError, WorkerError

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(*names: str) -> Callable[[F], F]:
    """Add one ``--flag`` per named setting; the command receives ``settings: Settings``."""
    by_name = {f.name: f for f in Settings.fields()}

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name) for name in names}
            try:
                settings = Settings.from_env(**overrides)
                logs.configure(settings.log_level, settings.log_format)
                tracing.setup()  # only if OTEL_* asks for it (worker.tracing)
            except ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            return func(*args, settings=settings, **kwargs)

        for name in reversed(names):
            f = by_name[name]
            default = f.default
            flag = name.replace("_", "-")
            if isinstance(default, bool):
                shown = f" [default: {'--' if default else '--no-'}{flag}]"
                decls = [f"--{flag}/--no-{flag}", name]
                metavar = None
            else:
                shown = "" if f.metadata["secret"] else f" [default: {default}]"
                decls = [f"--{flag}", name]
                metavar = "NUMBER" if isinstance(default, (int, float)) else "TEXT"
            wrapper = click.option(
                *decls,
                default=None,
                metavar=metavar,
                help=f"{f.metadata['help']}{shown} [env: {f.metadata['env']}]",
            )(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def run_async(coro: Any) -> Any:
    """Run a coroutine, turning the worker's own errors into a clean exit with a message
    (exit 2 for a schema the command cannot run on)."""
    try:
        return asyncio.run(coro)
    except SchemaError as exc:
        _exit_2(exc)
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None


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
        _exit_2(exc)
    if outcome.schema is not None:
        note(outcome.schema.describe())
        for warning in outcome.schema.warnings:
            note(f"warning: {warning}")


def _exit_2(exc: BaseException) -> NoReturn:
    """One line on stderr and exit 2; the traceback only at --log-level debug."""
    logging.getLogger("worker.cli").debug("failed", exc_info=exc)
    click.echo(f"Error: {exc}", err=True)
    sys.exit(2)


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


@main.command()
@click.argument("event_id", metavar="EVENT_ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--dead-letter-limit",
    default=DEFAULT_TRACE_DEAD_LETTERS,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
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

    _check_uuid(event_id, "EVENT_ID")
    result = run_async(tr.trace(settings, event_id, dead_letter_limit=dead_letter_limit))
    if as_json:
        click.echo(orjson.dumps(result.as_dict()).decode())
    else:
        click.echo(tr.render(result))
    if result.state == tr.STORED:
        return
    sys.exit(1 if result.errors else 3)


@main.group()
def templates() -> None:
    """Register, list and soft-delete prompt templates."""


@templates.command("add")
@click.argument("file", type=click.File("rb"))
@settings_options("database_url", "log_level", "log_format")
def templates_add(settings: Settings, file: Any) -> None:
    """Register the template in FILE (JSON; - for stdin). Prints its id.

    Registering a config that an active template of the workspace already has returns that
    template instead of a copy.
    """

    from worker import templates as tpl
    from worker.errors import Rejection
    from worker.store import pool, schema

    try:
        spec = tpl.load_spec(file.read())  # numbers read exactly, for the canonical form
    except Rejection as exc:
        raise click.ClickException(f"{file.name}: {exc.detail}") from None

    async def go() -> tuple[str, bool]:
        async with pool.connect(settings) as conn:
            await schema.require(conn, database_url=settings.database_url)
            return await tpl.register(conn, spec)

    template_id, created = run_async(go())
    click.echo(template_id)
    click.echo("registered" if created else "already registered (same config)", err=True)


@templates.command("list")
@click.option("--org", "org_id", help="Only this org (UUID).")
@click.option("--workspace", "workspace_id", help="Only this workspace (UUID).")
@click.option("--all", "include_deleted", is_flag=True, help="Include soft-deleted templates.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@settings_options("database_url", "log_level", "log_format")
def templates_list(
    *,
    settings: Settings,
    org_id: str | None,
    workspace_id: str | None,
    include_deleted: bool,
    as_json: bool,
    limit: int,
) -> None:
    """List templates, oldest first."""
    import dataclasses

    import orjson

    from worker import templates as tpl
    from worker.store import pool, schema

    for value, name in ((org_id, "--org"), (workspace_id, "--workspace")):
        if value is not None:
            _check_uuid(value, name)

    async def go() -> list[tpl.TemplateRow]:
        async with pool.connect(settings) as conn:
            await schema.require(conn, database_url=settings.database_url)
            return await tpl.list_templates(
                conn,
                org_id=org_id,
                workspace_id=workspace_id,
                include_deleted=include_deleted,
                limit=limit,
            )

    rows = run_async(go())
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(dataclasses.asdict(row)).decode())
        return
    click.echo(f"{'id':36}  {'workspace':36}  {'model':20}  {'state':8}  name")
    for row in rows:
        state = "deleted" if row.deleted_at else "active"
        click.echo(
            f"{row.id:36}  {row.workspace_id:36}  {row.model_id[:20]:20}  {state:8}  {row.name}"
        )


@templates.command("delete")
@click.argument("template_id")
@settings_options("database_url", "log_level", "log_format")
def templates_delete(settings: Settings, template_id: str) -> None:
    """Soft-delete a template. Its history stays, and late results are still accepted."""
    from worker import templates as tpl
    from worker.store import pool, schema

    _check_uuid(template_id, "TEMPLATE_ID")

    async def go() -> bool:
        async with pool.connect(settings) as conn:
            await schema.require(conn, database_url=settings.database_url)
            return await tpl.soft_delete(conn, template_id)

    if not run_async(go()):
        raise click.ClickException(f"no active template {template_id}")
    click.echo(f"deleted {template_id}")


# --- publishing and backfill ---------------------------------------------------------------

#: Settings of every command that publishes (the topology is declared, or checked, first).
BROKER_SETTINGS = (
    "amqp_url",
    "exchange",
    "queue",
    "replay_queue",
    "dead_letter_exchange",
    "dead_letter_queue",
    "delivery_limit",
    "declare",
    "log_level",
    "log_format",
)
# Defaults repeated from their modules, which are imported only when a command runs (so
# --help stays fast); tests/test_backfill_cli.py checks that they agree.
DEFAULT_WINDOW = 256
DEFAULT_BATCH_SIZE = 1000
DEFAULT_CONCURRENCY = 2
DEFAULT_REJECTS_PATH = "prompter-rejects.jsonl"
DEFAULT_DEMO_EVENTS = 300
DEMO_ORG_ID = "d3e0d3e0-0000-4000-8000-00000000000a"
DEMO_WORKSPACE_ID = "d3e0d3e0-0000-4000-8000-00000000000b"

window_option = click.option(
    "--window",
    type=click.IntRange(1, 65_535),
    default=DEFAULT_WINDOW,
    show_default=True,
    help="Messages awaiting their broker confirm at once.",
)


def _finish(report: Any, *, as_json: bool) -> None:
    """Print a publish/replay report; exit 0 if all settled, 130 if interrupted, else 1."""
    import orjson

    from worker.backfill import reports

    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(reports.render(report, with_error=False))
        if report.error:
            click.echo(f"Error: {report.error}", err=True)
    if report.interrupted:
        sys.exit(130)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("file", default="-", metavar="[FILE|-]")
@window_option
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(dir_okay=False),
    help="Also append each invalid line (file, line, reason, detail) to this JSONL file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@settings_options(*BROKER_SETTINGS, "max_event_bytes", "max_held_bytes")
def publish(
    settings: Settings, file: str, window: int, rejects_path: str | None, as_json: bool
) -> None:
    """Publish the events of a JSONL file (plain or gzip; - or nothing reads stdin) with
    routing key prompt_run.v1.

    Each line is checked against the event contract first; invalid lines are reported with
    their line number and reason and never sent. Exits 1 if any line was invalid or any
    event was not confirmed by the broker.
    """
    from worker.amqp import broker
    from worker.backfill import replay

    report = run_async(
        replay.run_broker(
            settings,
            [file],
            mode="publish",
            routing_key=broker.LIVE_ROUTING_KEY,
            window=window,
            rejects_path=rejects_path,
            progress=sys.stderr.isatty(),
            name="prompter-worker publish",
        )
    )
    _finish(report, as_json=as_json)


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option(
    "--direct",
    is_flag=True,
    help="Write straight into PostgreSQL through the store, without the broker.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="At most this many events per second (paced, not bursty).",
)
@click.option("--dry-run", is_flag=True, help="Validate and report; send and store nothing.")
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(dir_okay=False),
    help="Record the confirmed lines of each file here; a re-run continues after them.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Resume even if a file changed since the checkpoint (e.g. it was appended to).",
)
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(dir_okay=False),
    help="Append each refused line (file, line, reason, detail) to this JSONL file. "
    f"With --direct the default is {DEFAULT_REJECTS_PATH}.",
)
@click.option(
    "--batch-size",
    "direct_batch_size",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="With --direct: events per transaction.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 32),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="With --direct: transactions in flight (one PostgreSQL connection each).",
)
@window_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@settings_options(
    "database_url",
    *BROKER_SETTINGS,
    "max_event_bytes",
    "max_held_bytes",
    "batch_max_bytes",
    "statement_cache_size",
    "retry_max_seconds",
)
def replay(
    *,
    settings: Settings,
    files: tuple[str, ...],
    direct: bool,
    rate: float | None,
    dry_run: bool,
    checkpoint_path: str | None,
    force: bool,
    rejects_path: str | None,
    direct_batch_size: int,
    concurrency: int,
    window: int,
    as_json: bool,
) -> None:
    """Backfill history from JSONL files (plain or gzip), keeping each event's occurred_at.

    Through the broker with routing key prompt_run.v1.replay (its own queue, so backfill
    never starves live traffic), or with --direct straight into PostgreSQL. A progress bar
    with rate and ETA is drawn when stderr is a terminal. Interrupted (Ctrl-C, SIGTERM) with
    --checkpoint, the same command continues where the confirmed part ended. Exits 1 if any
    line was invalid or not confirmed, 130 if interrupted.
    """
    from worker.amqp import broker
    from worker.backfill import replay as rp

    progress = sys.stderr.isatty()
    if direct:
        report = run_async(
            rp.run_direct(
                settings,
                files,
                batch_size=direct_batch_size,
                concurrency=concurrency,
                rate=rate,
                dry_run=dry_run,
                checkpoint_path=checkpoint_path,
                force=force,
                rejects_path=rejects_path or DEFAULT_REJECTS_PATH,
                progress=progress,
            )
        )
    else:
        report = run_async(
            rp.run_broker(
                settings,
                files,
                mode="replay",
                routing_key=broker.REPLAY_ROUTING_KEY,
                window=window,
                rate=rate,
                dry_run=dry_run,
                checkpoint_path=checkpoint_path,
                force=force,
                rejects_path=rejects_path,
                progress=progress,
            )
        )
    _finish(report, as_json=as_json)


@main.group("dead-letters")
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
        _check_uuid(value, "--event-id")
    return deadletters.Selection(
        reasons=frozenset(reasons),
        event_ids=frozenset([*(e.lower() for e in event_ids), *keys]),
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

    _check_uuid(org_id, "--org")
    _check_uuid(workspace_id, "--workspace")
    report = run_async(dm.run(settings, count=count, org_id=org_id, workspace_id=workspace_id))
    click.echo(dm.render(report))


def _check_uuid(value: str, name: str) -> None:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint=name) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
