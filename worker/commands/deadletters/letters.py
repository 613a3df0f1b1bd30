"""What a dead letter says about itself (never its body): reason, detail, time, original
routing key, who dead-lettered it, and the key that names it.

Two kinds of message end up in ``prompter.ingest.dead``:

- copies the worker made of events it refused, with ``x-error-reason``,
  ``x-error-detail``, ``x-failed-at``, ``x-original-routing-key`` and friends
  (:mod:`worker.ingest.deadletter`);
- messages the broker itself dead-lettered (a message over the queue's delivery limit, or
  one a worker rejected unread because its body was too large to hold), which carry
  ``x-death`` and no ``x-error-reason``.

Whatever a message holds (a binary message id, header keys that are not UTF-8, a property
list that does not parse), it is read with the worker's own connection
(:mod:`worker.amqp.protocol`), its properties as raw bytes (:mod:`worker.amqp.frames`): it
is described (text escaped, never decoded lossily for republishing), and it can be
redriven or purged by its key (its message id, or ``sha256:`` and the start of its body's
hash when it has none).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from worker.amqp import broker
from worker.amqp import protocol as amqp
from worker.amqp.frames import Malformed, decode_table, table_entries

REDRIVE_COUNT: Final = "x-redrive-count"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """What a dead-lettered message says about itself (never its body)."""

    event_id: str | None  # the message id (invalid UTF-8 escaped)
    reason: str
    detail: str
    failed_at: str | None
    routing_key: str  # the routing key it had, and gets again when redriven
    by: str  # "worker" (x-error-reason), "broker" (x-death) or "unknown"
    redrives: int = 0
    key: str = ""  # how to name it for --id: its message id, or sha256:<hash of the body>
    size: int = 0  # body bytes
    original_routing_key: bytes = field(default=b"", repr=False)  # raw, for redrive

    def as_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "reason": self.reason,
            "detail": self.detail,
            "failed_at": self.failed_at,
            "routing_key": self.routing_key,
            "by": self.by,
            "redrives": self.redrives,
            "key": self.key,
            "size": self.size,
        }


def _key(message_id: str | None, body: bytes) -> str:
    return message_id or "sha256:" + hashlib.sha256(body).hexdigest()[:16]


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def describe(delivery: amqp.Delivery) -> DeadLetter:
    """Reason, detail, time and original routing key of one dead-lettered message."""
    body = delivery.body
    try:
        props = delivery.properties
        headers = decode_table(props.fields.get("headers", b""))
    except Malformed as exc:
        return DeadLetter(
            event_id=None,
            reason="invalid_properties",
            detail=f"its properties cannot be read ({exc}); purge or redrive it by key",
            failed_at=None,
            routing_key=delivery.routing_key or broker.LIVE_ROUTING_KEY,
            by="unknown",
            key=_key(None, body),
            size=len(body),
            original_routing_key=delivery.routing_key_raw,
        )
    message_id = props.text("message_id")
    redrives = headers.get(REDRIVE_COUNT)
    redrives = redrives if isinstance(redrives, int) else 0
    common: dict[str, Any] = {
        "event_id": message_id,
        "redrives": redrives,
        "key": _key(message_id, body),
        "size": len(body),
    }
    reason = _text(headers.get("x-error-reason"))
    if reason:
        raw_key = {k: v for k, _, v in table_entries(props.fields["headers"])}.get(
            b"x-original-routing-key", b""
        )
        raw_key = raw_key or delivery.routing_key_raw or broker.LIVE_ROUTING_KEY.encode()
        return DeadLetter(
            reason=reason,
            detail=_text(headers.get("x-error-detail")) or "",
            failed_at=_text(headers.get("x-failed-at")),
            routing_key=raw_key.decode("utf-8", "backslashreplace"),
            by="worker",
            original_routing_key=raw_key,
            **common,
        )
    deaths = headers.get("x-death")
    death: dict[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]
    reason = _text(death.get("reason")) or _text(headers.get("x-first-death-reason"))
    queue = _text(death.get("queue")) or _text(headers.get("x-first-death-queue")) or "?"
    count = death.get("count")
    keys = death.get("routing-keys")
    original = _text(keys[0]) if isinstance(keys, list) and keys else None
    if reason:
        times = f", {count} times" if isinstance(count, int) and count > 1 else ""
        detail = f"dead-lettered by the broker from queue {queue} ({reason}{times})"
        if reason == "rejected":
            detail += (
                f"; a worker rejects unread a body too large to hold (this one is "
                f"{len(body):,} bytes)"
            )
    else:
        reason, detail = "unknown", "no x-error-reason or x-death header"
    when = death.get("time")
    if not isinstance(when, int):
        raw_time = props.fields.get("timestamp")
        when = int.from_bytes(raw_time, "big") if raw_time else None
    routing_key = (
        original.encode() if original else delivery.routing_key_raw
    ) or broker.LIVE_ROUTING_KEY.encode()
    return DeadLetter(
        reason=reason,
        detail=detail,
        failed_at=None if when is None else datetime.fromtimestamp(when, UTC).isoformat(),
        routing_key=routing_key.decode("utf-8", "backslashreplace"),
        by="broker",
        original_routing_key=routing_key,
        **common,
    )
