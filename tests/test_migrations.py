"""The Alembic migrations against a real PostgreSQL, checked column by column against the spec."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from worker.store import migrations
from worker.store.schema import HEAD

ROOT = Path(__file__).resolve().parent.parent
SPEC_REVISION = "20250814141329"

# The V7 spec, transcribed: (column, type, nullable, default).
SPEC_COLUMNS: dict[str, list[tuple[str, str, bool, str | None]]] = {
    "prompt_templates": [
        ("id", "uuid", False, "gen_random_uuid()"),
        ("org_id", "uuid", False, None),
        ("workspace_id", "uuid", False, None),
        ("name", "text", False, None),
        ("provider", "text", True, None),
        ("system_instructions", "text", True, None),
        ("user_prompt_template", "text", False, None),
        ("country_set", "jsonb", False, None),
        ("model_id", "text", False, None),
        ("inference_params", "jsonb", False, None),
        ("tools_spec", "jsonb", True, None),
        ("response_format", "jsonb", True, None),
        ("grounding_profile_id", "uuid", True, None),
        ("grounding_snapshot_id", "text", True, None),
        ("retrieval_params", "jsonb", True, None),
        ("config_hash", "text", False, None),
        ("config_canonical_json", "jsonb", False, None),
        ("created_by", "uuid", True, None),
        ("created_at", "timestamp with time zone", False, "now()"),
        ("deleted_at", "timestamp with time zone", True, None),
    ],
    "prompt_versions": [
        ("id", "uuid", False, "gen_random_uuid()"),
        ("org_id", "uuid", False, None),
        ("workspace_id", "uuid", False, None),
        ("template_id", "uuid", True, None),
        ("provider", "text", False, None),
        ("provider_version_key", "text", False, None),
        ("model_id", "text", False, None),
        ("fingerprint_captured_at", "timestamp with time zone", True, None),
        ("first_seen_at", "timestamp with time zone", False, "now()"),
        ("last_seen_at", "timestamp with time zone", False, "now()"),
    ],
    "prompt_results": [
        ("id", "uuid", False, "gen_random_uuid()"),
        ("org_id", "uuid", False, None),
        ("workspace_id", "uuid", False, None),
        ("template_id", "uuid", True, None),
        ("version_id", "uuid", True, None),
        ("provider_version_key", "text", True, None),
        ("system_fingerprint", "text", True, None),
        ("request", "jsonb", False, None),
        ("response", "jsonb", False, None),
        ("analysis_config", "jsonb", True, None),
        ("created_at", "timestamp with time zone", False, "now()"),
    ],
}

SPEC_INDEXES = {
    "prompt_templates_pkey": "CREATE UNIQUE INDEX prompt_templates_pkey ON public.prompt_templates"
    " USING btree (id)",
    "prompt_versions_pkey": "CREATE UNIQUE INDEX prompt_versions_pkey ON public.prompt_versions"
    " USING btree (id)",
    "prompt_results_pkey": "CREATE UNIQUE INDEX prompt_results_pkey ON public.prompt_results"
    " USING btree (id)",
    "ux_tpl_org_ws_confighash_active": "CREATE UNIQUE INDEX ux_tpl_org_ws_confighash_active ON"
    " public.prompt_templates USING btree (org_id, workspace_id, config_hash)"
    " WHERE (deleted_at IS NULL)",
    "ux_versions_org_ws_tpl_pvk": "CREATE UNIQUE INDEX ux_versions_org_ws_tpl_pvk ON"
    " public.prompt_versions USING btree (org_id, workspace_id, template_id,"
    " provider_version_key)",
    "ix_results_tpl_time": "CREATE INDEX ix_results_tpl_time ON public.prompt_results"
    " USING btree (template_id, created_at DESC)",
    "ix_results_workspace": "CREATE INDEX ix_results_workspace ON public.prompt_results"
    " USING btree (workspace_id, created_at DESC)",
}

# Added by the later revision, because the spec is wrong that foreign keys index themselves.
FK_INDEXES = {
    "ix_versions_template_id": "CREATE INDEX ix_versions_template_id ON public.prompt_versions"
    " USING btree (template_id)",
    "ix_results_version_id": "CREATE INDEX ix_results_version_id ON public.prompt_results"
    " USING btree (version_id)",
}

SPEC_FOREIGN_KEYS = {
    ("prompt_versions", "template_id", "prompt_templates", "id"),
    ("prompt_results", "template_id", "prompt_templates", "id"),
    ("prompt_results", "version_id", "prompt_versions", "id"),
}


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def tables(url: str) -> set[str]:
    rows = await fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def indexes(url: str) -> dict[str, str]:
    rows = await fetch(
        url,
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " AND tablename = ANY($1::text[])",
        list(SPEC_COLUMNS),
    )
    return {r["indexname"]: r["indexdef"] for r in rows}


async def test_spec_unit_test(empty_database: str) -> None:
    """The spec's own unit test: upgrade head, inspect tables and the partial index, downgrade."""
    await asyncio.to_thread(migrations.upgrade, empty_database, "head")
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(empty_database)
    )
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda c: inspect(c).get_table_names())
            idx = await connection.run_sync(lambda c: inspect(c).get_indexes("prompt_templates"))
    finally:
        await engine.dispose()
    assert {"prompt_templates", "prompt_versions", "prompt_results"} <= set(names)
    partial = [i for i in idx if i["name"] == "ux_tpl_org_ws_confighash_active"]
    assert len(partial) == 1
    assert partial[0]["unique"] is True
    assert partial[0]["dialect_options"]["postgresql_where"] == "(deleted_at IS NULL)"

    await asyncio.to_thread(
        migrations.downgrade, empty_database, SPEC_REVISION
    )  # back to exactly the spec's revision (through the later ones)
    # prompter's revisions are recorded in its own version table (beside any application's
    # alembic_version).
    version = await fetch(empty_database, "SELECT version_num FROM prompter_alembic_version")
    assert [r["version_num"] for r in version] == [SPEC_REVISION]
    await asyncio.to_thread(
        migrations.downgrade, empty_database, "-1"
    )  # and the spec's revision itself
    assert not {"prompt_templates", "prompt_versions", "prompt_results"} & await tables(
        empty_database
    )


