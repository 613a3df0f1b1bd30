"""Security: the least-privilege runtime role, TLS settings, secrets, the dependency audit.

(The end-to-end checks that need a broker user of their own, TLS servers or a broker to
refuse things live in tests/faults/test_security_e2e.py, on the fault suite's private
servers.)
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import with_user
from tests.factories import Tenant, event, event_doc, make_tenant
from tests.helpers import run_cli
from worker import logs
from worker.config import Settings
from worker.errors import ConfigError
from worker.security import check_amqp_url, mask_url, split_urls, tls_warnings

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("prompt_templates", "prompt_versions", "prompt_results")
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
#: The runtime role's rights, column by column (none on any table as a whole).
VERSION_COLUMNS = (
    "id", "org_id", "workspace_id", "template_id", "provider_version_key", "provider",
    "model_id", "fingerprint_captured_at", "first_seen_at", "last_seen_at",
)  # fmt: skip
RESULT_COLUMNS = (
    "id", "org_id", "workspace_id", "template_id", "version_id", "provider_version_key",
    "system_fingerprint", "request", "response", "analysis_config", "created_at",
)  # fmt: skip
MUTABLE_VERSION_COLUMNS = (
    "first_seen_at", "last_seen_at", "fingerprint_captured_at", "provider", "model_id",
)  # fmt: skip
GRANTED = {
    "prompt_templates": {"SELECT": {"id", "org_id", "workspace_id", "name", "deleted_at"}},
    "prompt_versions": {
        "SELECT": set(VERSION_COLUMNS),
        "INSERT": set(VERSION_COLUMNS) - {"id"},
        "UPDATE": set(MUTABLE_VERSION_COLUMNS),
    },
    "prompt_results": {
        "SELECT": set(RESULT_COLUMNS) - {"version_id"},
        "INSERT": set(RESULT_COLUMNS),
    },
}


# --- the runtime role ---------------------------------------------------------------------


async def test_runtime_role_has_only_what_ingestion_needs(
    conn: asyncpg.Connection, runtime_role: tuple[str, str]
) -> None:
    """sql/runtime_role.sql makes a login role that is no superuser, creates no role or
    database, replicates nothing, bypasses no row security, belongs to no role, owns
    nothing, may not create in the schema or the database, holds no right on any table as
    a whole, and exactly these column rights: SELECT of a template's id and tenant (and
    name and deletion time, for `trace`);
    SELECT, INSERT and UPDATE of the mutable columns only on versions; INSERT and SELECT
    (but of version_id) on results."""
    role = runtime_role[0]
    attrs = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", role)
    assert attrs["rolcanlogin"]
    for flag in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls"):
        assert attrs[flag] is False, flag
    assert not await conn.fetchval(
        "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
        " WHERE r.rolname = $1",
        role,
    )
    assert not await conn.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
        " WHERE r.rolname = $1",
        role,
    )
    assert await conn.fetchval("SELECT has_schema_privilege($1, 'public', 'USAGE')", role)
    assert not await conn.fetchval("SELECT has_schema_privilege($1, 'public', 'CREATE')", role)
    assert not await conn.fetchval(
        "SELECT has_database_privilege($1, current_database(), 'CREATE')", role
    )
    for table in TABLES:
        held = {
            p
            for p in PRIVILEGES
            if await conn.fetchval("SELECT has_table_privilege($1, $2, $3)", role, table, p)
        }
        assert held == set(), table
        columns = [
            r[0]
            for r in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass"
                " AND attnum > 0 AND NOT attisdropped",
                table,
            )
        ]
        by_column = {
            p: {
                c
                for c in columns
                if await conn.fetchval(
                    "SELECT has_column_privilege($1, $2, $3, $4)", role, table, c, p
                )
            }
            for p in ("SELECT", "INSERT", "UPDATE", "REFERENCES")
        }
        assert {p: cs for p, cs in by_column.items() if cs} == GRANTED[table], table


async def test_runtime_role_ingests_and_is_refused_everything_else(
    conn: asyncpg.Connection, database: str, runtime_role: tuple[str, str]
) -> None:
    """Logged in as the runtime role, the store ingests a batch; DELETE, TRUNCATE, DDL,
    writing templates, updating results or a version's key, tenant or template, and
    reading columns ingestion does not read are refused by PostgreSQL."""
    from worker.store.ingest import Store
    from worker.store.pool import create_pool

    t = await make_tenant(conn)
    url = with_user(database, *runtime_role)
    pool = await create_pool(url, max_size=1)
    try:
        result = await Store(pool).ingest([event(t), event(t)])
        assert result.stored == 2
        async with pool.acquire() as worker_conn:
            for sql in (
                "DELETE FROM prompt_results",
                "TRUNCATE prompt_versions",
                "UPDATE prompt_results SET system_fingerprint = 'x'",
                f"UPDATE prompt_versions SET org_id = '{uuid.uuid4()}'",
                "UPDATE prompt_versions SET template_id = NULL",
                "UPDATE prompt_versions SET workspace_id = org_id",
                "UPDATE prompt_versions SET provider_version_key = 'x'",
                "UPDATE prompt_versions SET id = gen_random_uuid()",
                "SELECT version_id FROM prompt_results",
                "SELECT config_canonical_json FROM prompt_templates",
                "CREATE TABLE sneaky (id int)",
                "ALTER TABLE prompt_results ADD COLUMN sneaky int",
                "DROP TABLE prompt_results",
                f"INSERT INTO prompt_templates (id) VALUES ('{uuid.uuid4()}')",
                "CREATE SCHEMA sneaky",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await worker_conn.execute(sql)
    finally:
        await pool.close()
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 2


def test_runtime_role_script_is_idempotent_and_resets_extra_rights(
    database: str, runtime_role: tuple[str, str]
) -> None:
    """Re-running the script (after a migration, say) keeps the role working and takes
    back any right granted by hand since."""
    import asyncio

    from tests.conftest import apply_runtime_role

    role = runtime_role[0]

    async def grant_and_check(after: bool) -> bool:
        c = await asyncpg.connect(database)
        try:
            if not after:
                await c.execute(f'GRANT DELETE ON prompt_results TO "{role}"')
            return bool(
                await c.fetchval("SELECT has_table_privilege($1, 'prompt_results', 'DELETE')", role)
            )
        finally:
            await c.close()

    assert asyncio.run(grant_and_check(after=False))
    apply_runtime_role(database, role)
    assert not asyncio.run(grant_and_check(after=True))


# --- TLS settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database_url", "amqp_url", "expected"),
    [
        ("postgresql://w:s3cr3tpw@127.0.0.1/p", "amqp://w:s3cr3tpw@localhost/", []),
        ("postgresql://w:s3cr3tpw@[::1]:5432/p", "amqp://w:s3cr3tpw@127.0.0.2/", []),
        ("postgresql:///p?host=/var/run/postgresql", "amqps://w:s3cr3tpw@mq.internal/", []),
        (
            "postgresql://w:s3cr3tpw@db.internal/p?sslmode=verify-full&sslrootcert=/etc/hostname",
            "amqps://w:s3cr3tpw@mq.internal/?cafile=/etc/hostname",
            [],
        ),
        (
            "postgresql://w:s3cr3tpw@db.internal/p",
            "amqps://w:s3cr3tpw@mq.internal/",
            ["sslmode=prefer"],
        ),
        (
            "postgresql://w:s3cr3tpw@db.internal/p?sslmode=disable",
            "amqps://mq/",
            ["sslmode=disable"],
        ),
        (
            "postgresql://w:s3cr3tpw@db.internal/p?sslmode=require",
            "amqps://mq/",
            ["does not check"],
        ),
        ("postgresql://w:s3cr3tpw@db.internal/p?sslmode=verify-ca", "amqps://mq/", ["not that it"]),
        (
            "postgresql://w:s3cr3tpw@a,db.internal:5433/p?sslmode=allow",
            "amqps://mq/",
            ["db.internal"],
        ),
        (
            "postgresql://w:s3cr3tpw@127.0.0.1/p",
            "amqp://w:s3cr3tpw@mq.internal/",
            ["amqp:// toward"],
        ),
    ],
)
def test_connections_that_do_not_verify_the_server_are_warned_about(
    database_url: str, amqp_url: str, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Anything but sslmode=verify-full toward a PostgreSQL host that is not local, and
    amqp:// toward a broker that is not local, is warned about at start (naming the host,
    never the password); local sockets and loopback addresses are not."""
    with caplog.at_level(logging.WARNING, logger="worker.config"):
        Settings.from_env({"DATABASE_URL": database_url, "AMQP_URL": amqp_url})
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.config"]
    assert len(warnings) == len(expected), warnings
    for warning, fragment in zip(warnings, expected, strict=True):
        assert fragment in warning
        assert "s3cr3tpw" not in warning


