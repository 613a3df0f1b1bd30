"""The ``publish`` and ``replay`` commands: events from JSON-lines files, through the broker
or (``replay --direct``) straight into the database (:mod:`worker.backfill`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from worker.commands.options import (
    BROKER_SETTINGS,
    run_async,
    settings_options,
    window_option,
)
from worker.config import Settings

# Defaults repeated from their modules, which are imported only when a command runs (so
# --help stays fast); tests/test_backfill_cli.py checks that they agree.
DEFAULT_BATCH_SIZE = 1000
DEFAULT_CONCURRENCY = 2
DEFAULT_REJECTS_PATH = "prompter-rejects.jsonl"


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


@click.command()
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
    from worker.backfill import replay

    options = replay.ReplayOptions(
        paths=[file],
        mode="publish",
        window=window,
        rejects_path=rejects_path,
        progress=sys.stderr.isatty(),
    )
    report = run_async(replay.run(settings, options))
    _finish(report, as_json=as_json)


@click.command()
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
    from worker.backfill import replay as rp

    options = rp.ReplayOptions(
        paths=files,
        mode="direct" if direct else "replay",
        dry_run=dry_run,
        checkpoint_path=checkpoint_path,
        force=force,
        rejects_path=rejects_path or (DEFAULT_REJECTS_PATH if direct else None),
        rate=rate,
        progress=sys.stderr.isatty(),
        window=window,
        batch_size=direct_batch_size,
        concurrency=concurrency,
    )
    report = run_async(rp.run(settings, options))
    _finish(report, as_json=as_json)
