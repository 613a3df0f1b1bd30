"""The prompt run event contract, version 1: bytes in, an :class:`Event` or a rejection out.

Pure: no I/O, no asyncpg or aio-pika. :func:`decode` never raises on bad input; every way an
event can be wrong comes back as a :class:`~worker.errors.Rejection` with a machine
``reason`` and a ``detail`` naming the field or JSON path (never quoting the payload).

The contract is documented in ``docs/events.md`` and shipped as a JSON Schema
(``worker/event.schema.json``) for publishers.

Policies beyond the table of fields (documented in ``docs/events.md``):

- duplicate keys: the last occurrence wins, as in PostgreSQL's ``jsonb`` and in orjson;
- integers beyond 64 bits are kept exact: the stored ``request``/``response`` come from the
  original bytes, parsed by PostgreSQL's ``jsonb`` (arbitrary precision), not from Python;
- ``\\u0000`` anywhere in the document is refused (``unstorable_content``), since neither
  ``jsonb`` nor ``text`` can hold it; the detail names the JSON path;
- the three key strings (``provider``, ``provider_version_key``, ``model_id``) are
  non-blank and at most :data:`MAX_KEY_LENGTH` characters (they live in a B-tree index);
- ``occurred_at`` and ``fingerprint_captured_at`` must be representable in UTC by both
  Python and PostgreSQL (years 1 to 9999 once converted to UTC: ``9999-12-31T23:59:59-01:00``
  is not), and lie at most ``max_future_seconds`` (:data:`DEFAULT_MAX_FUTURE_SECONDS`)
  after the decoder's clock: a far-future time would pin a version's ``last_seen_at``,
  provider and model forever.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import orjson

from worker.errors import Rejection

SCHEMA_VERSION: Final = 1
DEFAULT_MAX_EVENT_BYTES: Final = 16 * 1_048_576
MAX_KEY_LENGTH: Final = 512
DEFAULT_MAX_FUTURE_SECONDS: Final = 86_400.0

# Machine reasons. Decoding produces the first seven; the store the next three
# (CONFLICTING_DUPLICATE: an event_id already stored with other content); the worker's
# intake the last two (from the AMQP message rather than its body).
INVALID_JSON: Final = "invalid_json"
NOT_AN_OBJECT: Final = "not_an_object"
MISSING_FIELD: Final = "missing_field"
INVALID_FIELD: Final = "invalid_field"
UNSUPPORTED_SCHEMA_VERSION: Final = "unsupported_schema_version"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
UNSTORABLE_CONTENT: Final = "unstorable_content"
UNSUPPORTED_CONTENT_TYPE: Final = "unsupported_content_type"
UNKNOWN_TEMPLATE: Final = "unknown_template"
TEMPLATE_TENANT_MISMATCH: Final = "template_tenant_mismatch"
CONFLICTING_DUPLICATE: Final = "conflicting_duplicate"
INVALID_PROPERTIES: Final = "invalid_properties"
DELIVERY_LIMIT: Final = "delivery_limit"

REASONS: Final = (
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    INVALID_FIELD,
    UNSUPPORTED_SCHEMA_VERSION,
    PAYLOAD_TOO_LARGE,
    UNSTORABLE_CONTENT,
    UNSUPPORTED_CONTENT_TYPE,
    UNKNOWN_TEMPLATE,
    TEMPLATE_TENANT_MISMATCH,
    CONFLICTING_DUPLICATE,
    INVALID_PROPERTIES,
    DELIVERY_LIMIT,
)

ACCEPTED_CONTENT_TYPES: Final = frozenset({"application/json", "application/json; charset=utf-8"})
ACCEPTED_CONTENT_ENCODINGS: Final = frozenset({"utf-8", "utf8", "identity"})

#: A UUID string in its canonical 8-4-4-4-12 hex form (either case).
UUID_PATTERN: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_NUL_ESCAPE = b"\\u0000"

_REQUIRED_UUIDS: Final = ("event_id", "org_id", "workspace_id", "template_id")
_REQUIRED_KEYS: Final = ("provider", "provider_version_key", "model_id")


#: ``request``, ``response`` and ``analysis_config`` (None: JSON null or absent) as JSON text.
JsonColumns = tuple[bytes, bytes, bytes | None]


class Event(NamedTuple):
    """A valid prompt run event. UUIDs are canonical lowercase strings.

    ``body`` is the original JSON document; ``request``, ``response`` and
    ``analysis_config`` are stored from it, so they keep every number exactly.
    ``columns`` holds those three values as their very text in ``body`` (the third None
    for a JSON null or an absent field) when the body is compact JSON as orjson writes it,
    so the store can COPY them without PostgreSQL parsing the whole body; None otherwise.

    A NamedTuple rather than a frozen dataclass: it is as immutable, and the worker makes
    one per message, where a frozen dataclass's ``__init__`` costs three times as much.
    """

    event_id: str
    occurred_at: datetime
    org_id: str
    workspace_id: str
    template_id: str
    provider: str
    provider_version_key: str
    model_id: str
    system_fingerprint: str | None
    fingerprint_captured_at: datetime | None
    body: bytes
    columns: JsonColumns | None = None

    @property
    def version_key(self) -> tuple[str, str, str, str]:
        """The ``prompt_versions`` upsert key."""
        return (self.org_id, self.workspace_id, self.template_id, self.provider_version_key)

    def __repr__(self) -> str:  # the payload never reaches a log line
        return f"Event(event_id={self.event_id!r}, occurred_at={self.occurred_at!r})"


def decode(
    body: bytes,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    *,
    columns: bool = True,
    max_future_seconds: float = DEFAULT_MAX_FUTURE_SECONDS,
    now: datetime | None = None,
) -> Event | Rejection:
    """Decode one message body (or JSONL line) into an :class:`Event`, or say why not.

    ``columns=False`` leaves :attr:`Event.columns` None: only the store uses them, so a
    caller that validates and sends the body on (the publisher) skips their cost.
    Timestamps more than ``max_future_seconds`` after ``now`` (default: the clock) are
    refused."""
    if len(body) > max_bytes:
        return Rejection(
            PAYLOAD_TOO_LARGE, f"body is {len(body)} bytes, more than the limit of {max_bytes}"
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # nesting deeper than orjson's limit included
        return Rejection(INVALID_JSON, str(exc))
    if type(doc) is not dict:
        return Rejection(NOT_AN_OBJECT, f"the document is a JSON {_json_type(doc)}, not an object")
    latest = (now or datetime.now(UTC)) + timedelta(seconds=max_future_seconds)
    return validate(doc, body, columns=columns, latest=latest)


def validate(
    doc: dict[str, Any], body: bytes, *, columns: bool = True, latest: datetime | None = None
) -> Event | Rejection:
    """Check a parsed document against the contract; ``body`` is its original bytes;
    ``latest`` is the latest acceptable timestamp (None: no bound)."""
    get = doc.get
    ids: list[str] = []
    for name in _REQUIRED_UUIDS:
        value = get(name)
        if value is None:
            return _missing(doc, name, "a UUID string")
        if type(value) is not str or not UUID_PATTERN.fullmatch(value):
            return Rejection(INVALID_FIELD, f'"{name}" must be a UUID string')
        ids.append(value.lower())

    keys: list[str] = []
    for name in _REQUIRED_KEYS:
        value = get(name)
        if value is None:
            return _missing(doc, name, "a non-empty string")
        if type(value) is not str or not value or value.isspace():
            return Rejection(INVALID_FIELD, f'"{name}" must be a non-empty string')
        if len(value) > MAX_KEY_LENGTH:
            return Rejection(INVALID_FIELD, f'"{name}" must be at most {MAX_KEY_LENGTH} characters')
        keys.append(value)

    occurred = get("occurred_at")
    if occurred is None:
        return _missing(doc, "occurred_at", "an RFC 3339 timestamp")
    occurred_at = _timestamp(occurred, latest)
    if isinstance(occurred_at, str):
        return Rejection(INVALID_FIELD, f'"occurred_at" {occurred_at}')

    captured = get("fingerprint_captured_at")
    captured_at: datetime | None = None
    if captured is not None:
        parsed = _timestamp(captured, latest)
        if isinstance(parsed, str):
            return Rejection(INVALID_FIELD, f'"fingerprint_captured_at" {parsed}')
        captured_at = parsed

    fingerprint = get("system_fingerprint")
    if fingerprint is not None and type(fingerprint) is not str:
        return Rejection(INVALID_FIELD, '"system_fingerprint" must be a string or null')

    for name in ("request", "response"):
        value = get(name)
        if value is None:
            return _missing(doc, name, "a JSON object")
        if type(value) is not dict:
            return Rejection(
                INVALID_FIELD, f'"{name}" must be a JSON object, not {_json_type(value)}'
            )
    analysis = get("analysis_config")
    if analysis is not None and type(analysis) is not dict:
        return Rejection(INVALID_FIELD, '"analysis_config" must be a JSON object or null')

    if "schema_version" in doc:
        version = doc["schema_version"]
        if type(version) is not int:
            return Rejection(INVALID_FIELD, '"schema_version" must be an integer')
        if version != SCHEMA_VERSION:
            return Rejection(
                UNSUPPORTED_SCHEMA_VERSION,
                f'"schema_version" {version} is not supported (only {SCHEMA_VERSION})',
            )

    if _NUL_ESCAPE in body:
        path = find_nul(doc)
        if path is not None:
            return Rejection(
                UNSTORABLE_CONTENT, f"{path} holds \\u0000, which PostgreSQL cannot store"
            )

    return Event(
        ids[0],
        occurred_at,
        ids[1],
        ids[2],
        ids[3],
        keys[0],
        keys[1],
        keys[2],
        fingerprint,
        captured_at,
        body,
        exact_columns(doc, body) if columns else None,
    )


def exact_columns(doc: dict[str, Any], body: bytes) -> JsonColumns | None:
    """``request``, ``response`` and ``analysis_config`` as their exact text in ``body``, or
    None when that cannot be had without a parser of our own.

    When orjson writes the parsed document back byte for byte (surrounding whitespace
    aside), serialization being compositional, each value's serialization *is* its text in
    the body, so PostgreSQL parses the same text either way. Any other body (spaces between
    tokens, escapes orjson would not write, a number it would write differently, duplicate
    keys, an integer beyond 64 bits) gets None and is stored by parsing the whole body.
    """
    try:
        if orjson.dumps(doc) != body.strip():
            return None
        analysis = doc.get("analysis_config")
        return (
            orjson.dumps(doc["request"]),
            orjson.dumps(doc["response"]),
            None if analysis is None else orjson.dumps(analysis),
        )
    except orjson.JSONEncodeError:
        return None


def check_properties(content_type: str | None, content_encoding: str | None) -> Rejection | None:
    """Refuse a message whose declared content type or encoding is not JSON in UTF-8.

    Absent properties are accepted (the body is then decoded as JSON in UTF-8).
    """
    if content_type is not None and content_type.strip().lower() not in ACCEPTED_CONTENT_TYPES:
        return Rejection(
            UNSUPPORTED_CONTENT_TYPE,
            f"content_type {content_type[:100]!r} is not application/json",
        )
    if (
        content_encoding is not None
        and content_encoding.strip().lower() not in ACCEPTED_CONTENT_ENCODINGS
    ):
        return Rejection(
            UNSUPPORTED_CONTENT_TYPE,
            f"content_encoding {content_encoding[:100]!r} is not supported (send plain UTF-8)",
        )
    return None


def _timestamp(value: object, latest: datetime | None) -> datetime | str:
    """A timezone-aware datetime, or a string saying what is wrong with ``value``."""
    if type(value) is not str or not _RFC3339.fullmatch(value):
        return "must be an RFC 3339 timestamp with an offset, like 2025-08-14T14:13:29Z"
    if "t" in value or "z" in value:  # RFC 3339 allows lower case; fromisoformat does not
        value = value.upper()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        return f"is not a real date and time ({exc})"
    try:
        utc = parsed.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        return "is out of range: in UTC it falls outside the years 1 to 9999"
    if utc in (datetime.min, datetime.max):  # asyncpg encodes these two as -/+infinity
        return "is out of range: the first or last instant of the years 1 to 9999 in UTC"
    if latest is not None and parsed > latest:
        return f"lies in the future (later than {latest.isoformat(timespec='seconds')})"
    return parsed


def _missing(doc: dict[str, Any], name: str, kind: str) -> Rejection:
    if name in doc:  # present but null
        return Rejection(INVALID_FIELD, f'"{name}" must be {kind}, not null')
    return Rejection(MISSING_FIELD, f'"{name}" is required')


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def find_nul(value: object, path: str = "$") -> str | None:
    """The JSON path of the first string or key holding U+0000, or None."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return where
        elif isinstance(node, dict):
            for key in node:
                if "\x00" in key:
                    return f"{_child_path(where, key)} (the key)"
            # Pushed in reverse, so the first offending path in document order is found.
            stack.extend((node[k], _child_path(where, k)) for k in reversed(list(node)))
        elif isinstance(node, list):
            stack.extend((node[i], f"{where}[{i}]") for i in range(len(node) - 1, -1, -1))
    return None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _child_path(parent: str, key: str) -> str:
    if len(key) > 64:
        key = key[:61] + "..."
    if _IDENTIFIER.fullmatch(key):
        return f"{parent}.{key}"
    return f"{parent}[{orjson.dumps(key.replace(chr(0), '?')).decode()}]"