def test_pgsslmode_from_the_environment_counts() -> None:
    """PGSSLMODE (which asyncpg reads when the URL has no sslmode) is taken into account."""
    url = "postgresql://w@db.internal/p"
    assert tls_warnings(url, "amqps://mq/", {"PGSSLMODE": "verify-full"}) == []
    assert tls_warnings(url, "amqps://mq/", {"PGSSLMODE": "require"}) != []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmode=verify-everything", "sslmode must be one of"),
        ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "sslrootcert '/nonexistent"),
        ("sslcert=/nonexistent/client.pem", "sslcert '/nonexistent"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused(query: str, message: str) -> None:
    """An unknown sslmode or a certificate file that is not there stops the command at
    start, naming the setting (rather than failing at the first connection)."""
    with pytest.raises(ConfigError, match="DATABASE_URL") as info:
        Settings.from_env({"DATABASE_URL": f"postgresql://w:secretpw@db.internal/p?{query}"})
    assert message in str(info.value)
    assert "secretpw" not in str(info.value)


# --- secrets ------------------------------------------------------------------------------


def test_secrets_from_files_never_reach_errors_or_help(tmp_path: Path) -> None:
    """DATABASE_URL_FILE / AMQP_URL_FILE: the values are read from the files; a command
    that fails on them (an unreachable server, an invalid setting) says why without ever
    printing the passwords, and neither does --help."""
    db_password, mq_password = f"db-{uuid.uuid4().hex}", f"mq-{uuid.uuid4().hex}"
    (tmp_path / "db").write_text(f"postgresql://w:{db_password}@127.0.0.1:1/prompter\n")
    (tmp_path / "mq").write_text(f"amqp://w:{mq_password}@127.0.0.1:1/\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL_FILE": str(tmp_path / "db"),
        "AMQP_URL_FILE": str(tmp_path / "mq"),
        "PROMPTER_LOG_FORMAT": "json",
    }
    runs = [
        ["status"],
        ["status", "--json"],
        ["templates", "list"],
        ["run", "--help"],
        ["run", "--batch-size", "lots"],
    ]
    outputs = []
    for args in runs:
        out = run_cli(*args, env=env)
        outputs.append((args, out.returncode, out.stdout + out.stderr))
    for args, _, text in outputs:
        assert db_password not in text, args
        assert mq_password not in text, args
        assert "Traceback" not in text, args
    status = outputs[0]
    assert status[1] != 0
    assert "127.0.0.1:1" in status[2]  # it says which server, masked
    assert "***" in status[2]


def make_tenant_ids() -> Tenant:
    return Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))


