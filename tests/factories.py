"""Builders of realistic events and templates for the tests."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from worker import templates
from worker.events import Event, decode

BASE_TIME = datetime(2025, 8, 14, 14, 13, 29, tzinfo=UTC)


@dataclass(frozen=True)
class Tenant:
    org_id: str
    workspace_id: str
    template_id: str


def template_doc(org_id: str, workspace_id: str, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "org_id": org_id,
        "workspace_id": workspace_id,
        "name": "Support answer",
        "provider": "openai",
        "system_instructions": "You are a helpful support agent.",
        "user_prompt_template": "Answer the customer: {question}",
        "country_set": ["DE", "FR", "US"],
        "model_id": "gpt-4o",
        "inference_params": {"temperature": 0.2, "max_tokens": 512},
    }
    doc.update(overrides)
    return doc


async def make_tenant(conn: asyncpg.Connection, **overrides: Any) -> Tenant:
    """Register a template in a fresh org and workspace."""
    org, ws = str(uuid.uuid4()), str(uuid.uuid4())
    spec = templates.parse_spec(
        template_doc(org, ws, user_prompt_template=f"Q {uuid.uuid4()}", **overrides)
    )
    template_id, _ = await templates.register(conn, spec)
    return Tenant(org, ws, template_id)


def event_doc(
    tenant: Tenant,
    *,
    event_id: Any = None,
    occurred_at: Any = None,
    version_key: str = "gpt-4o-2024-08-06",
    rng: random.Random | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    rng = rng or random.Random()
    at = occurred_at or BASE_TIME + timedelta(seconds=rng.randrange(86_400))
    stamp = at if isinstance(at, str) else at.isoformat().replace("+00:00", "Z")
    doc: dict[str, Any] = {
        "event_id": event_id or str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurred_at": stamp,
        "org_id": tenant.org_id,
        "workspace_id": tenant.workspace_id,
        "template_id": tenant.template_id,
        "provider": "openai",
        "provider_version_key": version_key,
        "model_id": "gpt-4o",
        "system_fingerprint": "fp_" + version_key[-6:],
        "fingerprint_captured_at": None,
        "request": {
            "messages": [
                {"role": "system", "content": "You are a helpful support agent."},
                {"role": "user", "content": f"Where is my order #{rng.randrange(10**6)}?"},
            ],
            "temperature": 0.2,
        },
        "response": {
            "choices": [{"message": {"role": "assistant", "content": "It ships today. " * 20}}],
            "usage": {"prompt_tokens": 42, "completion_tokens": 120},
        },
        "analysis_config": None,
    }
    doc.update(overrides)
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def event(tenant: Tenant, **kwargs: Any) -> Event:
    decoded = decode(encode(event_doc(tenant, **kwargs)))
    assert isinstance(decoded, Event), decoded
    return decoded


def spaced(e: Event) -> Event:
    """The same event with its body indented: valid JSON, but not orjson's compact form, so
    it has no ``columns`` and the store parses its whole body."""
    decoded = decode(orjson.dumps(orjson.loads(e.body), option=orjson.OPT_INDENT_2))
    assert isinstance(decoded, Event), decoded
    assert decoded.columns is None
    return decoded


async def snapshot(conn: asyncpg.Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Both ingestion tables as comparable values (version ids replaced by their keys)."""
    versions = await conn.fetch(
        """
        SELECT org_id, workspace_id, template_id, provider_version_key, provider, model_id,
               fingerprint_captured_at, first_seen_at, last_seen_at
        FROM prompt_versions ORDER BY 1, 2, 3, 4
        """
    )
    results = await conn.fetch(
        """
        SELECT r.id, r.org_id, r.workspace_id, r.template_id,
               (v.org_id, v.workspace_id, v.template_id, v.provider_version_key)::text AS version,
               r.provider_version_key, r.system_fingerprint, r.request::text, r.response::text,
               r.analysis_config::text, r.created_at
        FROM prompt_results r LEFT JOIN prompt_versions v ON v.id = r.version_id
        ORDER BY r.id
        """
    )
    return [tuple(r) for r in versions], [tuple(r) for r in results]
