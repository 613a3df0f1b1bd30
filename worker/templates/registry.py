"""Templates in the database: register (returning the active template that already has
the config, if any), list and soft-delete, each statement named in :class:`SQL`.

Registering a config that an active template of the same workspace already has returns
that template: the partial unique index ``ux_tpl_org_ws_confighash_active`` makes this
race-safe under concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg
import rfc8785

from worker.templates.spec import TemplateSpec


class SQL:
    """Every statement about templates, by name."""

    REGISTER: Final = """
        INSERT INTO prompt_templates
            (org_id, workspace_id, name, provider, system_instructions, user_prompt_template,
             country_set, model_id, inference_params, tools_spec, response_format,
             grounding_profile_id, grounding_snapshot_id, retrieval_params, config_hash,
             config_canonical_json, created_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9::text::jsonb, $10::text::jsonb,
                $11::text::jsonb, $12, $13, $14::text::jsonb, $15, $16::text::jsonb, $17)
        ON CONFLICT (org_id, workspace_id, config_hash) WHERE deleted_at IS NULL DO NOTHING
        RETURNING id
    """
    ACTIVE_BY_HASH: Final = """
        SELECT id FROM prompt_templates
        WHERE org_id = $1 AND workspace_id = $2 AND config_hash = $3 AND deleted_at IS NULL
    """
    LIST: Final = """
        SELECT id, org_id, workspace_id, name, model_id, config_hash, created_at, deleted_at
        FROM prompt_templates
        WHERE ($1::uuid IS NULL OR org_id = $1)
          AND ($2::uuid IS NULL OR workspace_id = $2)
          AND ($3 OR deleted_at IS NULL)
        ORDER BY created_at, id
        LIMIT $4
    """
    SOFT_DELETE: Final = """
        UPDATE prompt_templates SET deleted_at = now()
        WHERE id = $1 AND deleted_at IS NULL
        RETURNING deleted_at
    """


@dataclass(frozen=True, kw_only=True)
class TemplateRow:
    id: str
    org_id: str
    workspace_id: str
    name: str
    model_id: str
    config_hash: str
    created_at: datetime
    deleted_at: datetime | None


def _json(value: Any) -> str | None:
    """JSON text for a ``$n::text::jsonb`` parameter, independent of connection codecs: the
    value's canonical form, so the stored columns say what the hash was computed over."""
    return None if value is None else rfc8785.dumps(value).decode()


async def register(conn: asyncpg.Connection, spec: TemplateSpec) -> tuple[str, bool]:
    """Register ``spec``; return (template id, True if created, False if it existed).

    Race-safe: of several concurrent registrations of one config in one workspace, exactly
    one inserts and the others return its id.
    """
    digest = spec.config_hash
    c = spec.config
    while True:
        created = await conn.fetchval(
            SQL.REGISTER,
            UUID(spec.org_id),
            UUID(spec.workspace_id),
            spec.name,
            c.get("provider"),
            c.get("system_instructions"),
            c["user_prompt_template"],
            _json(c["country_set"]),
            c["model_id"],
            _json(c["inference_params"]),
            _json(c.get("tools_spec")),
            _json(c.get("response_format")),
            UUID(c["grounding_profile_id"]) if c.get("grounding_profile_id") else None,
            c.get("grounding_snapshot_id"),
            _json(c.get("retrieval_params")),
            digest,
            spec.canonical_json.decode(),
            UUID(spec.created_by) if spec.created_by else None,
        )
        if created is not None:
            return str(created), True
        existing = await conn.fetchval(
            SQL.ACTIVE_BY_HASH, UUID(spec.org_id), UUID(spec.workspace_id), digest
        )
        if existing is not None:
            return str(existing), False
        # The active duplicate was soft-deleted between our insert and our select: again.


async def list_templates(
    conn: asyncpg.Connection,
    *,
    org_id: str | None = None,
    workspace_id: str | None = None,
    include_deleted: bool = False,
    limit: int = 1000,
) -> list[TemplateRow]:
    rows = await conn.fetch(
        SQL.LIST,
        UUID(org_id) if org_id else None,
        UUID(workspace_id) if workspace_id else None,
        include_deleted,
        limit,
    )
    return [
        TemplateRow(
            id=str(r["id"]),
            org_id=str(r["org_id"]),
            workspace_id=str(r["workspace_id"]),
            name=r["name"],
            model_id=r["model_id"],
            config_hash=r["config_hash"],
            created_at=r["created_at"],
            deleted_at=r["deleted_at"],
        )
        for r in rows
    ]


async def soft_delete(conn: asyncpg.Connection, template_id: str) -> bool:
    """Mark a template deleted; False if it does not exist or is deleted already.

    A deleted template still takes results: history arrives late.
    """
    return await conn.fetchval(SQL.SOFT_DELETE, UUID(template_id)) is not None
