"""Prompt templates: canonical config JSON, its hash, register / list / soft-delete.

A template's *config* is what determines a run: ``provider``, ``system_instructions``,
``user_prompt_template``, ``country_set``, ``model_id``, ``inference_params``,
``tools_spec``, ``response_format``, ``grounding_profile_id``, ``grounding_snapshot_id`` and
``retrieval_params``. Its name, creator and tenancy are not config.

Canonical form: the config fields that are not null, as one JSON object serialized by RFC
8785, the JSON Canonicalization Scheme (JCS, implemented by the ``rfc8785`` package): keys
sorted by their UTF-16 code units at every level, no insignificant whitespace, strings
UTF-8 with JCS's minimal escapes, numbers as ECMAScript prints the IEEE 754 double they
denote (``5.120e2``, ``512.0`` and ``512`` are all ``512``). ``config_hash`` is the SHA-256
hex digest of those bytes, so any service with a JCS library computes the same hash
(``docs/events.md`` has an example to check one against). Registering a config that an
active template of the same workspace already has returns that template: the partial
unique index ``ux_tpl_org_ws_confighash_active`` makes this race-safe under concurrency.

Numbers keep their exact value on the way in: template files are parsed by
:func:`load_spec` with integers as written (never through a double) and fractions as the
nearest double, which is what JCS reads them as. Beyond ±(2^53 - 1) not every integer
has a double of its own (I-JSON, RFC 7493, calls such numbers not interoperable), so JCS
would hash another number than the one written (``18446744073709551617`` as
``18446744073709552000``): such an integer is refused, naming the field, rather than
silently changed; a value that large belongs in a string. ``NaN``, ``Infinity``, lone surrogates and
duplicate keys, which JCS has no form for (or which parsers disagree on), are refused too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg
import rfc8785

from worker import events as ev
from worker.errors import Rejection

CONFIG_FIELDS: Final = (
    "provider",
    "system_instructions",
    "user_prompt_template",
    "country_set",
    "model_id",
    "inference_params",
    "tools_spec",
    "response_format",
    "grounding_profile_id",
    "grounding_snapshot_id",
    "retrieval_params",
)
_TEXT_OPTIONAL: Final = ("provider", "system_instructions", "grounding_snapshot_id")
_UUID_OPTIONAL: Final = ("grounding_profile_id", "created_by")
_JSON_OPTIONAL: Final = ("tools_spec", "response_format", "retrieval_params")
ALL_FIELDS: Final = frozenset(("org_id", "workspace_id", "name", "created_by", *CONFIG_FIELDS))
#: The largest integer a JSON number holds exactly (RFC 8785 reads numbers as doubles).
MAX_EXACT_INTEGER: Final = 2**53 - 1


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
class TemplateSpec:
    """A template to register: tenancy, name, and its config."""

    org_id: str
    workspace_id: str
    name: str
    config: dict[str, Any] = field(repr=False)
    created_by: str | None = None

    @property
    def canonical_json(self) -> bytes:
        return canonical_json(self.config)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


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


def canonical_json(config: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a config: its fields that are not null, by RFC 8785 (see the
    module docstring). A value JCS cannot hold exactly raises a :class:`Rejection`
    naming the field (:func:`check_json`)."""
    present = {k: v for k, v in config.items() if v is not None}
    check_json(present)
    return rfc8785.dumps(present)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(config)).hexdigest()


