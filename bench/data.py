"""A deterministic, realistic data set: chat requests, ~1,200 characters of model text,
usage; 50 templates x 5 version keys over 5 workspaces. The same seed gives the same bytes."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from worker import templates

WORDS = (
    "the",
    "order",
    "shipment",
    "customer",
    "refund",
    "invoice",
    "account",
    "password",
    "delivery",
    "warehouse",
    "tracking",
    "number",
    "address",
    "payment",
    "card",
    "subscription",
    "plan",
    "upgrade",
    "downgrade",
    "support",
    "ticket",
    "priority",
    "model",
    "latency",
    "token",
    "context",
    "window",
    "answer",
    "question",
    "policy",
    "return",
    "exchange",
    "within",
    "days",
    "business",
    "please",
    "thank",
    "you",
    "we",
    "have",
    "checked",
    "your",
    "request",
    "and",
    "can",
    "confirm",
    "that",
    "it",
    "is",
    "processed",
    "today",
    "tomorrow",
    "next",
    "week",
    "because",
    "of",
    "high",
    "demand",
    "in",
    "your",
    "region",
    "sorry",
)
PROVIDERS = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet"), ("google", "gemini-pro")]
START = datetime(2025, 8, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Template:
    org_id: str
    workspace_id: str
    template_id: str
    provider: str
    model_id: str


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def make_templates(seed: int = 1, count: int = 50, workspaces: int = 5) -> list[Template]:
    rng = random.Random(seed)
    orgs = [_uuid(rng) for _ in range(workspaces)]
    spaces = [_uuid(rng) for _ in range(workspaces)]
    out = []
    for i in range(count):
        w = i % workspaces
        provider, model = PROVIDERS[i % len(PROVIDERS)]
        out.append(Template(orgs[w], spaces[w], _uuid(rng), provider, model))
    return out


def make_events(n: int, tpls: list[Template], seed: int = 2, versions: int = 5) -> list[bytes]:
    """``n`` event bodies of about 2 KB, occurred_at spread over a month, in time order."""
    rng = random.Random(seed)
    step = timedelta(days=30) / max(n, 1)
    bodies = []
    for i in range(n):
        t = tpls[rng.randrange(len(tpls))]
        v = rng.randrange(versions)
        prompt_tokens = rng.randrange(50, 400)
        completion_tokens = rng.randrange(100, 500)
        doc = {
            "event_id": _uuid(rng),
            "occurred_at": (START + step * i).isoformat().replace("+00:00", "Z"),
            "org_id": t.org_id,
            "workspace_id": t.workspace_id,
            "template_id": t.template_id,
            "provider": t.provider,
            "provider_version_key": f"{t.model_id}-2025-0{v + 1}-01",
            "model_id": t.model_id,
            "system_fingerprint": f"fp_{v:02d}{rng.getrandbits(24):06x}",
            "fingerprint_captured_at": None,
            "request": {
                "model": t.model_id,
                "messages": [
                    {"role": "system", "content": "You are a concise, friendly support agent."},
                    {"role": "user", "content": _text(rng, 300)},
                ],
                "temperature": 0.2,
                "max_tokens": 600,
            },
            "response": {
                "id": f"chatcmpl-{rng.getrandbits(64):016x}",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": _text(rng, 1200)},
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            "analysis_config": None,
        }
        bodies.append(orjson.dumps(doc))
    return bodies


async def register_templates(conn: asyncpg.Connection, tpls: list[Template]) -> None:
    """Insert the data set's templates with their fixed ids (idempotent)."""
    for t in tpls:
        spec = templates.parse_spec(
            {
                "org_id": t.org_id,
                "workspace_id": t.workspace_id,
                "name": f"bench {t.template_id[:8]}",
                "provider": t.provider,
                "user_prompt_template": f"Answer: {{question}} ({t.template_id})",
                "country_set": ["US"],
                "model_id": t.model_id,
                "inference_params": {"temperature": 0.2},
            }
        )
        await conn.execute(
            """
            INSERT INTO prompt_templates (id, org_id, workspace_id, name, provider,
                user_prompt_template, country_set, model_id, inference_params, config_hash,
                config_canonical_json)
            VALUES ($1, $2, $3, $4, $5, $6, '["US"]', $7, '{"temperature": 0.2}', $8,
                    $9::text::jsonb)
            ON CONFLICT (id) DO NOTHING
            """,
            uuid.UUID(t.template_id),
            uuid.UUID(t.org_id),
            uuid.UUID(t.workspace_id),
            spec.name,
            t.provider,
            spec.config["user_prompt_template"],
            t.model_id,
            spec.config_hash,
            spec.canonical_json.decode(),
        )
