"""Templates: canonical config, hash, race-safe registration, soft delete, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.factories import template_doc
from tests.helpers import run_cli
from worker import templates
from worker.errors import Rejection

ROOT = Path(__file__).resolve().parent.parent


def spec(**overrides: object) -> templates.TemplateSpec:
    doc = template_doc(str(uuid.uuid4()), str(uuid.uuid4()))
    doc.update(overrides)
    return templates.parse_spec(doc)


def test_canonical_json_sorts_keys_drops_nulls_and_has_no_whitespace() -> None:
    """Key order, whitespace and null-valued fields do not change the canonical bytes."""
    a = {
        "model_id": "m",
        "inference_params": {"b": 1, "a": [1, {"y": 2, "x": "é"}]},
        "tools_spec": None,
    }
    b = {"inference_params": {"a": [1, {"x": "é", "y": 2}], "b": 1}, "model_id": "m"}
    assert templates.canonical_json(a) == templates.canonical_json(b)
    assert (
        templates.canonical_json(a)
        == '{"inference_params":{"a":[1,{"x":"é","y":2}],"b":1},"model_id":"m"}'.encode()
    )
    assert templates.config_hash(a) == hashlib.sha256(templates.canonical_json(b)).hexdigest()


def test_name_and_tenancy_are_not_config() -> None:
    """Two templates differing only in name have the same config hash."""
    org, ws = str(uuid.uuid4()), str(uuid.uuid4())
    one = templates.parse_spec(template_doc(org, ws, name="One"))
    two = templates.parse_spec(template_doc(org, ws, name="Two"))
    assert one.config_hash == two.config_hash
    assert spec(model_id="gpt-4.1").config_hash != one.config_hash


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"org_id": "x"}, '"org_id" must be a UUID string'),
        ({"name": ""}, '"name" must be a non-empty string'),
        ({"user_prompt_template": None}, '"user_prompt_template" is required'),
        ({"inference_params": [1]}, '"inference_params" must be a JSON object'),
        ({"colour": "blue"}, "unknown template field 'colour'"),
        ({"grounding_profile_id": "nope"}, '"grounding_profile_id" must be a UUID string'),
        ({"tools_spec": {"a": "\u0000"}}, "$.tools_spec.a holds \\u0000"),
    ],
)
def test_invalid_template_names_the_field(overrides: dict[str, object], detail: str) -> None:
    """A bad template document is refused with the field at fault."""
    with pytest.raises(Rejection) as info:
        spec(**overrides)
    assert info.value.detail == detail


async def test_register_is_idempotent_per_workspace(conn: asyncpg.Connection) -> None:
    """The same config twice in a workspace returns the existing template."""
    s = spec()
    first, created = await templates.register(conn, s)
    second, created_again = await templates.register(conn, s)
    assert (created, created_again) == (True, False)
    assert first == second
    row = await conn.fetchrow("SELECT * FROM prompt_templates WHERE id = $1", uuid.UUID(first))
    assert row["config_hash"] == s.config_hash
    assert json.loads(row["config_canonical_json"]) == json.loads(s.canonical_json)


async def test_register_is_race_safe(database: str) -> None:
    """Ten concurrent registrations of one config: one row, one id for all."""
    s = spec()
    conns = [await asyncpg.connect(database) for _ in range(10)]
    try:
        ids = await asyncio.gather(*(templates.register(c, s) for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert len({i for i, _ in ids}) == 1
    assert sum(created for _, created in ids) == 1


async def test_soft_delete_then_register_creates_a_new_template(conn: asyncpg.Connection) -> None:
    """After a soft delete the same config registers as a new active template."""
    s = spec()
    first, _ = await templates.register(conn, s)
    assert await templates.soft_delete(conn, first)
    assert not await templates.soft_delete(conn, first)  # already deleted
    second, created = await templates.register(conn, s)
    assert created
    assert second != first
    active = await templates.list_templates(conn, org_id=s.org_id)
    everything = await templates.list_templates(conn, org_id=s.org_id, include_deleted=True)
    assert [t.id for t in active] == [second]
    assert {t.id for t in everything} == {first, second}


def cli(*args: str, database: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database, "PROMPTER_LOG_FORMAT": "json"}
    return run_cli("templates", *args, env=env, stdin=stdin)


def test_templates_cli(database: str, tmp_path: Path) -> None:
    """templates add / list / delete from the command line."""
    org, ws = str(uuid.uuid4()), str(uuid.uuid4())
    path = tmp_path / "tpl.json"
    path.write_text(json.dumps(template_doc(org, ws, name="CLI template")))
    added = cli("add", str(path), database=database)
    assert added.returncode == 0, added.stderr
    template_id = added.stdout.strip()
    assert uuid.UUID(template_id)
    again = cli("add", "-", database=database, stdin=path.read_text())
    assert again.stdout.strip() == template_id
    assert "already registered" in again.stderr

    listed = cli("list", "--workspace", ws, "--json", database=database)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["name"]) for r in rows] == [(template_id, "CLI template")]

    assert cli("delete", template_id, database=database).returncode == 0
    gone = cli("delete", template_id, database=database)
    assert gone.returncode == 1
    assert f"no active template {template_id}" in gone.stderr
    assert cli("list", "--workspace", ws, "--json", database=database).stdout == ""

    bad = cli("add", "-", database=database, stdin='{"name": "x"}')
    assert bad.returncode == 1
    assert '"org_id" is required' in bad.stderr
