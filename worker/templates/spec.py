"""A template to register (:class:`TemplateSpec`): a template document read exactly and
validated, each refusal a :class:`~worker.errors.Rejection` naming the field.

A template's *config* is what determines a run: ``provider``, ``system_instructions``,
``user_prompt_template``, ``country_set``, ``model_id``, ``inference_params``,
``tools_spec``, ``response_format``, ``grounding_profile_id``, ``grounding_snapshot_id`` and
``retrieval_params``. Its name, creator and tenancy are not config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from worker import events as ev
from worker.errors import Rejection
from worker.templates.canonical import canonical_json, check_json, config_hash, loads

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
_JSON_OPTIONAL: Final = ("tools_spec", "response_format", "retrieval_params")
ALL_FIELDS: Final = frozenset(("org_id", "workspace_id", "name", "created_by", *CONFIG_FIELDS))


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