_LETTERS = "ghjkmnpqrstvwxyz"  # no hexadecimal digit: "%" + a token is never an escape


def _token() -> str:
    return "".join(secrets.choice(_LETTERS) for _ in range(10))


@dataclass(frozen=True)
class Password:
    """A password made of random tokens joined by characters that break URLs or lists of
    URLs: any piece of it that reaches an output is found."""

    tokens: tuple[str, ...]
    joints: str

    @classmethod
    def new(cls, joints: str = ",#@:%/") -> Password:
        return cls(tuple(_token() for _ in range(len(joints) + 1)), joints)

    @property
    def plain(self) -> str:
        return self.tokens[0] + "".join(
            j + t for j, t in zip(self.joints, self.tokens[1:], strict=True)
        )

    def written(self, *, encoded: bool) -> str:
        return urllib.parse.quote(self.plain, safe="") if encoded else self.plain

    def leaks(self, text: str) -> list[str]:
        pieces = [*self.tokens, self.plain, urllib.parse.quote(self.plain, safe="")]
        return [p for p in pieces if p in text]


def secret_urls(variant: str) -> tuple[str, str, list[Password]]:
    """DATABASE_URL naming two hosts and AMQP_URL naming two nodes, all unreachable
    (closed ports on 127.0.0.1), each with its own password: holding , # @ : % / raw
    (``plain``) or percent-encoded (``encoded``), or (``valid-raw``) only characters a URL
    allows raw in a password (a comma, not in AMQP_URL: it separates the nodes)."""
    encoded = variant == "encoded"
    if variant == "valid-raw":
        db, mq1, mq2 = Password.new(",:;=!"), Password.new(":;=!*"), Password.new("$'()+")
    else:
        db, mq1, mq2 = Password.new(), Password.new(), Password.new()
    database_url = (
        f"postgresql://w:{db.written(encoded=encoded)}@127.0.0.1:1,127.0.0.1:2/prompter"
        "?application_name=x"
    )
    amqp_url = (
        f"amqp://w:{mq1.written(encoded=encoded)}@127.0.0.1:1/,"
        f"amqps://w:{mq2.written(encoded=encoded)}@127.0.0.1:2/?heartbeat=5"
    )
    return database_url, amqp_url, [db, mq1, mq2]