async def test_spec_integration_test(database: str) -> None:
    """Duplicate active template raises IntegrityError; after soft delete it succeeds."""
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(database)
    )
    org, ws = uuid.uuid4(), uuid.uuid4()
    insert = text(
        "INSERT INTO prompt_templates (org_id, workspace_id, name, user_prompt_template,"
        " country_set, model_id, inference_params, config_hash, config_canonical_json)"
        " VALUES (:org, :ws, 't', 'Hello {x}', '[]', 'gpt-4o', '{}', :hash, '{}') RETURNING id"
    )
    params = {"org": org, "ws": ws, "hash": "abc123"}
    try:
        async with engine.begin() as connection:
            tpl1 = (await connection.execute(insert, params)).scalar_one()
        with pytest.raises(IntegrityError):
            async with engine.begin() as connection:
                await connection.execute(insert, params)
        # Another workspace may hold the same config.
        async with engine.begin() as connection:
            await connection.execute(insert, {**params, "ws": uuid.uuid4()})
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE prompt_templates SET deleted_at = :now WHERE id = :id"),
                {"now": datetime.now(UTC), "id": tpl1},
            )
        async with engine.begin() as connection:
            tpl3 = (await connection.execute(insert, params)).scalar_one()
        assert tpl3 != tpl1
    finally:
        await engine.dispose()


async def test_round_trip_keeps_pgcrypto(empty_database: str) -> None:
    """upgrade -> downgrade base -> upgrade all succeed; pgcrypto survives the downgrade."""
    await asyncio.to_thread(migrations.upgrade, empty_database, "head")
    await asyncio.to_thread(migrations.downgrade, empty_database, "base")
    assert not {"prompt_templates", "prompt_versions", "prompt_results"} & await tables(
        empty_database
    )
    ext = await fetch(empty_database, "SELECT extname FROM pg_extension WHERE extname='pgcrypto'")
    assert len(ext) == 1
    await asyncio.to_thread(migrations.upgrade, empty_database, "head")
    assert set(await indexes(empty_database)) == set(SPEC_INDEXES) | set(FK_INDEXES)


