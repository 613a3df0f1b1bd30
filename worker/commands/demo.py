"""``prompter-worker demo``: a sample template and a few hundred realistic events, published
over the live routing key, so data can be seen flowing end to end.

Safe to run again and again: the template is registered by its config, so a second run
finds the first run's template (``templates.register`` returns it) instead of making a
copy; each run publishes new events (fresh ids), timed over the hour before it ran.

Event ids are UUIDv7 (:func:`worker.publisher.new_event_id`) carrying each event's own
time, as the README recommends to every publisher: they sort like the events.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from worker import templates
from worker.amqp import broker
from worker.config import Settings
from worker.errors import ConfigError
from worker.publisher import Publisher, new_event_id
from worker.store.classify import classify
from worker.store.pool import connect

DEMO_ORG_ID: Final = "d3e0d3e0-0000-4000-8000-00000000000a"
DEMO_WORKSPACE_ID: Final = "d3e0d3e0-0000-4000-8000-00000000000b"
DEFAULT_EVENTS: Final = 300
SYSTEM: Final = "You are a concise, friendly support agent for an online shop."
TEMPLATE: Final = {
    "name": "Demo: order status answers",
    "provider": "openai",
    "system_instructions": SYSTEM,
    "user_prompt_template": "Answer the customer about order {order_id}: {question}",
    "country_set": ["US", "DE", "FR"],
    "model_id": "gpt-4o",
    "inference_params": {"temperature": 0.2, "max_tokens": 400},
}
# (provider version key, system fingerprint, share of the runs)
VERSIONS: Final = (
    ("gpt-4o-2024-08-06", "fp_50cad350e4", 0.7),
    ("gpt-4o-2024-11-20", "fp_7fcd609668", 0.3),
)
EXCHANGES: Final = (
    ("Where is my order?", "Your order left our warehouse yesterday and arrives {day}."),
    ("Can I change the delivery address?", "Yes, until it ships: I have updated it for you."),
    ("I was charged twice.", "Sorry about that: the second charge is refunded within 3 days."),
    (
        "How do I return a jacket?",
        "Print the label from your account and drop it at any post office.",
    ),
    ("Do you ship to Canada?", "We do: delivery takes 5 to 8 business days."),
    ("My package arrived damaged.", "I am sorry: a replacement ships today, no need to return it."),
    (
        "Can I cancel my order?",
        "It has not shipped yet, so I cancelled it; the refund is on its way.",
    ),
    ("Is the blue one back in stock?", "It is back {day}; I can reserve one for you."),
)
DAYS: Final = ("today", "tomorrow", "on Monday", "on Thursday", "next week")


@dataclass(frozen=True, kw_only=True)
class DemoReport:
    template_id: str
    template_created: bool
    org_id: str
    workspace_id: str
    published: int
    first_at: datetime
    last_at: datetime
    exchange: str
    routing_key: str


def template_spec(org_id: str, workspace_id: str) -> templates.TemplateSpec:
    return templates.parse_spec({"org_id": org_id, "workspace_id": workspace_id, **TEMPLATE})


def make_events(
    count: int,
    *,
    org_id: str,
    workspace_id: str,
    template_id: str,
    now: datetime,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """``count`` chat completions over the hour before ``now``, oldest first, each with a
    fresh UUIDv7 id of its own time (``rng`` makes the content, not the ids)."""
    out = []
    step = timedelta(hours=1) / max(count, 1)
    start = now - timedelta(hours=1)
    for i in range(count):
        jitter = rng.randrange(max(1, int(step.total_seconds() * 1000)))
        at = start + step * i + timedelta(milliseconds=jitter)
        version, fingerprint, _ = rng.choices(VERSIONS, weights=[v[2] for v in VERSIONS])[0]
        question, answer = rng.choice(EXCHANGES)
        answer = answer.format(day=rng.choice(DAYS))
        order = f"#{rng.randrange(100_000, 999_999)}"
        prompt_tokens = 38 + len(question) // 4 + rng.randrange(10)
        completion_tokens = 8 + len(answer) // 4 + rng.randrange(10)
        out.append(
            {
                "event_id": new_event_id(at),
                "occurred_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "org_id": org_id,
                "workspace_id": workspace_id,
                "template_id": template_id,
                "provider": "openai",
                "provider_version_key": version,
                "model_id": "gpt-4o",
                "system_fingerprint": fingerprint,
                "fingerprint_captured_at": None,
                "request": {
                    "model": "gpt-4o",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Order {order}: {question}"},
                    ],
                    "temperature": 0.2,
                    "max_tokens": 400,
                },
                "response": {
                    "id": f"chatcmpl-{rng.getrandbits(64):016x}",
                    "object": "chat.completion",
                    "created": int(at.timestamp()),
                    "model": version,
                    "system_fingerprint": fingerprint,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
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
        )
    return out


async def register_template(settings: Settings, org_id: str, workspace_id: str) -> tuple[str, bool]:
    """The demo template's id (registered now, or found from an earlier run)."""
    async with connect(settings) as conn:
        return await _register(conn, org_id, workspace_id)


async def _register(conn: asyncpg.Connection, org_id: str, workspace_id: str) -> tuple[str, bool]:
    try:
        return await templates.register(conn, template_spec(org_id, workspace_id))
    except asyncpg.UndefinedTableError:
        raise ConfigError(
            "the database has no prompt_templates table: run `prompter-worker migrate` first"
        ) from None
    except asyncpg.InsufficientPrivilegeError:
        raise ConfigError(
            "this database user may not register templates (INSERT on prompt_templates): "
            "run the demo with the DATABASE_URL of the schema's owner"
        ) from None
    except (asyncpg.PostgresError, OSError, ConnectionError, TimeoutError) as exc:
        raise classify(exc) from None


async def run(
    settings: Settings,
    *,
    count: int = DEFAULT_EVENTS,
    org_id: str = DEMO_ORG_ID,
    workspace_id: str = DEMO_WORKSPACE_ID,
    seed: int | None = None,
) -> DemoReport:
    """Register the demo template, then publish ``count`` events for it (confirmed)."""
    template_id, created = await register_template(settings, org_id, workspace_id)
    now = datetime.now(UTC)
    events = make_events(
        count,
        org_id=org_id,
        workspace_id=workspace_id,
        template_id=template_id,
        now=now,
        rng=random.Random(seed),
    )
    async with Publisher.from_settings(settings, name="prompter-worker demo") as publisher:
        published = await publisher.publish_many(events, routing_key=broker.LIVE_ROUTING_KEY)
    return DemoReport(
        template_id=template_id,
        template_created=created,
        org_id=org_id,
        workspace_id=workspace_id,
        published=published,
        first_at=datetime.fromisoformat(events[0]["occurred_at"]),
        last_at=datetime.fromisoformat(events[-1]["occurred_at"]),
        exchange=settings.exchange,
        routing_key=broker.LIVE_ROUTING_KEY,
    )


def render(report: DemoReport) -> str:
    state = "registered" if report.template_created else "already registered"
    return "\n".join(
        [
            f"template {report.template_id} ({TEMPLATE['name']}): {state}",
            f"  org {report.org_id}, workspace {report.workspace_id}",
            f"published {report.published:,} events to exchange {report.exchange} "
            f"(routing key {report.routing_key}), confirmed by the broker,",
            f"  occurred between {report.first_at:%Y-%m-%d %H:%M} and "
            f"{report.last_at:%H:%M} UTC, two model versions, chat request, response, usage",
            "see them arrive: prompter-worker status",
            "(a worker must be running to store them: prompter-worker run)",
        ]
    )