def check_json(value: object, path: str = "$") -> None:
    """Raise a :class:`Rejection` naming the first place (a JSON path) where ``value``
    holds what RFC 8785 cannot serialize exactly: an integer beyond
    ±:data:`MAX_EXACT_INTEGER`, a float that is NaN or infinite, a string with a lone
    surrogate, a key that is not a string, or something that is not JSON at all."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if node is None or isinstance(node, bool):
            continue
        if isinstance(node, int):
            if abs(node) > MAX_EXACT_INTEGER:
                raise Rejection(
                    ev.INVALID_FIELD,
                    f'"{where}" is an integer beyond ±(2^53 - 1), which a JSON number cannot '
                    "hold exactly (canonical JSON, RFC 8785, reads numbers as doubles): "
                    "write it as a string",
                )
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise Rejection(ev.INVALID_FIELD, f'"{where}" is not a finite number')
        elif isinstance(node, str):
            if not _utf8(node):
                raise Rejection(ev.INVALID_FIELD, f'"{where}" holds a lone surrogate')
        elif isinstance(node, Mapping):
            for key in node:
                if not isinstance(key, str) or not _utf8(key):
                    raise Rejection(ev.INVALID_FIELD, f'"{where}" has a key that is not text')
            items = list(node.items())
            stack.extend((v, _child(where, k)) for k, v in reversed(items))
        elif isinstance(node, (list, tuple)):
            stack.extend((node[i], f"{where}[{i}]") for i in range(len(node) - 1, -1, -1))
        else:
            raise Rejection(ev.INVALID_FIELD, f'"{where}" is not a JSON value')


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _child(parent: str, key: str) -> str:
    return f"{parent}.{key}" if key.isidentifier() else f"{parent}[{json.dumps(key)}]"


def loads(data: bytes | str, *, as_doubles: bool = False) -> Any:
    """Parse JSON keeping each number's exact value: integers as written (Python ints,
    never through a double), fractions and exponents as the nearest double (what JCS reads
    them as). ``NaN``/``Infinity`` and duplicate keys are refused with a
    :class:`Rejection` (``invalid_json``), as is anything that is not JSON.

    ``as_doubles``: integers beyond ±:data:`MAX_EXACT_INTEGER` are read as doubles, as RFC
    8785 reads every number. For JSON that is already canonical (stored configs): JCS
    prints a large double such as ``1e16`` as ``10000000000000000``, which must read back
    as the same double, not be refused as a large integer."""
    parse_int = _int_or_double if as_doubles else int
    try:
        return json.loads(
            data,
            parse_int=parse_int,
            parse_constant=_no_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8
        raise Rejection(ev.INVALID_JSON, f"not JSON: {exc}") from None


def _int_or_double(text: str) -> int | float:
    value = int(text)
    return value if abs(value) <= MAX_EXACT_INTEGER else float(text)


def _no_constant(name: str) -> Any:
    raise Rejection(ev.INVALID_JSON, f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Rejection(
                ev.INVALID_JSON, f"the key {json.dumps(key)} appears twice in an object"
            )
        out[key] = value
    return out


def load_spec(data: bytes | str) -> TemplateSpec:
    """A template document (JSON text, e.g. a file) parsed exactly (:func:`loads`) and
    validated (:func:`parse_spec`): a :class:`Rejection` naming the field if it is not."""
    return parse_spec(loads(data))


def parse_spec(doc: object) -> TemplateSpec:
    """Validate a template document (a JSON object); raise a Rejection naming the field."""
    if not isinstance(doc, dict):
        raise Rejection(ev.NOT_AN_OBJECT, "a template is a JSON object")
    unknown = sorted(set(doc) - ALL_FIELDS)
    if unknown:
        raise Rejection(ev.INVALID_FIELD, f"unknown template field {unknown[0]!r}")

    def required(name: str) -> Any:
        if doc.get(name) is None:
            raise Rejection(ev.MISSING_FIELD, f'"{name}" is required')
        return doc[name]

    def uuid_field(name: str, value: Any) -> str:
        if not isinstance(value, str) or not ev.UUID_PATTERN.fullmatch(value):
            raise Rejection(ev.INVALID_FIELD, f'"{name}" must be a UUID string')
        return value.lower()

    def text_field(name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Rejection(ev.INVALID_FIELD, f'"{name}" must be a non-empty string')
        if "\x00" in value:
            raise Rejection(ev.UNSTORABLE_CONTENT, f'"{name}" holds \\u0000')
        return value

    org_id = uuid_field("org_id", required("org_id"))
    workspace_id = uuid_field("workspace_id", required("workspace_id"))
    name = text_field("name", required("name"))
    config: dict[str, Any] = {
        "user_prompt_template": text_field(
            "user_prompt_template", required("user_prompt_template")
        ),
        "model_id": text_field("model_id", required("model_id")),
        "country_set": required("country_set"),
    }
    inference = required("inference_params")
    if not isinstance(inference, dict):
        raise Rejection(ev.INVALID_FIELD, '"inference_params" must be a JSON object')
    config["inference_params"] = inference
    for key in _TEXT_OPTIONAL:
        if doc.get(key) is not None:
            config[key] = text_field(key, doc[key])
    if doc.get("grounding_profile_id") is not None:
        config["grounding_profile_id"] = uuid_field(
            "grounding_profile_id", doc["grounding_profile_id"]
        )
    for key in _JSON_OPTIONAL:
        if doc.get(key) is not None:
            config[key] = doc[key]
    path = ev.find_nul(config)
    if path is not None:
        raise Rejection(ev.UNSTORABLE_CONTENT, f"{path} holds \\u0000")
    check_json(config)
    created_by = doc.get("created_by")
    return TemplateSpec(
        org_id=org_id,
        workspace_id=workspace_id,
        name=name,
        config=config,
        created_by=uuid_field("created_by", created_by) if created_by is not None else None,
    )


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