def _run_until_it_logs(env: dict[str, str]) -> str:
    """`run`: it retries unreachable servers forever; SIGTERM once it logged two lines (or
    exited by itself), and everything it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if len(seen) >= 2:
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return out + "".join(seen) + err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["plain", "encoded", "valid-raw"])
def test_no_piece_of_a_password_reaches_any_output(tmp_path: Path, variant: str) -> None:
    """Issue 13, case 4. Passwords holding , # @ : % / (plain, as users paste them, and
    percent-encoded), in a two-host DATABASE_URL and a two-node AMQP_URL, with every server
    unreachable: no command prints any piece of them, on stdout or stderr, in text or JSON
    logs, in its errors or its status (text and JSON). (Raw, they are refused at start,
    the message saying to percent-encode them; encoded, or raw but valid, the commands try
    the servers and fail on them.)"""
    database_url, amqp_url, passwords = secret_urls(variant)
    events = tmp_path / "events.jsonl"
    tenant = make_tenant_ids()
    events.write_bytes(orjson.dumps(event_doc(tenant)) + b"\n")
    commands = [
        ["status"],
        ["status", "--json"],
        ["migrate"],
        ["templates", "list"],
        ["publish", str(events)],
        ["replay", str(events)],
        ["replay", "--direct", str(events), "--rejects", str(tmp_path / "rejects")],
        ["dead-letters", "list"],
    ]
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": database_url,
        "AMQP_URL": amqp_url,
        "PROMPTER_RETRY_MAX_SECONDS": "0.5",
    }
    outputs: list[tuple[str, str]] = []
    for fmt in ("json", "text"):  # every command logs JSON; the text format is checked too
        env = {**base, "PROMPTER_LOG_FORMAT": fmt, "PROMPTER_LOG_LEVEL": "debug"}
        for args in commands if fmt == "json" else commands[-2:]:
            out = run_cli(*args, env=env)
            assert out.returncode != 0, (args, out.stdout, out.stderr)
            outputs.append((f"{fmt}: {' '.join(args)}", out.stdout + out.stderr))
        outputs.append((f"{fmt}: run", _run_until_it_logs(env)))
    for name, text in outputs:
        # At --log-level debug a failed migration shows its traceback (by design, issue 18;
        # without debug it is one line: tests/test_migrations.py): it must not leak either.
        assert "Traceback" not in text or "migrate" in name, (name, text)
        for password in passwords:
            assert not password.leaks(text), (name, password.leaks(text), text)
    said = "\n".join(text for _, text in outputs)
    assert "127.0.0.1:1" in said  # the errors still name the servers
    if variant == "plain":
        assert "must be percent-encoded" in said


# No whitespace: in free text (a log line) whitespace ends a URL, and settings refuse a raw
# space in a URL's user-info; mask_url, which reads a whole setting, masks it (below).
_PASSWORDS = st.text(alphabet=st.sampled_from(list(",#@:%/?;=ab%2C[]")), min_size=1).map(
    lambda p: "k" + p + "k"  # a password that a masked output can never hold by chance
)


@settings(max_examples=300, deadline=None)
@example(passwords=["k,amqp://k"])  # a cluster list's separator inside a password
@given(passwords=st.lists(_PASSWORDS, min_size=1, max_size=3))
def test_an_accepted_amqp_url_hides_its_passwords_node_by_node(passwords: list[str]) -> None:
    """AMQP_URL is either refused at start or every node of it, as the broker connects to
    them and names them in errors one by one, hides its whole password: a password holding
    `,amqp://` must not split into a node of its own that prints the password's start."""
    url = ",".join(f"amqp://user:{p}@host{i}/" for i, p in enumerate(passwords))
    try:
        checked = check_amqp_url(url)
    except ValueError as exc:
        refused = str(exc)
    else:
        refused = ""
        for node in split_urls(checked):
            assert "k" not in mask_url(node), node
    assert "k" not in refused


