"""The schema check at start (worker/store/schema.py): what it accepts, what it names as missing.

Against the real PostgreSQL; the revision bookkeeping also against alembic/versions.
"""

from __future__ import annotations

import ast
import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT, with_user
from worker.config import Settings
from worker.errors import ConfigError, SchemaError
from worker.store import migrations, revisions, schema


@pytest.fixture
async def owner(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema's owner (a superuser here), for changing the schema."""
    connection = await asyncpg.connect(database)
    try:
        yield connection
    finally:
        await connection.close()


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))


async def _upgrade(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(migrations.upgrade, url, revision)


# --- the revisions the worker knows -------------------------------------------------------


def test_known_revisions_are_the_history_in_alembic_versions() -> None:
    """schema.REVISIONS is prompter's history, root first, head last: a new revision in
    alembic/versions must be added there (or the workers would call it unknown)."""
    history = [r.revision for r in script().walk_revisions()]
    assert list(schema.REVISIONS) == list(reversed(history))
    assert script().get_current_head() == schema.HEAD


def test_every_revision_says_which_workers_run_on_it() -> None:
    """Each revision declares workers_compatible_from: itself or an ancestor, and never an
    older revision than its parent's value (the rule the template states)."""
    scripts = script()
    order = list(schema.REVISIONS)
    for revision in scripts.walk_revisions():
        since = getattr(revision.module, "workers_compatible_from", None)
        assert isinstance(since, str), revision.revision
        ancestry = [r.revision for r in scripts.iterate_revisions(revision.revision, "base")]
        assert since in ancestry, revision.revision
        parent = revision.down_revision
        if isinstance(parent, str):
            parent_since = scripts.get_revision(parent).module.workers_compatible_from
            assert order.index(since) >= order.index(parent_since), revision.revision


def test_template_asks_for_compatibility() -> None:
    """A revision made from the template declares workers_compatible_from, defaulting to
    itself (older workers refuse it until the author says otherwise), and says why."""
    template = (ROOT / "alembic" / "script.py.mako").read_text()
    assert "workers_compatible_from: str = ${repr(up_revision)}" in template
    assert "Compatible with older workers?" in template


def test_v7_revision_carries_the_branch_label() -> None:
    """The root revision is labelled `prompter`, so an application can address the branch."""
    root = script().get_revision(schema.REVISIONS[0])
    assert root is not None
    assert root.branch_labels == {"prompter"}
    assert root.down_revision is None


# --- settings --------------------------------------------------------------------------


def test_version_table_from_environment() -> None:
    """PROMPTER_VERSION_TABLE names the version table; default prompter_alembic_version; a
    name that is not a plain SQL name is refused, naming the variable."""
    assert schema.version_table({}) == "prompter_alembic_version"
    assert schema.version_table({"PROMPTER_VERSION_TABLE": " my_versions "}) == "my_versions"
    for bad in ("Versions", "a-b", "x; DROP TABLE y", "1abc", "a" * 64):
        with pytest.raises(ConfigError, match="PROMPTER_VERSION_TABLE"):
            schema.version_table({"PROMPTER_VERSION_TABLE": bad})


@given(st.text(max_size=80))
def test_version_table_is_a_plain_name_or_refused(raw: str) -> None:
    """Whatever PROMPTER_VERSION_TABLE holds, the name put into SQL unquoted is a plain
    lower-case identifier of at most 63 characters (surrounding blanks ignored, empty means
    the default), or the setting is refused, naming the variable."""
    plain = re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", raw.strip())
    if raw.strip() and not plain:
        with pytest.raises(ConfigError, match=r"^PROMPTER_VERSION_TABLE: "):
            schema.version_table({"PROMPTER_VERSION_TABLE": raw})
        return
    name = schema.version_table({"PROMPTER_VERSION_TABLE": raw})
    assert name == (raw.strip() or "prompter_alembic_version")
    assert len(name) <= 63
    assert name[0] in "abcdefghijklmnopqrstuvwxyz_"
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")


# --- a migrated database --------------------------------------------------------------------


async def test_migrated_database_is_current(conn: asyncpg.Connection) -> None:
    """After migrate: the head recorded in prompter's own table, nothing missing."""
    state = await schema.inspect(conn)
    assert state.status == schema.CURRENT
    assert state.revision == schema.HEAD
    assert state.recorded_in == "prompter_alembic_version"
    assert state.ok
    assert not state.missing
    assert not state.warnings
    assert not state.invalid_indexes
    assert state.describe() == (
        f"schema at revision {schema.HEAD} (in prompter_alembic_version), current"
    )


async def test_runtime_role_reads_the_revision(settings: Settings) -> None:
    """The least-privilege runtime role (sql/runtime_role.sql) reads the revision: migrate
    makes the version and compatibility tables readable by every role."""
    state = await schema.require_database(settings)
    assert state.status == schema.CURRENT
    assert not state.warnings


async def test_unreadable_version_table_falls_back_to_the_tables(
    owner: asyncpg.Connection, database: str, runtime_role: tuple[str, str]
) -> None:
    """A role that may not read the version table still starts on a complete schema, with a
    warning that it checked the tables instead."""
    await owner.execute("REVOKE SELECT ON prompter_alembic_version FROM PUBLIC")
    conn = await asyncpg.connect(with_user(database, *runtime_role))
    try:
        state = await schema.require(conn)
    finally:
        await conn.close()
    assert state.status == schema.UNVERSIONED
    assert state.ok
    assert state.warnings == (
        "this role may not read prompter_alembic_version: the tables were checked instead",
    )


async def test_schema_applied_by_hand_is_accepted(
    owner: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """With no version record at all (the schema applied by hand), the tables, columns and
    unique keys decide: complete, the worker runs."""
    await owner.execute("DROP TABLE prompter_alembic_version, prompter_schema_compat")
    state = await schema.require(conn)
    assert state.status == schema.UNVERSIONED
    assert state.revision is None
    assert state.ok


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        (
            "ALTER TABLE prompt_results DROP COLUMN system_fingerprint",
            "column prompt_results.system_fingerprint",
        ),
        (
            "ALTER TABLE prompt_versions DROP CONSTRAINT ux_versions_org_ws_tpl_pvk",
            "unique key ux_versions_org_ws_tpl_pvk on prompt_versions (org_id, workspace_id,"
            " template_id, provider_version_key)",
        ),
        (
            "DROP INDEX ux_tpl_org_ws_confighash_active",
            "unique key on prompt_templates (org_id, workspace_id, config_hash)"
            " WHERE deleted_at IS NULL",
        ),
        (
            "ALTER TABLE prompt_results DROP CONSTRAINT prompt_results_pkey CASCADE",
            "unique key on prompt_results (id)",
        ),
        (
            "ALTER TABLE prompt_results ADD COLUMN tenant_region text NOT NULL",
            "a value for column prompt_results.tenant_region (NOT NULL, no default, not"
            " written by this worker)",
        ),
        ("DROP TABLE prompt_results", "table prompt_results"),
    ],
)
async def test_what_is_missing_is_named(
    owner: asyncpg.Connection, conn: asyncpg.Connection, change: str, missing: str
) -> None:
    """Whatever the revision says, a table, column or unique key the worker relies on that
    is gone (or a NOT NULL column its inserts would leave out) stops it, named."""
    await owner.execute(change)
    state = await schema.inspect(conn)
    assert state.status == schema.CURRENT
    assert missing in state.missing
    assert not state.ok
    with pytest.raises(SchemaError) as caught:
        await schema.require(conn)
    message = str(caught.value)
    assert missing in message
    assert "\n" not in message
    assert "`prompter-worker migrate --sql` prints the DDL" in message