async def test_columns_match_spec(database: str) -> None:
    """Every column's type, nullability and default, in the spec's order, from the catalog."""
    for table, expected in SPEC_COLUMNS.items():
        rows = await fetch(
            database,
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1"
            " ORDER BY ordinal_position",
            table,
        )
        actual = [
            (r["column_name"], r["data_type"], r["is_nullable"] == "YES", r["column_default"])
            for r in rows
        ]
        assert actual == expected, table


async def test_indexes_and_keys_match_spec(database: str) -> None:
    """Every index definition is the spec's (plus the foreign-key indexes), and every FK."""
    assert await indexes(database) == SPEC_INDEXES | FK_INDEXES
    rows = await fetch(
        database,
        """
        SELECT c.conrelid::regclass::text AS tbl, a.attname AS col,
               c.confrelid::regclass::text AS ref, af.attname AS refcol
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        JOIN pg_attribute af ON af.attrelid = c.confrelid AND af.attnum = c.confkey[1]
        WHERE c.contype = 'f'
        """,
    )
    assert {(r["tbl"], r["col"], r["ref"], r["refcol"]) for r in rows} == SPEC_FOREIGN_KEYS
    unique = await fetch(
        database,
        "SELECT conname FROM pg_constraint"
        " WHERE contype = 'u' AND conrelid = 'prompt_versions'::regclass",
    )
    assert [r["conname"] for r in unique] == ["ux_versions_org_ws_tpl_pvk"]


async def test_every_foreign_key_is_indexed(database: str) -> None:
    """The spec is wrong that PostgreSQL indexes foreign keys; the later revision does it."""
    rows = await fetch(
        database,
        """
        SELECT c.conrelid::regclass::text AS tbl, c.conname
        FROM pg_constraint c
        WHERE c.contype = 'f' AND NOT EXISTS (
            SELECT 1 FROM pg_index i
            WHERE i.indrelid = c.conrelid
              AND (i.indkey::int2[])[0:array_length(c.conkey, 1) - 1] = c.conkey
        )
        """,
    )
    assert [(r["tbl"], r["conname"]) for r in rows] == []


def test_offline_sql_needs_no_database() -> None:
    """`alembic upgrade head --sql` prints the whole DDL with no server reachable."""
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "CREATE EXTENSION IF NOT EXISTS pgcrypto;" in out
    assert (
        "CREATE UNIQUE INDEX ux_tpl_org_ws_confighash_active ON prompt_templates"
        " (org_id, workspace_id, config_hash) WHERE deleted_at IS NULL;"
    ) in out
    for table in SPEC_COLUMNS:
        assert f"CREATE TABLE {table} (" in out
    assert "CONSTRAINT ux_versions_org_ws_tpl_pvk UNIQUE" in out
    assert (
        "CREATE INDEX ix_results_tpl_time ON prompt_results (template_id, created_at DESC);" in out
    )
    assert out.index("pgcrypto") < out.index("CREATE TABLE prompt_templates")


def test_offline_downgrade_order() -> None:
    """The downgrade drops the indexes, then results -> versions -> templates, not pgcrypto."""
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "downgrade", f"{SPEC_REVISION}:base", "--sql"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    order = [
        out.index("DROP INDEX ix_results_workspace"),
        out.index("DROP INDEX ix_results_tpl_time"),
        out.index("DROP INDEX ux_tpl_org_ws_confighash_active"),
        out.index("DROP TABLE prompt_results"),
        out.index("DROP TABLE prompt_versions"),
        out.index("DROP TABLE prompt_templates"),
    ]
    assert order == sorted(order)
    assert "DROP EXTENSION" not in out


def test_exactly_one_head_and_every_later_revision_says_why() -> None:
    """One linear history; the spec revision is the root and later ones explain themselves."""
    script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    assert len(script.get_heads()) == 1
    assert list(script.get_bases()) == [SPEC_REVISION]
    spec = script.get_revision(SPEC_REVISION)
    assert spec is not None
    assert Path(spec.path).name == "20250814141329_v7_prompt_tables.py"
    for revision in script.walk_revisions():
        if revision.revision != SPEC_REVISION:
            assert "Why:" in (revision.module.__doc__ or ""), revision.revision


# --- living beside, and inside, an application's own Alembic history (issue 18) -------------