@settings(max_examples=300, deadline=None)
@example(passwords=["k://k"], scheme="amqp", tail="/")  # a scheme inside a password (CI, 12-01)
@example(passwords=["k,ab://k", "k:b//k"], scheme="amqps", tail=":5672/vhost")
@given(
    passwords=st.lists(_PASSWORDS, min_size=1, max_size=3),
    scheme=st.sampled_from(["amqp", "amqps", "postgresql"]),
    tail=st.sampled_from(["/", "/db?sslmode=require", ":5672/vhost", ",h2:5433/db", ""]),
)
def test_mask_url_and_log_redaction_agree_and_hide_every_password(
    passwords: list[str], scheme: str, tail: str
) -> None:
    """The one masking rule: the user-info of each URL of a list, up to its last @, is
    masked, whatever the password holds; status and errors (mask_url), log lines and the
    settings' repr give the same text, with the hosts still shown."""
    url = ",".join(f"{scheme}://user:{p}@host{i}{tail}" for i, p in enumerate(passwords))
    masked = mask_url(url)
    logged = logs.redact(f"cannot reach {url}")
    for password in passwords:
        assert password not in masked
        assert password not in logged
    assert logged == f"cannot reach {masked}"
    for i in range(len(passwords)):
        assert f"user:***@host{i}" in masked
    settings = Settings(database_url=url, amqp_url=url)  # repr masks even unchecked values
    assert masked in repr(settings)
    for password in passwords:
        assert password not in repr(settings)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "postgresql://u:p,w@h1:5432,h2:5432/db",
            "postgresql://u:***@h1:5432,h2:5432/db",
        ),
        ("amqp://u:a@b@h/,amqps://v:c#d@h2/", "amqp://u:***@h/,amqps://v:***@h2/"),
        (
            "postgresql://h/db?password=a,b#c&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("amqp://guest@h/", "amqp://guest@h/"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p ss@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_mask_url_examples(text: str, masked: str) -> None:
    """Cluster lists, libpq host lists, raw @ # , and spaces in passwords, password=
    pairs; a user without a password is shown as it is."""
    assert mask_url(text) == masked
    if " " not in text:
        assert logs.redact(text) == masked


def test_log_lines_are_masked_in_both_formats() -> None:
    """A driver's error quoting a URL whose password holds , # @ is masked in JSON and in
    text log lines (message, fields and traceback)."""
    pieces = ("qqvv", "zzkk", "xxmm", "yynn")
    secret = "{},{}#{}@{}".format(*pieces)
    record = logging.makeLogRecord(
        {
            "msg": "lost amqp://u:%s@mq:5672/ and 'postgresql://u:%s@db/x'",
            "args": (secret, secret),
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "url": f"amqp://u:{secret}@mq/",
        }
    )
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        line = formatter.format(record)
        assert not [p for p in pieces if p in line], line
        assert "***" in line


# --- the dependency audit --------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_dependency_audit_never_passes_silently(tmp_path: Path) -> None:
    """scripts/audit (make audit) on a pin with published advisories, jinja2 2.10: where an
    advisory source answers, the audit fails naming the package; where none answers (OSV
    unreachable, PyPI's per-release API refused, as on the development machines), it exits
    3 saying NOT AUDITED. It never exits 0 on that pin."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("jinja2==2.10\n")
    out = subprocess.run(
        [sys.executable, "scripts/audit", str(requirements)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode in (1, 3), text
    if out.returncode == 3:
        assert "NOT AUDITED" in out.stderr
        assert f"{requirements} was NOT checked" in out.stderr
    else:
        assert "jinja2" in text.lower()
        assert "PYSEC-" in text or "GHSA-" in text or "CVE-" in text


def test_ci_runs_the_audit_and_stops_on_a_finding() -> None:
    """.ci/run runs scripts/audit on constraints.txt before the tests, goes on only when it
    passed or could not reach any source (exit 3), and still ends with `make test`."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python scripts/audit constraints.txt || audit=$?" in ci
    assert 'elif [ "$audit" -ne 0 ]; then\n  exit "$audit"' in ci
    assert ci.index("scripts/audit") < ci.index("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python scripts/audit constraints.txt" in makefile
