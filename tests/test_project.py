"""The project's front door: the command, the compose stack, the image, the README, CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.config import Settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = [
    "migrate",
    "run",
    "status",
    "templates",
    "publish",
    "replay",
    "dead-letters",
    "demo",
    "trace",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_console_script_lists_subcommands() -> None:
    """`prompter-worker --help` lists every subcommand; `python -m worker` is the same."""
    script = Path(sys.executable).parent / "prompter-worker"
    for argv in ([str(script), "--help"], [sys.executable, "-m", "worker", "--help"]):
        out = run(*argv)
        assert out.returncode == 0, out.stderr
        for name in SUBCOMMANDS:
            assert re.search(rf"^\s+{name}\s", out.stdout, re.M), (name, out.stdout)


def test_invalid_setting_is_a_clear_error() -> None:
    """A bad environment value stops the command with the variable, the flag and the reason."""
    out = subprocess.run(
        [sys.executable, "-m", "worker", "migrate", "--sql"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PROMPTER_BATCH_SIZE": "lots"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "PROMPTER_BATCH_SIZE (--batch-size): 'lots' is not a valid integer" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("variable", "raw", "says"),
    [
        ("PROMPTER_BATCH_SIZE", "0", "PROMPTER_BATCH_SIZE (--batch-size): 0 is not in the range"),
        (
            "PROMPTER_RETRY_MAX_SECONDS",
            "soon",
            "(--retry-max-seconds): 'soon' is not a valid float",
        ),
        (
            "PROMPTER_DECLARE",
            "maybe",
            "PROMPTER_DECLARE (--declare): 'maybe' is not a valid boolean",
        ),
        (
            "PROMPTER_LOG_FORMAT",
            "xml",
            "(--log-format): 'xml' is not one of 'auto', 'json', 'text'",
        ),
    ],
)
def test_each_kind_of_setting_says_what_is_wrong(variable: str, raw: str, says: str) -> None:
    """Settings are read with click's own types (the flags'): every problem is listed,
    each naming its variable, its flag and the reason."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: raw, "PROMPTER_PREFETCH": "-1"})
    assert says in str(caught.value)
    assert "PROMPTER_PREFETCH (--prefetch): -1 is not in the range" in str(caught.value)


@pytest.mark.parametrize("raw", ["nan", "NaN", "-nan"])
def test_a_number_that_is_not_a_number_is_refused(raw: str) -> None:
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    with pytest.raises(
        ConfigError, match=r"RETRY_MAX_SECONDS \(--retry-max-seconds\): .*not a number"
    ):
        Settings.from_env({"PROMPTER_RETRY_MAX_SECONDS": raw})


@pytest.mark.parametrize(("raw", "value"), [("on", True), (" TRUE ", True), ("0", False)])
def test_booleans_read_as_the_flags_read_them(raw: str, value: bool) -> None:
    assert Settings.from_env({"PROMPTER_DECLARE": raw}).declare is value


def compose() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_servers_have_healthchecks_and_volumes() -> None:
    """postgres (16+) and rabbitmq (management) with healthchecks and named volumes."""
    data = compose()
    services = data["services"]
    assert isinstance(services, dict)
    pg, mq = services["postgres"], services["rabbitmq"]
    major = int(re.match(r"postgres:(\d+)", pg["image"]).group(1))  # type: ignore[union-attr]
    assert major >= 16
    assert "management" in mq["image"]
    for svc in (pg, mq):
        assert svc["healthcheck"]["test"]
        volume = svc["volumes"][0].split(":")[0]
        assert volume in data["volumes"]  # type: ignore[operator]


def test_compose_migrate_runs_once_after_postgres_is_healthy() -> None:
    """A one-shot migrate service runs `alembic upgrade head` (via the CLI) after postgres."""
    services = compose()["services"]
    assert isinstance(services, dict)
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert "DATABASE_URL" in migrate["environment"]


def test_dockerfile_is_slim_non_root_with_a_dependency_layer() -> None:
    """Slim base, dependencies installed before the source is copied, non-root user."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    assert re.match(r"FROM python:3\.1[1-9]-slim", lines[0])
    deps = next(i for i, line in enumerate(lines) if "requirements.lock" in line and "RUN" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY worker"))
    assert deps < source
    user = [line for line in lines if line.startswith("USER ")]
    assert user
    assert user[-1] not in ("USER root", "USER 0")
    assert (ROOT / ".dockerignore").is_file()


def test_readme_documents_every_setting() -> None:
    """Each setting's variable, flag and default appears in the README's table."""
    readme = (ROOT / "README.md").read_text()
    for f in Settings.fields():
        env, flag = f.metadata["env"], "--" + f.name.replace("_", "-")
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{env}` ")), None)
        assert row is not None, env
        assert f"`{flag}`" in row, env
        default = f.default
        shown = (
            str(default).lower()
            if isinstance(default, bool)
            else f"{default:g}"
            if isinstance(default, float)
            else str(default)
        )
        assert f"`{shown}`" in row, (env, shown)


def test_readme_test_command_is_what_ci_runs() -> None:
    """CI runs exactly the README's test command."""
    readme = (ROOT / "README.md").read_text()
    assert "```sh\nmake test\n```" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"


@pytest.mark.parametrize("path", ["requirements.lock", "constraints.txt"])
def test_dependencies_are_pinned(path: str) -> None:
    """Every line of the lock files is an exact pin."""
    lines = [
        line for line in (ROOT / path).read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s]+", line) for line in lines), lines


def test_compose_worker_runs_after_migrate_and_scales() -> None:
    """The worker starts after the migration and the broker, exposes its probes without a
    fixed host port (so `--scale worker=N` works), and stops more slowly than it drains."""
    services = compose()["services"]
    assert isinstance(services, dict)
    worker = services["worker"]
    assert worker["command"] == ["run"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace > 30
    for key in ("DATABASE_URL", "AMQP_URL", "PROMPTER_METRICS_PORT"):
        assert key in worker["environment"]


def test_compose_demo_sends_events_once_the_worker_is_ready() -> None:
    """`docker compose up` ends with a one-shot demo publishing sample events, after the
    worker is healthy, so the main command shows data flowing end to end."""
    services = compose()["services"]
    assert isinstance(services, dict)
    demo = services["demo"]
    assert demo["command"][0] == "demo"
    assert demo["depends_on"]["worker"]["condition"] == "service_healthy"
    assert demo["restart"] == "no"


def test_make_run_migrates_sends_demo_events_and_runs_the_worker() -> None:
    """The local main command: create and migrate the database, queue demo events, run."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    steps = [line.strip() for line in recipe.splitlines()[1:]]
    assert steps == [
        "$(BIN)/prompter-worker migrate --create-database",
        "$(BIN)/prompter-worker demo --events 300",
        "$(BIN)/prompter-worker run",
    ]
