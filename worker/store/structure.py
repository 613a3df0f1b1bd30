"""The tables, columns and unique keys the worker's SQL relies on, and what a database
lacks of them (:func:`find_missing`): the second question of the schema check
(:mod:`worker.store.schema`), asked whatever revision the database records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import asyncpg

TABLES: Final = ("prompt_templates", "prompt_versions", "prompt_results")

#: Every column a command reads or writes, per table: the whole V7 schema.
COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "prompt_templates": (
        "id", "org_id", "workspace_id", "name", "provider", "system_instructions",
        "user_prompt_template", "country_set", "model_id", "inference_params", "tools_spec",
        "response_format", "grounding_profile_id", "grounding_snapshot_id", "retrieval_params",
        "config_hash", "config_canonical_json", "created_by", "created_at", "deleted_at",
    ),
    "prompt_versions": (
        "id", "org_id", "workspace_id", "template_id", "provider", "provider_version_key",
        "model_id", "fingerprint_captured_at", "first_seen_at", "last_seen_at",
    ),
    "prompt_results": (
        "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
        "system_fingerprint", "request", "response", "analysis_config", "created_at",
    ),
}  # fmt: skip

#: The columns each table's INSERT gives a value (``templates.SQL.REGISTER``,
#: ``SQL.INSERT_VERSIONS``, ``writer.RESULT_COLUMNS``): any other NOT NULL column
#: needs a default, or every insert fails.
WRITTEN: Final[Mapping[str, frozenset[str]]] = {
    "prompt_templates": frozenset(COLUMNS["prompt_templates"]) - {"id", "created_at", "deleted_at"},
    "prompt_versions": frozenset(COLUMNS["prompt_versions"]) - {"id"},
    "prompt_results": frozenset(COLUMNS["prompt_results"]),
}


@dataclass(frozen=True, kw_only=True)
class UniqueKey:
    """A unique index the SQL relies on: an ``ON CONFLICT`` target, by columns (and the
    partial index's predicate) or, for ``ON CONFLICT ON CONSTRAINT``, by name."""

    table: str
    columns: tuple[str, ...]
    predicate: str | None = None
    constraint: str | None = None

    def describe(self) -> str:
        name = f"{self.constraint} " if self.constraint else ""
        where = f" WHERE {self.predicate}" if self.predicate else ""
        return f"unique key {name}on {self.table} ({', '.join(self.columns)}){where}"


UNIQUE_KEYS: Final = (
    # templates.SQL.REGISTER: ON CONFLICT (org_id, workspace_id, config_hash) WHERE ...
    UniqueKey(
        table="prompt_templates",
        columns=("org_id", "workspace_id", "config_hash"),
        predicate="deleted_at IS NULL",
    ),
    # SQL.INSERT_VERSIONS: ON CONFLICT ON CONSTRAINT ux_versions_org_ws_tpl_pvk
    UniqueKey(
        table="prompt_versions",
        columns=("org_id", "workspace_id", "template_id", "provider_version_key"),
        constraint="ux_versions_org_ws_tpl_pvk",
    ),
    # SQL.INSERT_RESULTS: ON CONFLICT (id); event_id is the result's id.
    UniqueKey(table="prompt_results", columns=("id",)),
)


class SQL:
    """Every statement of the structure check, by name. Only the catalog."""

    EXISTS: Final = "SELECT to_regclass($1) IS NOT NULL"
    COLUMNS: Final = """
        SELECT c.relname AS table, a.attname AS column, a.attnotnull AS not_null,
               (a.atthasdef OR a.attidentity <> '') AS has_default
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.oid = ANY($1::regclass[]) AND a.attnum > 0 AND NOT a.attisdropped
    """
    INDEXES: Final = """
        SELECT t.relname AS table, ic.relname AS name, i.indisunique AS is_unique,
               i.indisvalid AS is_valid, i.indexprs IS NOT NULL AS has_expressions,
               pg_get_expr(i.indpred, i.indrelid) AS predicate, con.conname AS constraint,
               ARRAY(SELECT a.attname::text FROM unnest(i.indkey) AS k(attnum)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
                   AS columns
        FROM pg_index i
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_class ic ON ic.oid = i.indexrelid
        LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
                                   AND con.conrelid = i.indrelid
        WHERE i.indrelid = ANY($1::regclass[])
        ORDER BY t.relname, ic.relname
    """


async def table_exists(conn: asyncpg.Connection, name: str) -> bool:
    """Whether ``name`` is a table the connection's ``search_path`` finds."""
    return bool(await conn.fetchval(SQL.EXISTS, name))


async def present_tables(conn: asyncpg.Connection) -> list[str]:
    """Which of prompter's :data:`TABLES` exist."""
    return [t for t in TABLES if await table_exists(conn, t)]


async def find_missing(conn: asyncpg.Connection, present: list[str]) -> tuple[list[str], list[str]]:
    """(what is missing, the INVALID indexes) on the tables that exist."""
    lacking = [f"table {t}" for t in TABLES if t not in present]
    if not present:
        return lacking, []
    columns: dict[str, dict[str, asyncpg.Record]] = {t: {} for t in present}
    for row in await conn.fetch(SQL.COLUMNS, present):
        columns[row["table"]][row["column"]] = row
    for table in present:
        have = columns[table]
        lacking += [f"column {table}.{c}" for c in COLUMNS[table] if c not in have]
        lacking += [
            f"a value for column {table}.{name} (NOT NULL, no default, not written by this worker)"
            for name, row in have.items()
            if row["not_null"] and not row["has_default"] and name not in WRITTEN[table]
        ]
    indexes = await conn.fetch(SQL.INDEXES, present)
    for key in UNIQUE_KEYS:
        if key.table in present and not any(_satisfies(row, key) for row in indexes):
            lacking.append(key.describe())
    invalid = [str(r["name"]) for r in indexes if not r["is_valid"]]
    return lacking, invalid


def _satisfies(index: asyncpg.Record, key: UniqueKey) -> bool:
    """A valid unique index on exactly the key's columns (any order, as ON CONFLICT infers),
    with the key's predicate; named as the constraint when the SQL names it."""
    if index["table"] != key.table or not index["is_unique"] or not index["is_valid"]:
        return False
    if index["has_expressions"] or set(index["columns"]) != set(key.columns):
        return False
    if key.constraint is not None and index["constraint"] != key.constraint:
        return False
    return _normal(index["predicate"]) == _normal(key.predicate)


def _normal(predicate: str | None) -> str | None:
    if predicate is None:
        return None
    text = predicate.strip()
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    return " ".join(text.split()).lower()