APP_REVISION = "1a2b3c4d5e6f"
# The spec's step 2: "Edit the file and set your previous migration ID" on this line.
SPEC_DOWN_REVISION = "down_revision: str | Sequence[str] | None = None"
PROMPTER_TABLES = {"prompt_templates", "prompt_versions", "prompt_results"}

# An application's own env.py, as `alembic init` makes it, on asyncpg; the default version
# table (alembic_version), one transaction for the whole run.
APP_ENV = """
import asyncio

import asyncpg
from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

URL = context.config.attributes["database_url"]


def run(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def main():
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(URL), poolclass=pool.NullPool
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


asyncio.run(main())
"""

APP_REVISION_FILE = f'''"""The application's own tables."""
import sqlalchemy as sa
from alembic import op

revision = "{APP_REVISION}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "app_users", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text)
    )


def downgrade():
    op.drop_table("app_users")
'''


def application(tmp_path: Path, *, embed: bool = False, copy: bool = False) -> Path:
    """An application's Alembic directory with its own history; its alembic.ini.

    ``embed``: prompter's ``alembic/versions`` added to its ``version_locations``.
    ``copy``: the spec's integration instructions to the letter: every prompter revision
    copied into its versions, the V7 one re-parented onto the application's revision.
    """
    root = tmp_path / "app"
    versions = root / "alembic" / "versions"
    versions.mkdir(parents=True)
    (root / "alembic" / "env.py").write_text(APP_ENV)
    (versions / f"{APP_REVISION}_app_tables.py").write_text(APP_REVISION_FILE)
    locations = [str(versions)]
    if embed:
        locations.append(str(ROOT / "alembic" / "versions"))
    if copy:
        for source in sorted((ROOT / "alembic" / "versions").glob("*.py")):
            text = source.read_text()
            if source.name.startswith(SPEC_REVISION):
                assert text.count(SPEC_DOWN_REVISION) == 1
                text = text.replace(SPEC_DOWN_REVISION, f'down_revision = "{APP_REVISION}"')
            (versions / source.name).write_text(text)
    ini = root / "alembic.ini"
    ini.write_text(
        "[alembic]\n"
        f"script_location = {root / 'alembic'}\n"
        f"version_locations = {' '.join(locations)}\n"
        "path_separator = space\n"
    )
    return ini


async def app_alembic(ini: Path, url: str, name: str, revision: str) -> None:
    """The application's `alembic upgrade|downgrade REVISION`."""
    from alembic import command

    config = Config(str(ini))
    config.attributes["database_url"] = url
    await asyncio.to_thread(getattr(command, name), config, revision)


async def with_application_history(ini: Path, url: str) -> None:
    """The database as the application left it: its revision applied, its data in."""
    await app_alembic(ini, url, "upgrade", APP_REVISION)
    await fetch(url, "INSERT INTO app_users (name) VALUES ('ada')")


async def versions(url: str, table: str) -> list[str]:
    if not (await fetch(url, "SELECT to_regclass($1) IS NOT NULL AS e", table))[0]["e"]:
        return []
    return sorted(r["version_num"] for r in await fetch(url, f"SELECT version_num FROM {table}"))


async def application_untouched(url: str) -> None:
    assert [r["name"] for r in await fetch(url, "SELECT name FROM app_users")] == ["ada"]


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTER_")}
    return {**env, "DATABASE_URL": url, "PROMPTER_LOG_FORMAT": "text", **extra}


