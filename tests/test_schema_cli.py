"""The schema check from the command line: `run`, `replay --direct`, `templates` and
`status` on databases that are unmigrated, behind, or newer than the worker.

Each command runs in a subprocess, as an operator runs it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.conftest import AMQP_URL, create_database, drop_database, unique_name
from tests.helpers import run_cli
from worker.store import migrations, schema

NEWER = "20991231000000"
BEHIND = schema.REVISIONS[-2]


def env(url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTER_")}
    return {**base, "DATABASE_URL": url, "AMQP_URL": AMQP_URL, "PROMPTER_LOG_FORMAT": "text"}


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def databases(migrated_template: str) -> Iterator[dict[str, str]]:
    """One database per state, made once for the module: unmigrated, one revision behind,
    a newer compatible and a newer incompatible schema (as a newer release's migrate
    records them)."""
    names = {state: unique_name(f"prompter_cli_{state}") for state in ("none", "behind")}
    names |= {state: unique_name(f"prompter_cli_{state}") for state in ("newer", "newer_bad")}
    urls = {state: create_database(name) for state, name in names.items() if "newer" not in state}
    for state in ("newer", "newer_bad"):
        urls[state] = create_database(names[state], template=migrated_template)
    try:
        migrations.upgrade(urls["behind"], BEHIND)
        for state, since in (("newer", schema.HEAD), ("newer_bad", NEWER)):
            asyncio.run(
                execute(
                    urls[state],
                    f"UPDATE prompter_alembic_version SET version_num = '{NEWER}';"
                    f"DELETE FROM prompter_schema_compat;"
                    f"INSERT INTO prompter_schema_compat VALUES ('{NEWER}', '{since}')",
                )
            )
        yield urls
    finally:
        for name in names.values():
            drop_database(name)


def error_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in out.stderr + out.stdout
    return [line for line in out.stderr.splitlines() if "Error: " in line or " error " in line]


EXPECTED = {
    "none": "the database has no prompter schema (no prompt_templates, prompt_versions,"
    " prompt_results): run `prompter-worker migrate` first",
    "behind": f"schema at revision {BEHIND} (in prompter_alembic_version), behind: this"
    f" prompter-worker needs {schema.HEAD}: run `prompter-worker migrate` first",
    "newer_bad": f"schema at revision {NEWER} (in prompter_alembic_version), newer than this"
    f" prompter-worker knows (built for {schema.HEAD}), and runs only workers of revision"
    f" {NEWER} and later: upgrade prompter-worker to the release that migrated this database",
}


@pytest.mark.parametrize("state", ["none", "behind", "newer_bad"])
def test_run_exits_2_naming_the_fix(databases: dict[str, str], state: str) -> None:
    """`run` on a schema it cannot run on exits 2 at once, with one line naming what is
    wrong and the command that fixes it (no traceback, no retry loop)."""
    out = run_cli("run", env=env(databases[state]))
    assert out.returncode == 2, out.stderr
    lines = error_lines(out)
    assert len(lines) == 1, out.stderr
    assert lines[0].endswith(f"cannot start: {databases[state]}: {EXPECTED[state]}")


@pytest.mark.parametrize("state", ["none", "behind", "newer_bad"])
def test_templates_and_direct_replay_exit_2(
    databases: dict[str, str], state: str, tmp_path: Path
) -> None:
    """`templates list` and `replay --direct` refuse the same schemas, the same way."""
    events = tmp_path / "events.jsonl"
    events.write_text("{}\n")
    for args in (
        ["templates", "list"],
        ["replay", "--direct", str(events), "--rejects", str(tmp_path / "r.jsonl")],
    ):
        out = run_cli(*args, env=env(databases[state]))
        assert out.returncode == 2, (args, out.stderr)
        assert error_lines(out) == [f"Error: {databases[state]}: {EXPECTED[state]}"], args
    assert not (tmp_path / "r.jsonl").exists()


def test_newer_compatible_schema_runs_older_commands(databases: dict[str, str]) -> None:
    """A newer schema whose revision says workers of this head still run on it: the
    commands run (a warning says so)."""
    out = run_cli("templates", "list", env=env(databases["newer"]))
    assert out.returncode == 0, out.stderr
    assert f"schema at revision {NEWER}" in out.stderr
    assert f"it runs workers of {schema.HEAD} and later" in out.stderr


@pytest.mark.parametrize(
    ("state", "status", "ok"),
    [
        ("none", "missing", False),
        ("behind", "behind", False),
        ("newer", "newer", True),
        ("newer_bad", "incompatible", False),
    ],
)
def test_status_shows_the_schema(
    databases: dict[str, str], state: str, status: str, ok: bool
) -> None:
    """`status` shows the schema's revision and whether it is current, in text and JSON."""
    text = run_cli("status", env=env(databases[state]))
    assert text.returncode == 0, text.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("schema "))
    as_json = run_cli("status", "--json", env=env(databases[state]))
    assert as_json.returncode == 0, as_json.stderr
    report = orjson.loads(as_json.stdout)["schema"]
    assert report["status"] == status
    assert report["ok"] is ok
    assert report["head"] == schema.HEAD
    assert line == f"schema    {report['message'].removeprefix('schema ')}"
    if state in EXPECTED:
        assert report["message"] == EXPECTED[state]
    expected_revision = {"none": None, "behind": BEHIND}.get(state, NEWER)
    assert report["revision"] == expected_revision


def test_status_of_a_current_schema(database: str) -> None:
    """On a migrated database: the head, current; the row counts as before."""
    out = run_cli("status", "--json", env=env(database))
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    assert report["schema"]["status"] == "current"
    assert report["schema"]["revision"] == schema.HEAD
    assert report["schema"]["recorded_in"] == "prompter_alembic_version"
    assert report["rows"] == {"prompt_templates": 0, "prompt_versions": 0, "prompt_results": 0}
