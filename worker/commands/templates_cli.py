"""The ``templates`` commands: register, list and soft-delete prompt templates."""

from __future__ import annotations

from typing import Any

import click

from worker.commands.options import check_uuid, run_async, settings_options
from worker.config import Settings


@click.group()
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
            check_uuid(value, name)

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

    check_uuid(template_id, "TEMPLATE_ID")

    async def go() -> bool:
        async with pool.connect(settings) as conn:
            await schema.require(conn, database_url=settings.database_url)
            return await tpl.soft_delete(conn, template_id)

    if not run_async(go()):
        raise click.ClickException(f"no active template {template_id}")
    click.echo(f"deleted {template_id}")