async def migrate_cli(url: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`prompter-worker migrate ARGS` in a subprocess, as an operator runs it."""
    from tests.helpers import run_cli

    return await asyncio.to_thread(run_cli, "migrate", *args, env=cli_env(url, **extra))


def error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command: exit 2, no traceback."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out.stderr
    return errors[0]


async def schema_state(url: str) -> Any:
    from worker.store import schema

    conn = await asyncpg.connect(url)
    try:
        return await schema.inspect(conn)
    finally:
        await conn.close()


async def test_beside_an_application_history(empty_database: str, tmp_path: Path) -> None:
    """The issue's case 1: a database whose alembic_version holds an application's revision,
    beside its tables. `migrate` applies prompter's history in prompter's own version table;
    the application's record and tables stay; downgrading prompter's history to base
    leaves them in place too."""
    url = empty_database
    ini = application(tmp_path)
    await with_application_history(ini, url)
    out = await migrate_cli(url)
    assert out.returncode == 0, out.stderr
    assert f"schema at revision {HEAD} (in prompter_alembic_version), current" in out.stderr
    assert await versions(url, "alembic_version") == [APP_REVISION]
    assert await versions(url, "prompter_alembic_version") == [HEAD]
    assert await tables(url) >= PROMPTER_TABLES
    await application_untouched(url)

    await asyncio.to_thread(migrations.downgrade, url, "base")
    assert not PROMPTER_TABLES & await tables(url)
    assert await versions(url, "alembic_version") == [APP_REVISION]
    await application_untouched(url)
    # The application's own history still works on it.
    await app_alembic(ini, url, "downgrade", "base")
    assert "app_users" not in await tables(url)


async def test_application_embeds_prompter_branch(empty_database: str, tmp_path: Path) -> None:
    """An application adds prompter's alembic/versions to its version_locations: `alembic
    upgrade heads` applies prompter's history as the `prompter` branch (recorded in the
    application's alembic_version); the workers accept it; `prompter-worker migrate`
    refuses to move that record; `alembic downgrade prompter@base` removes prompter's
    tables and leaves the application's; `alembic upgrade prompter@head` brings them back."""
    url = empty_database
    ini = application(tmp_path, embed=True)
    await with_application_history(ini, url)
    await app_alembic(ini, url, "upgrade", "heads")
    assert await versions(url, "alembic_version") == sorted([APP_REVISION, HEAD])
    assert await tables(url) >= PROMPTER_TABLES
    assert "ix_versions_template_id" in await indexes(url)
    await application_untouched(url)
    state = await schema_state(url)
    assert (state.status, state.recorded_in, state.beside) == (
        "current",
        "alembic_version",
        (APP_REVISION,),
    )

    refused = error_line(await migrate_cli(url))
    assert f"alembic_version records prompter's revision {HEAD} beside {APP_REVISION}" in refused
    assert "(`alembic upgrade heads`)" in refused
    assert await versions(url, "alembic_version") == sorted([APP_REVISION, HEAD])
    assert await versions(url, "prompter_alembic_version") == []

    await app_alembic(ini, url, "downgrade", "prompter@base")
    assert not PROMPTER_TABLES & await tables(url)
    assert await versions(url, "alembic_version") == [APP_REVISION]
    await application_untouched(url)
    # The branch alone, by its label.
    await app_alembic(ini, url, "upgrade", "prompter@head")
    assert await versions(url, "alembic_version") == sorted([APP_REVISION, HEAD])


async def test_copied_v7_revision_reparented(empty_database: str, tmp_path: Path) -> None:
    """The spec's own instructions: the V7 file copied into the application's versions with
    down_revision set to the application's revision, and prompter's later revisions copied
    beside it (they name the V7 revision by its id, which the copy keeps): `alembic upgrade
    head` applies them all on top of the application's history; the workers accept the
    schema; `alembic downgrade <application revision>` (the spec's rollback) removes
    prompter's tables only."""
    url = empty_database
    ini = application(tmp_path, copy=True)
    await with_application_history(ini, url)
    await app_alembic(ini, url, "upgrade", "head")
    assert await versions(url, "alembic_version") == [HEAD]
    assert set(await indexes(url)) == set(SPEC_INDEXES) | set(FK_INDEXES)
    await application_untouched(url)
    state = await schema_state(url)
    assert (state.status, state.recorded_in) == ("current", "alembic_version")

    # prompter-worker migrate cannot tell this record from one an older prompter-worker
    # left: with the application's tables beside it, it refuses rather than move it.
    refused = error_line(await migrate_cli(url))
    assert "the database holds other tables (app_users)" in refused
    assert "upgrade with it (`alembic upgrade head`)" in refused
    assert await versions(url, "alembic_version") == [HEAD]

    await app_alembic(ini, url, "downgrade", APP_REVISION)
    assert not PROMPTER_TABLES & await tables(url)
    assert await versions(url, "alembic_version") == [APP_REVISION]
    await application_untouched(url)


async def legacy_deployment(url: str, revision: str) -> None:
    """A database an older prompter-worker migrated: its revisions in alembic_version, and
    no compatibility records."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROMPTER_VERSION_TABLE", "alembic_version")
        await asyncio.to_thread(migrations.upgrade, url, revision)
    await fetch(url, "DROP TABLE prompter_schema_compat")


async def test_record_of_an_older_release_is_moved(empty_database: str) -> None:
    """An existing deployment (prompter's revision in alembic_version, nothing else in the
    database): `migrate` moves the record to prompter_alembic_version, says so in one line,
    and upgrades from there."""
    url = empty_database
    await legacy_deployment(url, SPEC_REVISION)
    out = await migrate_cli(url)
    assert out.returncode == 0, out.stderr
    moved = [line for line in out.stderr.splitlines() if line.startswith("moved")]
    assert moved == [
        f"moved prompter's schema revision {SPEC_REVISION} from alembic_version to"
        " prompter_alembic_version (prompter's own version table; alembic_version is left to"
        " your application)"
    ]
    assert await versions(url, "prompter_alembic_version") == [HEAD]
    assert await versions(url, "alembic_version") == []
    assert set(await indexes(url)) == set(SPEC_INDEXES) | set(FK_INDEXES)
    # A second run has nothing to move.
    again = await migrate_cli(url)
    assert again.returncode == 0, again.stderr
    assert "moved" not in again.stderr


async def test_record_of_an_older_release_beside_other_tables(empty_database: str) -> None:
    """The same record, in a database that also holds other tables (it could be an
    application's copied V7 revision): refused, naming both fixes; with
    --adopt-alembic-version it is moved."""
    url = empty_database
    await legacy_deployment(url, HEAD)
    await fetch(url, "CREATE TABLE billing (id int)")
    refused = error_line(await migrate_cli(url))
    assert "the database holds other tables (billing)" in refused
    assert "`prompter-worker migrate --adopt-alembic-version`" in refused
    assert await versions(url, "alembic_version") == [HEAD]
    out = await migrate_cli(url, "--adopt-alembic-version")
    assert out.returncode == 0, out.stderr
    assert f"moved prompter's schema revision {HEAD} from alembic_version" in out.stderr
    assert await versions(url, "prompter_alembic_version") == [HEAD]


async def test_version_table_is_configurable(empty_database: str) -> None:
    """PROMPTER_VERSION_TABLE names prompter's version table, for migrate and the check."""
    out = await migrate_cli(empty_database, PROMPTER_VERSION_TABLE="ops_prompter_versions")
    assert out.returncode == 0, out.stderr
    assert await versions(empty_database, "ops_prompter_versions") == [HEAD]
    assert await versions(empty_database, "prompter_alembic_version") == []


async def test_tables_without_a_record_are_not_created_again(database: str) -> None:
    """prompter's tables with no revision recorded anywhere (made by hand): migrate does
    not try to create them again (a traceback at CREATE TABLE); it says how to record the
    revision they match."""
    await fetch(database, "DROP TABLE prompter_alembic_version")
    line = error_line(await migrate_cli(database))
    assert "exist but no revision of prompter's is recorded" in line
    assert "`alembic stamp REVISION`" in line


# --- failures reach the operator as one line, exit 2 ------------------------------------------


async def test_unknown_revisions_are_one_line(database: str) -> None:
    """An unknown --revision, and a database at a revision this release does not know (a
    newer release migrated it): one line each, exit 2, no traceback."""
    line = error_line(await migrate_cli(database, "--revision", "nosuch"))
    assert line == "Error: no revision 'nosuch' in prompter's history (see `alembic history`)"
    await fetch(database, "UPDATE prompter_alembic_version SET version_num = '20991231000000'")
    line = error_line(await migrate_cli(database))
    assert (
        "the database records revision 20991231000000, which this prompter-worker does not" in line
    )
    assert "a newer release migrated it" in line


async def test_unreachable_database_is_one_line_traceback_at_debug() -> None:
    """No server: one line naming it (password masked), exit 2; the traceback only with
    --log-level debug, and still no password."""
    url = "postgresql://someone:s3cretpw@127.0.0.1:1/prompter"
    out = await migrate_cli(url)
    line = error_line(out)
    assert line.startswith("Error: cannot reach PostgreSQL at postgresql://someone:***@127.0.0.1:1")
    assert "s3cretpw" not in out.stderr + out.stdout
    debug = await migrate_cli(url, "--log-level", "debug")
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr
    assert "s3cretpw" not in debug.stderr + debug.stdout


async def test_missing_privilege_is_one_line(empty_database: str) -> None:
    """A role that may not create tables (the workers' runtime role, say): one line saying
    which role migrate needs, exit 2."""
    from tests.conftest import _admin, unique_name, with_user

    role = unique_name("prompter_nopriv")
    await _admin(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw-{role}'")
    try:
        line = error_line(await migrate_cli(with_user(empty_database, role, f"pw-{role}")))
    finally:
        await _admin(f'DROP ROLE "{role}"')
    assert line.startswith("Error: permission denied (")
    assert "migrate needs the role that owns prompter's tables" in line


async def test_lock_timeout_while_another_migrate_runs(empty_database: str) -> None:
    """While another migration holds the migration lock, migrate waits at most
    --lock-timeout, then fails in one line; once the lock is free it runs."""
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", migrations.ADVISORY_LOCK_KEY)
        line = error_line(await migrate_cli(empty_database, "--lock-timeout", "0.5"))
        assert line.startswith("Error: a lock was not granted within lock_timeout (0.5 s)")
        assert not PROMPTER_TABLES & await tables(empty_database)
    finally:
        await conn.close()
    out = await migrate_cli(empty_database)
    assert out.returncode == 0, out.stderr


async def test_concurrent_migrates_run_one_after_the_other(empty_database: str) -> None:
    """Two migrates started together (one per pod): both succeed, the second finding its
    work done; the schema is migrated once."""
    first, second = await asyncio.gather(migrate_cli(empty_database), migrate_cli(empty_database))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert await versions(empty_database, "prompter_alembic_version") == [HEAD]
    assert set(await indexes(empty_database)) == set(SPEC_INDEXES) | set(FK_INDEXES)


# --- migrations verify what they build (issue 19, 6) ----------------------------------------


async def index_valid(url: str, name: str) -> bool | None:
    rows = await fetch(
        url, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name
    )
    return rows[0]["indisvalid"] if rows else None


async def test_interrupted_concurrent_index_build_is_rebuilt(empty_database: str) -> None:
    """A CREATE INDEX CONCURRENTLY interrupted by the lock timeout (a long transaction on
    the table) leaves ix_versions_template_id INVALID and migrate fails in one line; the
    next migrate finds the INVALID index, rebuilds it, and only then records the head."""
    url = empty_database
    await asyncio.to_thread(migrations.upgrade, url, SPEC_REVISION)
    blocker = await asyncpg.connect(url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(
            "INSERT INTO prompt_versions (org_id, workspace_id, provider,"
            " provider_version_key, model_id)"
            " VALUES (gen_random_uuid(), gen_random_uuid(), 'openai', 'k', 'm')"
        )
        line = error_line(await migrate_cli(url, "--lock-timeout", "1"))
        assert line.startswith("Error: a lock was not granted within lock_timeout (1 s)")
        await transaction.rollback()
    finally:
        await blocker.close()
    assert await index_valid(url, "ix_versions_template_id") is False
    assert await versions(url, "prompter_alembic_version") == [SPEC_REVISION]

    out = await migrate_cli(url)
    assert out.returncode == 0, out.stderr
    assert await index_valid(url, "ix_versions_template_id") is True
    assert await index_valid(url, "ix_results_version_id") is True
    assert await versions(url, "prompter_alembic_version") == [HEAD]


async def test_invalid_index_at_head_fails_migrate_naming_the_fix(database: str) -> None:
    """A database already at head with an INVALID index (left before this check existed):
    migrate does not report success; it names the index and the statement that fixes it."""
    await fetch(
        database,
        "UPDATE pg_index SET indisvalid = false"
        " WHERE indexrelid = 'ix_results_version_id'::regclass",
    )
    line = error_line(await migrate_cli(database))
    assert "index ix_results_version_id is INVALID" in line
    assert "`REINDEX INDEX CONCURRENTLY ix_results_version_id`" in line
    await fetch(database, "REINDEX INDEX CONCURRENTLY ix_results_version_id")
    out = await migrate_cli(database)
    assert out.returncode == 0, out.stderr
