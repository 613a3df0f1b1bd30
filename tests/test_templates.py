"""Templates: canonical config, hash, race-safe registration, soft delete, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- canonical config JSON: RFC 8785 (JCS) ------------------------------------------------------


def test_canonical_json_follows_rfc_8785() -> None:
    """Issue 13, case 6. Numbers are serialized as RFC 8785 says (ECMAScript's shortest
    form of the double: 5.120e2 and 512.0 are 512, 1e21 is 1e+21, 1e-7 is 1e-7), keys are
    sorted by UTF-16 code units (an astral character before U+FB01), control characters
    escaped as JCS escapes them: the same bytes any JCS implementation gives."""
    config = {
        "inference_params": {"a": 5.120e2, "b": 1.0, "c": 1e21, "d": 1e-7, "e": -0.0},
        "tools_spec": {"\ufb01": 1, "\U0001f600": 2, "\u20ac": 3, "\r": "\u2028\x1f"},
        "model_id": "m",
    }
    assert (
        templates.canonical_json(config)
        == (
            '{"inference_params":{"a":512,"b":1,"c":1e+21,"d":1e-7,"e":0},'
            '"model_id":"m",'
            '"tools_spec":{"\\r":"\u2028\\u001f","\u20ac":3,"\U0001f600":2,"\ufb01":1}}'
        ).encode()
    )
    assert templates.canonical_json({"x": 1}) == templates.canonical_json({"x": 1.0})


def test_template_files_keep_every_number_exactly_or_are_refused(
    database: str, tmp_path: Path
) -> None:
    """Issue 13, case 6, from the command line. A template file's numbers are read
    exactly: 5.120e2 is stored, and hashed, as JCS's 512 (not Python's 512.0). An integer
    beyond 2^53 - 1, which no JCS implementation can hold exactly, is refused with a
    message naming the field, and nothing is registered."""
    org, ws = str(uuid.uuid4()), str(uuid.uuid4())
    text = json.dumps(template_doc(org, ws, inference_params={"top_k": 0})).replace(
        '"top_k": 0', '"top_k": 5.120e2'
    )
    path = tmp_path / "tpl.json"
    path.write_text(text)
    added = cli("add", str(path), database=database)
    assert added.returncode == 0, added.stderr
    config = {k: v for k, v in template_doc(org, ws).items() if k in templates.CONFIG_FIELDS}
    config["inference_params"] = {"top_k": 512}
    expected = templates.canonical_json(config)
    assert b'"top_k":512}' in expected

    async def stored() -> asyncpg.Record:
        conn = await asyncpg.connect(database)
        try:
            return await conn.fetchrow(
                "SELECT config_hash, config_canonical_json::text AS canonical,"
                " inference_params::text AS params FROM prompt_templates WHERE id = $1",
                uuid.UUID(added.stdout.strip()),
            )
        finally:
            await conn.close()

    row = asyncio.run(stored())
    assert row["config_hash"] == hashlib.sha256(expected).hexdigest()
    assert json.loads(row["params"]) == {"top_k": 512}
    assert "512.0" not in row["canonical"]

    big = text.replace('"top_k": 5.120e2', '"seed": 18446744073709551617')
    path.write_text(big)
    refused = cli("add", str(path), database=database)
    assert refused.returncode == 1
    assert "$.inference_params.seed" in refused.stderr
    assert "2^53" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_cross_language_example_of_the_docs_holds() -> None:
    """docs/events.md's example (a template config, its canonical bytes and its hash, which
    JavaScript's `canonicalize` reproduces) is exactly what this code computes."""
    text = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    section = text[text.index("## Templates and canonical config JSON") :]
    source = re.search(r"```json\n(.*?)```", section, re.S)
    canonical = re.search(r"```text\n(.*?)\n```", section, re.S)
    digest = re.search(r"`config_hash` `([0-9a-f]{64})`", section)
    assert source
    assert canonical
    assert digest
    config = templates.loads(source.group(1))
    assert templates.canonical_json(config) == canonical.group(1).encode()
    assert templates.config_hash(config) == digest.group(1)
    assert hashlib.sha256(canonical.group(1).encode()).hexdigest() == digest.group(1)


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ('{"a": 1, "a": 2}', 'the key "a" appears twice in an object'),
        ('{"a": [1, {"b": 9007199254740992}]}', '"$.a[1].b" is an integer beyond'),
        ('{"a": "\\ud800"}', '"$.a" holds a lone surrogate'),
        ('{"a": -9007199254740991, "b": 1e400}', '"$.b" is not a finite number'),
    ],
)
def test_what_canonical_json_cannot_hold_exactly_is_refused(text: str, detail: str) -> None:
    """NaN, Infinity, duplicate keys (parsers disagree on which wins), integers beyond
    2^53 - 1 (the edge itself is fine), lone surrogates and numbers too large for a double:
    refused with a message naming the place, never hashed as something else."""
    with pytest.raises(Rejection) as info:
        templates.canonical_json({"inference_params": templates.loads(text)})
    assert detail.replace("$.", "$.inference_params.") in info.value.detail


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**53) + 1, 2**53 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=25,
    )
)
def test_canonical_json_is_a_fixed_point_and_keeps_every_value(value: object) -> None:
    """Canonicalizing the canonical bytes again gives the same bytes, and they parse back
    to the same value (numbers as doubles, as JCS reads them): what is stored can be
    re-hashed by anyone."""
    config = {"inference_params": value}
    once = templates.canonical_json(config)
    read = templates.loads(once, as_doubles=True)  # 1e16 is printed 10000000000000000
    assert templates.canonical_json(read) == once
    assert read.get("inference_params") == value
