"""Prompt templates: a config's canonical JSON (RFC 8785) and hash, template documents
validated, and register / list / soft-delete in the database.

``canonical`` is the canonical form and the exact JSON reader; ``spec`` reads and checks a
template document; ``registry`` holds the SQL. Every name below is imported from
``worker.templates`` itself.
"""

from worker.templates.canonical import (
    MAX_EXACT_INTEGER,
    canonical_json,
    check_json,
    config_hash,
    loads,
)
from worker.templates.registry import SQL, TemplateRow, list_templates, register, soft_delete
from worker.templates.spec import (
    ALL_FIELDS,
    CONFIG_FIELDS,
    TemplateSpec,
    load_spec,
    parse_spec,
)

__all__ = [
    "ALL_FIELDS",
    "CONFIG_FIELDS",
    "MAX_EXACT_INTEGER",
    "SQL",
    "TemplateRow",
    "TemplateSpec",
    "canonical_json",
    "check_json",
    "config_hash",
    "list_templates",
    "load_spec",
    "loads",
    "parse_spec",
    "register",
    "soft_delete",
]
