"""Migration 20261202090000: request, response and analysis_config compressed with lz4 (the
benchmark's TOAST part measured why); the downgrade gives them back the default, pglz."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from worker.store import migrations

BEFORE = "20261201090000"
REVISION = "20261202090000"
COLUMNS = ("request", "response", "analysis_config")

ATTCOMPRESSION = """
    SELECT attname, attcompression::text FROM pg_attribute
    WHERE attrelid = 'prompt_results'::regclass AND attname = ANY($1::text[])
"""


async def store_large_row(conn: asyncpg.Connection) -> uuid.UUID:
    """One result row whose three JSON values are large and compressible (so TOAST compresses
    them), with the template and version rows it needs; its id."""
    org, ws = uuid.uuid4(), uuid.uuid4()
    tpl = await conn.fetchval(
        """
        INSERT INTO prompt_templates (org_id, workspace_id, name, provider,
            user_prompt_template, country_set, model_id, inference_params, config_hash,
            config_canonical_json)
        VALUES ($1, $2, 'lz4', 'openai', 'q', '["US"]', 'm', '{}', $3, '{}') RETURNING id
        """,
        org,
        ws,
        uuid.uuid4().hex,
    )
    version = await conn.fetchval(
        """
        INSERT INTO prompt_versions (org_id, workspace_id, template_id, provider,
            provider_version_key, model_id, first_seen_at, last_seen_at)
        VALUES ($1, $2, $3, 'openai', 'k', 'm', now(), now()) RETURNING id
        """,
        org,
        ws,
        tpl,
    )
    text = " ".join(f"word{i % 97}" for i in range(20_000))
    row = uuid.uuid4()
    await conn.execute(
        """
        INSERT INTO prompt_results (id, org_id, workspace_id, template_id, version_id,
            provider_version_key, request, response, analysis_config)
        VALUES ($1, $2, $3, $4, $5, 'k', jsonb_build_object('t', $6::text),
            jsonb_build_object('t', $6::text), jsonb_build_object('t', $6::text))
        """,
        row,
        org,
        ws,
        tpl,
        version,
        text,
    )
    return row


async def value_compression(conn: asyncpg.Connection, row: uuid.UUID) -> set[str]:
    """How each of the row's three values is compressed, as stored."""
    got = await conn.fetchrow(
        "SELECT pg_column_compression(request), pg_column_compression(response),"
        " pg_column_compression(analysis_config) FROM prompt_results WHERE id = $1",
        row,
    )
    return set(got)


async def test_upgrade_sets_lz4_and_downgrade_gives_back_pglz(empty_database: str) -> None:
    """After the upgrade the three columns are declared lz4 and a value stored then is lz4
    (one stored before keeps pglz, readable); after the downgrade they are back to the
    default and a new value is pglz again."""
    await asyncio.to_thread(migrations.upgrade, empty_database, BEFORE)
    conn = await asyncpg.connect(empty_database)
    try:
        before = await store_large_row(conn)
        assert await value_compression(conn, before) == {"pglz"}

        await asyncio.to_thread(migrations.upgrade, empty_database, REVISION)
        declared = dict(await conn.fetch(ATTCOMPRESSION, list(COLUMNS)))
        assert declared == dict.fromkeys(COLUMNS, "l")
        after = await store_large_row(conn)
        assert await value_compression(conn, after) == {"lz4"}
        assert await value_compression(conn, before) == {"pglz"}
        assert await conn.fetchval(
            "SELECT request = response FROM prompt_results WHERE id = $1", after
        )

        await asyncio.to_thread(migrations.downgrade, empty_database, BEFORE)
        declared = dict(await conn.fetch(ATTCOMPRESSION, list(COLUMNS)))
        assert declared == dict.fromkeys(COLUMNS, "")
        again = await store_large_row(conn)
        assert await value_compression(conn, again) == {"pglz"}
        assert await value_compression(conn, after) == {"lz4"}
    finally:
        await conn.close()
