"""Recompute every template's canonical config JSON and config hash by RFC 8785 (JCS).

Why: the canonical form used to be orjson's output of the config as Python had parsed it,
so numbers went through Python's floats (``5.120e2`` was stored and hashed as ``512.0``,
``18446744073709551617`` as ``1.8446744073709552e+19``) and keys were sorted by code
point. No other language produces those bytes, so no other service could compute a
template's hash. The worker now uses RFC 8785, the JSON Canonicalization Scheme
(``worker.templates``, ``docs/events.md``); the templates registered before must be hashed
the same way, or registering one of their configs again would create a second template
instead of returning the existing one.

What it does: it reads each template's config columns (the fields that are not null), reads
their numbers as JCS does (as IEEE 754 doubles: an integer stored beyond 2^53 - 1 becomes
the double any other JCS implementation would read, since the stored value is all there
is), and writes the JCS bytes to ``config_canonical_json`` and their SHA-256 to
``config_hash`` where they changed. The config columns themselves are left as they are. The
table is locked against writes (reads go on: ingestion is not blocked) for the few
milliseconds it takes; templates are few.

Two ACTIVE templates of one workspace whose configs differ only in how the old form wrote
them (``1`` and ``1.0``, say) are the same config under JCS, and the partial unique index
``ux_tpl_org_ws_confighash_active`` cannot hold both. The migration then FAILS, changing
nothing, with a message naming every such group (workspace, ids, names, creation times)
and the fix: soft-delete all but one of each group (``prompter-worker templates delete
ID``; a soft-deleted template still accepts its events), then migrate again. It does not
choose by itself: which of two identical templates the services use is the operator's
knowledge, not the database's, and a migration should not change what is active behind
their back. Soft-deleted templates never collide (the index covers active ones only).

Downgrade writes back the former form (orjson, keys sorted by code point, numbers as
Python parses the stored JSON) computed from the same columns: for templates registered
before this revision that is exactly what they had.

Compatible with older workers? Yes for ingestion: it only rewrites two template columns the
worker never reads while storing events. An older ``templates add`` would still hash the
old way (a copy of an existing config may then be registered twice); upgrade the tools
with the workers.

Revision ID: 20261201090000
Revises: 20261124090000
Create Date: 2026-12-01 09:00:00
"""

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import rfc8785
import sqlalchemy as sa
from alembic import op

from worker.errors import PermanentError

revision: str = "20261201090000"
down_revision: str | Sequence[str] | None = "20261124090000"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Workers that know revision 20250814141329 run on the schema this leaves (see above).
workers_compatible_from: str = "20250814141329"

log = logging.getLogger("alembic.runtime.migration")

# The config columns as of this revision (frozen here: later code may move on).
CONFIG_COLUMNS = (
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
JSON_COLUMNS = frozenset(
    ("country_set", "inference_params", "tools_spec", "response_format", "retrieval_params")
)
MAX_EXACT_INTEGER = 2**53 - 1

SELECT = sa.text(
    "SELECT id, org_id, workspace_id, name, created_at, deleted_at, config_hash, "
    + ", ".join(f"{c}::text AS {c}" for c in CONFIG_COLUMNS)
    + " FROM prompt_templates ORDER BY created_at, id"
)
PARK = sa.text("UPDATE prompt_templates SET config_hash = 'migrating:' || id::text WHERE id = :id")
UPDATE = sa.text(
    "UPDATE prompt_templates SET config_hash = :hash, config_canonical_json = CAST(:json AS jsonb)"
    " WHERE id = :id"
)


def _as_jcs_reads(text: str) -> Any:
    """JSON as RFC 8785 reads it: every number a double (small integers stay ints, which
    JCS prints the same)."""

    def number(literal: str) -> int | float:
        value = int(literal)
        return value if abs(value) <= MAX_EXACT_INTEGER else float(literal)

    return json.loads(text, parse_int=number)


def _config(row: Any, read_json: Callable[[str], Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for column in CONFIG_COLUMNS:
        value = getattr(row, column)
        if value is None:
            continue
        config[column] = read_json(value) if column in JSON_COLUMNS else value
    return config


def _jcs(config: dict[str, Any]) -> bytes:
    return rfc8785.dumps(config)


def _former(config: dict[str, Any]) -> bytes:
    return orjson.dumps(config, option=orjson.OPT_SORT_KEYS)


def _recompute(
    read_json: Callable[[str], Any], canonical: Callable[[dict[str, Any]], bytes], form: str
) -> None:
    conn = op.get_bind()
    # Reads go on (ingestion only reads templates); registrations wait for the commit.
    conn.execute(sa.text("LOCK TABLE prompt_templates IN SHARE ROW EXCLUSIVE MODE"))
    rows = conn.execute(SELECT).fetchall()
    computed: list[tuple[Any, str, bytes]] = []
    active: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for row in rows:
        try:
            data = canonical(_config(row, read_json))
        except (ValueError, TypeError) as exc:
            raise PermanentError(
                f"template {row.id}: its config has no canonical form ({exc}); fix or "
                "soft-delete it, then migrate again"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        computed.append((row, digest, data))
        if row.deleted_at is None:
            active[(str(row.org_id), str(row.workspace_id), digest)].append(row)
    collisions = [group for group in active.values() if len(group) > 1]
    if collisions:
        lines = []
        for group in collisions:
            lines.append(f"  workspace {group[0].workspace_id} (org {group[0].org_id}):")
            lines.extend(
                f"    {r.id}  created {r.created_at.isoformat(timespec='seconds')}  {r.name!r}"
                for r in group
            )
        raise PermanentError(
            f"these active templates have the same config under {form}, "
            "which the unique index on (org, workspace, config_hash) of active templates "
            "cannot hold:\n" + "\n".join(lines) + "\nKeep one of each group and soft-delete "
            "the others (`prompter-worker templates delete ID`; a deleted template still "
            "accepts its events), then migrate again. Nothing was changed."
        )
    # Equal hashes mean equal bytes: only the rows whose hash changed are rewritten.
    changed = [(row, digest, data) for row, digest, data in computed if digest != row.config_hash]
    # Parked first, so that no update meets another row's old hash on its way.
    for row, _, _ in changed:
        conn.execute(PARK, {"id": row.id})
    for row, digest, data in changed:
        conn.execute(UPDATE, {"id": row.id, "hash": digest, "json": data.decode()})
    log.info("config hashes: %d of %d templates recomputed", len(changed), len(rows))


def _offline() -> bool:
    """``--sql`` (no database): the hashes are computed in Python from the rows, which an
    SQL script cannot do; it says so instead."""
    if not op.get_context().as_sql:
        return False
    op.execute(
        f"-- {revision}: recomputes config_hash and config_canonical_json in Python from the "
        "rows; run `prompter-worker migrate` against the database to apply it"
    )
    return True


def upgrade() -> None:
    if not _offline():
        _recompute(_as_jcs_reads, _jcs, "canonical JSON (RFC 8785)")


def downgrade() -> None:
    if not _offline():
        _recompute(orjson.loads, _former, "the former canonical JSON")
