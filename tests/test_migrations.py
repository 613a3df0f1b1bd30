"""The Alembic migrations against a real PostgreSQL, checked column by column against the spec."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from worker import migrations

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
        " AND tablename LIKE 'prompt_%'",
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
    version = await fetch(empty_database, "SELECT version_num FROM alembic_version")
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