async def test_invalid_unique_index_is_missing(
    owner: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """A unique index left INVALID (an interrupted concurrent build) does not count: ON
    CONFLICT cannot use it. The INVALID index is also reported with its fix."""
    await owner.execute(
        "UPDATE pg_index SET indisvalid = false"
        " WHERE indexrelid = 'ux_tpl_org_ws_confighash_active'::regclass"
    )
    state = await schema.inspect(conn)
    assert not state.ok
    assert state.invalid_indexes == ("ux_tpl_org_ws_confighash_active",)
    assert any(m.startswith("unique key on prompt_templates") for m in state.missing)
    assert "REINDEX INDEX CONCURRENTLY ux_tpl_org_ws_confighash_active" in state.warnings[0]


async def test_invalid_secondary_index_only_warns(
    owner: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """An INVALID index the worker does not rely on is a warning, not a reason to stop."""
    await owner.execute(
        "UPDATE pg_index SET indisvalid = false"
        " WHERE indexrelid = 'ix_versions_template_id'::regclass"
    )
    state = await schema.require(conn)
    assert state.ok
    assert state.invalid_indexes == ("ix_versions_template_id",)


async def test_unmigrated_database_is_missing(empty_database: str) -> None:
    """An empty database: nothing recorded, no tables; the message says to migrate."""
    conn = await asyncpg.connect(empty_database)
    try:
        state = await schema.inspect(conn)
        with pytest.raises(SchemaError) as caught:
            await schema.require(conn, database_url=empty_database)
    finally:
        await conn.close()
    assert state.status == schema.MISSING
    assert str(caught.value) == (
        f"{empty_database}: the database has no prompter schema (no prompt_templates,"
        " prompt_versions, prompt_results): run `prompter-worker migrate` first"
    )


async def test_one_revision_behind(empty_database: str) -> None:
    """Migrated to the revision before head: behind, and the fix is migrate."""
    await _upgrade(empty_database, schema.REVISIONS[-2])
    conn = await asyncpg.connect(empty_database)
    try:
        state = await schema.inspect(conn)
    finally:
        await conn.close()
    assert state.status == schema.BEHIND
    assert state.revision == schema.REVISIONS[-2]
    assert not state.ok
    assert state.describe() == (
        f"schema at revision {schema.REVISIONS[-2]} (in prompter_alembic_version), behind:"
        f" this prompter-worker needs {schema.HEAD}: run `prompter-worker migrate` first"
    )


async def test_unknown_revision_in_own_table_without_record_is_incompatible(
    owner: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """A revision this worker does not know, in prompter's own table, with no
    compatibility record: refused, asking for a newer prompter-worker."""
    await owner.execute("UPDATE prompter_alembic_version SET version_num = '20991231000000'")
    state = await schema.inspect(conn)
    assert state.status == schema.INCOMPATIBLE
    assert "records no compatibility with older workers" in state.describe()
    assert state.describe().endswith(
        "upgrade prompter-worker to the release that migrated this database"
    )


async def test_unknown_revision_in_application_table_is_theirs(
    owner: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    """An application's alembic_version holding its own revisions says nothing about
    prompter's schema: the tables decide, and prompter's own table still counts."""
    await owner.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
        "INSERT INTO alembic_version VALUES ('1a2b3c4d5e6f')"
    )
    state = await schema.inspect(conn)
    assert state.status == schema.CURRENT
    await owner.execute("DROP TABLE prompter_alembic_version")
    state = await schema.inspect(conn)
    assert state.status == schema.UNVERSIONED
    assert state.ok


# --- newer schemas (rolling upgrades) ------------------------------------------------------


NEWER = "20991231000000"


def newer_release(tmp_path: Path, *, compatible_from: str, body: str) -> Path:
    """A copy of this project's alembic directory with one more revision, as a newer
    release would ship it; the path of its alembic.ini."""
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    shutil.copytree(
        ROOT / "alembic", tmp_path / "alembic", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "alembic" / "versions" / f"{NEWER}_newer.py").write_text(
        f'''"""A revision of a newer release.

Why: testing.

Revision ID: {NEWER}
Revises: {schema.HEAD}
"""

from alembic import op

revision = "{NEWER}"
down_revision = "{schema.HEAD}"
branch_labels = None
depends_on = None
workers_compatible_from = "{compatible_from}"


def upgrade() -> None:
    op.execute("{body}")


def downgrade() -> None:
    pass
'''
    )
    ast.parse((tmp_path / "alembic" / "versions" / f"{NEWER}_newer.py").read_text())
    return tmp_path / "alembic.ini"


async def migrate_as_newer_release(url: str, ini: Path) -> None:
    """``migrate`` as the newer release runs it: its alembic directory, and its code, which
    knows the newer revision."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROMPTER_ALEMBIC_INI", str(ini))
        patch.setattr(revisions, "REVISIONS", (*revisions.REVISIONS, NEWER))
        patch.setattr(revisions, "HEAD", NEWER)
        await _upgrade(url)


async def test_newer_compatible_schema_is_accepted(database: str, tmp_path: Path) -> None:
    """A newer release's migrate applied an additive revision that says workers of our head
    still run on it: this worker, which has never seen that revision, starts (warning)."""
    ini = newer_release(
        tmp_path,
        compatible_from=schema.HEAD,
        body="CREATE TABLE prompt_notes (id uuid PRIMARY KEY)",
    )
    await migrate_as_newer_release(database, ini)
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT * FROM prompter_schema_compat")
        assert [tuple(r) for r in rows] == [(NEWER, schema.HEAD)]
        state = await schema.require(conn)
    finally:
        await conn.close()
    assert state.status == schema.NEWER
    assert state.revision == NEWER
    assert state.compatible_from == schema.HEAD
    assert state.ok


async def test_newer_incompatible_schema_is_refused(database: str, tmp_path: Path) -> None:
    """A newer release's revision that only its own workers run on (the template's
    default; the tables alone would look fine): this worker refuses to start, naming the
    revision and the fix."""
    ini = newer_release(
        tmp_path,
        compatible_from=NEWER,
        body="CREATE TABLE prompt_notes (id uuid PRIMARY KEY)",
    )
    await migrate_as_newer_release(database, ini)
    conn = await asyncpg.connect(database)
    try:
        state = await schema.inspect(conn)
        with pytest.raises(SchemaError) as caught:
            await schema.require(conn)
    finally:
        await conn.close()
    assert state.status == schema.INCOMPATIBLE
    assert state.compatible_from == NEWER
    assert str(caught.value) == (
        f"schema at revision {NEWER} (in prompter_alembic_version), newer than this"
        f" prompter-worker knows (built for {schema.HEAD}), and runs only workers of revision"
        f" {NEWER} and later: upgrade prompter-worker to the release that migrated this"
        " database"
    )


async def test_compatible_claim_does_not_hide_missing_columns(
    database: str, tmp_path: Path
) -> None:
    """A newer revision that claims compatibility but adds a NOT NULL column without a
    default (every insert of this worker would fail) is still refused: the tables decide
    too."""
    ini = newer_release(
        tmp_path,
        compatible_from=schema.HEAD,
        body="ALTER TABLE prompt_results ADD COLUMN region text NOT NULL",
    )
    with pytest.raises(SchemaError, match="migrated, but the workers cannot run on it"):
        await migrate_as_newer_release(database, ini)
    conn = await asyncpg.connect(database)
    try:
        state = await schema.inspect(conn)
    finally:
        await conn.close()
    assert state.status == schema.NEWER
    assert not state.ok
    assert state.missing == (
        "a value for column prompt_results.region (NOT NULL, no default, not written by this"
        " worker)",
    )


# --- compatibility records ------------------------------------------------------------------


def test_compat_statements() -> None:
    """One row per head, the rest deleted, both bookkeeping tables readable by PUBLIC; ids
    that are not plain revision ids are refused (they are put into SQL)."""
    statements = migrations.compat_statements("prompter_alembic_version", {"b2": "a1"})
    assert statements == [
        "CREATE TABLE IF NOT EXISTS prompter_schema_compat (revision VARCHAR(32) PRIMARY KEY,"
        " workers_compatible_from VARCHAR(32) NOT NULL)",
        "GRANT SELECT ON prompter_schema_compat, prompter_alembic_version TO PUBLIC",
        "DELETE FROM prompter_schema_compat WHERE revision NOT IN ('b2')",
        "INSERT INTO prompter_schema_compat (revision, workers_compatible_from) VALUES"
        " ('b2', 'a1') ON CONFLICT (revision) DO UPDATE SET workers_compatible_from ="
        " EXCLUDED.workers_compatible_from",
    ]
    assert migrations.compat_statements("v", {})[-1] == "DELETE FROM prompter_schema_compat"
    with pytest.raises(ConfigError):
        migrations.compat_statements("v", {"x'; DROP TABLE y; --": "a1"})


async def test_downgrade_keeps_records_in_step(empty_database: str) -> None:
    """The compatibility rows follow the version table: one per head, down to none."""
    await _upgrade(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM prompter_schema_compat")] == [
            (schema.HEAD, "20250814141329")
        ]
        await asyncio.to_thread(migrations.downgrade, empty_database, "-1")
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM prompter_schema_compat")] == [
            (schema.REVISIONS[-2], "20250814141329")
        ]
        await asyncio.to_thread(migrations.downgrade, empty_database, "base")
        assert await conn.fetch("SELECT * FROM prompter_schema_compat") == []
    finally:
        await conn.close()
