"""The ``prompter-worker`` command. Thin: parses, wires, runs.

Every setting of :class:`worker.config.Settings` can be given as an environment variable or
as the matching flag (the flag wins); commands declare which settings they take with
:func:`settings_options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import click

from worker import __version__, logs
from worker.config import Settings, asyncpg_dsn, mask_url
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


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Any]:
    """One connection with the pool's codecs; failures become a clean error message."""
    import asyncpg

    from worker import store

    try:
        conn = await asyncpg.connect(
            asyncpg_dsn(settings.database_url),
            timeout=10,
            statement_cache_size=settings.statement_cache_size,
        )
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach PostgreSQL at {mask_url(settings.database_url)}: {store.classify(exc)}"
        ) from None
    try:
        await store.init_connection(conn)
        yield conn
    finally:
        await conn.close()


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


RUN_SETTINGS = tuple(f.name for f in Settings.fields())


@main.command()
@settings_options(*RUN_SETTINGS)
def run(settings: Settings) -> None:
    """Consume prompt run events and store them (the worker). Stops gracefully on SIGTERM."""
    from worker.consumer import Worker

    code = asyncio.run(Worker(settings).run())
    sys.exit(code)


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

    from worker import status as st

    report = run_async(st.collect(settings))
    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(st.render(report))
    if report.errors:
        sys.exit(1)


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
    import orjson

    from worker import templates as tpl
    from worker.errors import Rejection

    try:
        spec = tpl.parse_spec(orjson.loads(file.read()))
    except orjson.JSONDecodeError as exc:
        raise click.ClickException(f"{file.name}: not JSON: {exc}") from None
    except Rejection as exc:
        raise click.ClickException(f"{file.name}: {exc.detail}") from None

    async def go() -> tuple[str, bool]:
        async with database(settings) as conn:
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

    for value, name in ((org_id, "--org"), (workspace_id, "--workspace")):
        if value is not None:
            _check_uuid(value, name)

    async def go() -> list[tpl.TemplateRow]:
        async with database(settings) as conn:
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

    _check_uuid(template_id, "TEMPLATE_ID")

    async def go() -> bool:
        async with database(settings) as conn:
            return await tpl.soft_delete(conn, template_id)

    if not run_async(go()):
        raise click.ClickException(f"no active template {template_id}")
    click.echo(f"deleted {template_id}")


def _check_uuid(value: str, name: str) -> None:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint=name) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
