"""The ``prompter-worker`` command. Thin: parses, wires, runs.

Every setting of :class:`worker.config.Settings` can be given as an environment variable or
as the matching flag (the flag wins); commands declare which settings they take with
:func:`settings_options`.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from worker import __version__, logs
from worker.config import Settings
from worker.errors import ConfigError, WorkerError

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
            except ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            logs.configure(settings.log_level, settings.log_format)
            return func(*args, settings=settings, **kwargs)

        for name in reversed(names):
            f = by_name[name]
            default = f.default
            shown = "" if f.metadata["secret"] else f" [default: {default}]"
            wrapper = click.option(
                "--" + name.replace("_", "-"),
                name,
                default=None,
                metavar="TEXT",
                help=f"{f.metadata['help']}{shown} [env: {f.metadata['env']}]",
            )(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def run_async(coro: Any) -> Any:
    """Run a coroutine, turning the worker's own errors into a clean exit with a message."""
    try:
        return asyncio.run(coro)
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
@settings_options("database_url", "log_level", "log_format")
def migrate(settings: Settings, revision: str, sql: bool, create_database: bool) -> None:
    """Bring the database schema up to date (alembic upgrade)."""
    from worker import migrations

    if create_database and not sql:
        created = run_async(migrations.create_database(settings.database_url))
        click.echo("database created" if created else "database exists", err=True)
    try:
        migrations.upgrade(settings.database_url, revision, sql=sql)
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"cannot reach PostgreSQL: {exc}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
