"""A deterministic, realistic data set: chat requests, ~1,200 characters of model text,
usage; 50 templates x 5 version keys over 5 workspaces. The same seed gives the same bytes."""

from __future__ import annotations

import itertools
import math
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

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
            **_identity(rng, t, v, START + step * i),
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


# --- production-sized events ---------------------------------------------------------------

#: The size mix: log-normal body sizes, median 4 KiB; sigma fitted (least squares in log
#: space) to p90 ~40 KB and p99 ~400 KB, which no single log-normal meets exactly: it gives
#: p90 48 KiB, p99 365 KiB, a mean of 26 KiB; capped at 4 MiB.
MIX_MEDIAN: Final = 4096
MIX_SIGMA: Final = 1.94
MIX_CAP: Final = 4 * 2**20
#: The fixed sizes measured beside the mix.
FIXED_SIZES: Final = (2 * 1024, 64 * 1024, 2**20)
_SYLLABLES = (
    "ka", "to", "ri", "men", "sa", "lo", "ven", "tor", "al", "is", "qu", "ex", "pra", "dun",
    "el", "or", "im", "ber", "cas", "fi", "gol", "hy", "jan", "ket", "lum", "nor", "op",
    "pe", "ru", "sim", "tal", "ud", "vo", "wil", "yr", "zen", "ach", "bro", "cre", "dri",
)  # fmt: skip


def mix_sizes(n: int, seed: int = 3) -> list[int]:
    """``n`` body sizes of the mix (bytes), deterministic for a seed."""
    rng = random.Random(seed)
    return [
        min(MIX_CAP, max(1024, round(rng.lognormvariate(math.log(MIX_MEDIAN), MIX_SIGMA))))
        for _ in range(n)
    ]


def _corpus(rng: random.Random, chars: int) -> str:
    """Text of varied words that compresses like prose, not like a repeated string: a
    vocabulary of 20,000 made-up words drawn with Zipf-like frequencies, with punctuation
    (pglz and lz4 shrink it to about half, as they do English)."""
    vocab = [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        for _ in range(20_000)
    ]
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocab))))
    out: list[str] = []
    size = 0
    while size < chars:
        sentence = rng.choices(vocab, cum_weights=cumulative, k=rng.randrange(6, 24))
        text = " ".join(sentence).capitalize() + rng.choice((". ", ". ", ", ", "? ", "; "))
        out.append(text)
        size += len(text)
    return "".join(out)


def _identity(rng: random.Random, t: Template, v: int, at: datetime) -> dict[str, Any]:
    """An event's ids, time, provider and version: every field but the JSON columns."""
    return {
        "event_id": _uuid(rng),
        "occurred_at": at.isoformat().replace("+00:00", "Z"),
        "org_id": t.org_id,
        "workspace_id": t.workspace_id,
        "template_id": t.template_id,
        "provider": t.provider,
        "provider_version_key": f"{t.model_id}-2025-0{v + 1}-01",
        "model_id": t.model_id,
        "system_fingerprint": f"fp_{v:02d}{rng.getrandbits(24):06x}",
        "fingerprint_captured_at": None,
    }


class SizedEvents:
    """Event bodies of chosen sizes: the usual envelope, a request holding a user message
    (the prompt with its retrieved documents, two thirds of the text) and a response (a
    third). The text is cut from one large corpus at random offsets, so no value repeats
    itself; a body's length is within a few bytes of the size asked for."""

    def __init__(self, tpls: list[Template], seed: int = 4, corpus_chars: int = 9 * 2**20):
        self._tpls = tpls
        self._rng = random.Random(seed)
        self._text = _corpus(random.Random(seed + 1), corpus_chars)

    def _cut(self, chars: int) -> str:
        start = self._rng.randrange(0, len(self._text) - chars)
        return self._text[start : start + chars]

    def make(self, sizes: list[int], versions: int = 5) -> list[bytes]:
        rng = self._rng
        step = timedelta(days=30) / max(len(sizes), 1)
        bodies = []
        for i, size in enumerate(sizes):
            t = self._tpls[rng.randrange(len(self._tpls))]
            v = rng.randrange(versions)
            doc: dict[str, Any] = {
                **_identity(rng, t, v, START + step * i),
                "request": {
                    "model": t.model_id,
                    "messages": [
                        {"role": "system", "content": "You answer from the documents given."},
                        {"role": "user", "content": ""},
                    ],
                    "temperature": 0.2,
                },
                "response": {
                    "id": f"chatcmpl-{rng.getrandbits(64):016x}",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": ""},
                        }
                    ],
                    "usage": {"prompt_tokens": size // 4, "completion_tokens": size // 12},
                },
                "analysis_config": None,
            }
            text = max(size - len(orjson.dumps(doc)), 32)
            doc["request"]["messages"][1]["content"] = self._cut(text * 2 // 3)
            doc["response"]["choices"][0]["message"]["content"] = self._cut(text - text * 2 // 3)
            bodies.append(orjson.dumps(doc))
        return bodies
