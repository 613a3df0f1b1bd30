"""Migration 20261201090000: templates registered the old way get their canonical config JSON
and hash recomputed by RFC 8785; two active templates that become equal stop it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from tests.factories import template_doc
from tests.helpers import run_cli
from worker import templates
from worker.errors import PermanentError
from worker.store import migrations

BEFORE = "20261124090000"
REVISION = "20261201090000"

INSERT = """
    INSERT INTO prompt_templates
        (org_id, workspace_id, name, provider, system_instructions, user_prompt_template,
         country_set, model_id, inference_params, tools_spec, config_hash,
         config_canonical_json, created_at, deleted_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9::text::jsonb, $10::text::jsonb,
            $11, $12::text::jsonb, $13, $14)
    RETURNING id
"""


def old_canonical(config: dict[str, Any]) -> bytes:
    """How templates were canonicalized before RFC 8785 (orjson, keys by code point)."""
    return orjson.dumps(
        {k: v for k, v in config.items() if v is not None}, option=orjson.OPT_SORT_KEYS
    )


async def register_the_old_way(
    conn: asyncpg.Connection,
    org: str,
    ws: str,
    name: str,
    document: str,
    *,
    at: str,
    deleted: bool = False,
) -> tuple[str, str]:
    """Insert a template as the former code did: the file parsed by orjson (numbers through
    Python floats), each JSON column and the canonical form written by orjson. (id, hash)."""
    doc = orjson.loads(document)
    config = {k: doc.get(k) for k in templates.CONFIG_FIELDS}
    canonical = old_canonical(config)
    digest = hashlib.sha256(canonical).hexdigest()
    created = datetime.fromisoformat(at).replace(tzinfo=UTC)

    def js(value: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    template_id = await conn.fetchval(
        INSERT,
        uuid.UUID(org),
        uuid.UUID(ws),
        name,
        config["provider"],
        config["system_instructions"],
        config["user_prompt_template"],
        js(config["country_set"]),
        config["model_id"],
        js(config["inference_params"]),
        js(config["tools_spec"]),
        digest,
        canonical.decode(),
        created,
        created if deleted else None,
    )
    return str(template_id), digest


def document(org: str, ws: str, params: str, **overrides: Any) -> str:
    """A template file whose inference_params are written exactly as ``params``."""
    text = json.dumps(template_doc(org, ws, inference_params={"P": 0}, **overrides))
    return text.replace('{"P": 0}', params)


async def hashes(conn: asyncpg.Connection) -> dict[str, tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT id, config_hash, config_canonical_json::text AS j FROM prompt_templates"
    )
    return {str(r["id"]): (r["config_hash"], r["j"]) for r in rows}


async def test_old_templates_are_rehashed_and_equal_active_ones_stop_the_migration(
    empty_database: str,
) -> None:
    """Templates registered the old way (5.120e2 stored as 512.0; keys sorted by code
    point), then migrated:

    - two ACTIVE templates of a workspace that JCS makes equal (temperature 512.0 and 512)
      stop the migration with a message naming both and the fix, and nothing changes;
    - once one of them is soft-deleted (the fix), the migration recomputes every hash and
      canonical JSON as ``templates.config_hash`` computes them now (a soft-deleted twin
      never collides), and registering the same config returns the existing template;
    - the downgrade gives back exactly the former hashes."""
    await asyncio.to_thread(migrations.upgrade, empty_database, BEFORE)
    org, ws, other_ws = (str(uuid.uuid4()) for _ in range(3))
    conn = await asyncpg.connect(empty_database)
    try:
        older, older_hash = await register_the_old_way(
            conn, org, ws, "older", document(org, ws, '{"temperature": 5.120e2}'), at="2025-01-01"
        )
        newer, newer_hash = await register_the_old_way(
            conn, org, ws, "newer", document(org, ws, '{"temperature": 512}'), at="2025-02-01"
        )
        deleted, _ = await register_the_old_way(
            conn,
            org,
            ws,
            "deleted twin",
            document(org, ws, '{"temperature": 512.000}'),
            at="2025-01-15",
            deleted=True,
        )
        plain, plain_hash = await register_the_old_way(
            conn, org, other_ws, "plain", document(org, other_ws, '{"top_k": 40}'), at="2025-03-01"
        )
        keys, keys_hash = await register_the_old_way(
            conn,
            org,
            other_ws,
            "astral keys",
            document(org, other_ws, '{"\\ufb01": 1, "\\ud83d\\ude00": 2}'),
            at="2025-04-01",
        )
        before = await hashes(conn)
        assert older_hash != newer_hash  # 512.0 and 512: two templates the old way

        with pytest.raises(PermanentError) as info:
            await asyncio.to_thread(migrations.upgrade, empty_database, REVISION)
        message = str(info.value)
        assert older in message
        assert newer in message
        assert deleted not in message
        assert plain not in message
        assert "prompter-worker templates delete" in message
        assert "Nothing was changed" in message
        assert await hashes(conn) == before
        assert await conn.fetchval("SELECT version_num FROM prompter_alembic_version") == BEFORE

        # the message's fix, then again
        await conn.execute(
            "UPDATE prompt_templates SET deleted_at = now() WHERE id = $1", uuid.UUID(newer)
        )
        await asyncio.to_thread(migrations.upgrade, empty_database, REVISION)
        after = await hashes(conn)
        for template_id in (older, newer, deleted, plain, keys):
            doc = orjson.loads(
                await conn.fetchval(
                    "SELECT config_canonical_json::text FROM prompt_templates WHERE id = $1",
                    uuid.UUID(template_id),
                )
            )
            assert after[template_id][0] == templates.config_hash(doc), template_id
        expected = {k: v for k, v in template_doc(org, ws).items() if k in templates.CONFIG_FIELDS}
        expected["inference_params"] = {"temperature": 512}
        jcs = templates.config_hash(expected)
        assert after[older][0] == after[newer][0] == after[deleted][0] == jcs
        assert after[plain][0] == plain_hash  # nothing in it that JCS writes otherwise
        assert after[keys][0] != keys_hash  # UTF-16 order: the astral key first now
        assert '"temperature": 512}' in after[older][1]

        spec = templates.load_spec(document(org, ws, '{"temperature": 512.0}'))
        assert await templates.register(conn, spec) == (older, False)

        await asyncio.to_thread(migrations.downgrade, empty_database, BEFORE)
        restored = await hashes(conn)
        assert {k: v[0] for k, v in restored.items()} == {k: v[0] for k, v in before.items()}
    finally:
        await conn.close()


def test_migrate_says_why_it_stops_without_a_traceback(empty_database: str) -> None:
    """`prompter-worker migrate` over two colliding templates: exit 2 (like every failed
    migration), the migration's message naming them, no traceback."""
    migrations.upgrade(empty_database, BEFORE)
    org, ws = str(uuid.uuid4()), str(uuid.uuid4())

    async def insert() -> list[str]:
        conn = await asyncpg.connect(empty_database)
        try:
            return [
                (await register_the_old_way(conn, org, ws, n, document(org, ws, p), at=at))[0]
                for n, p, at in (("a", '{"t": 1}', "2025-01-01"), ("b", '{"t": 1.0}', "2025-01-02"))
            ]
        finally:
            await conn.close()

    ids = asyncio.run(insert())
    out = run_cli("migrate", env={"PATH": "/usr/bin:/bin", "DATABASE_URL": empty_database})
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    for template_id in ids:
        assert template_id in out.stderr
    assert "soft-delete" in out.stderr
