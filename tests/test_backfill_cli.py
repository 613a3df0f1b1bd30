"""`publish`, `replay`, `dead-letters` and `demo` as a user runs them: real processes,
exit codes, messages, signals, against the real servers."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.factories import Tenant, encode, event_doc, make_tenant
from tests.helpers import count, drain, queue_depth, running, wait_until
from worker import cli, publisher
from worker.backfill import replay
from worker.backfill.checkpoint import Checkpoint
from worker.commands import backfill_cli, demo, options
from worker.config import Settings
from worker.ingest.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The settings as the environment variables a user would set."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROMPTER_LOG_FORMAT": "text"}
    for f in Settings.fields():
        if f.name in ("database_url", "amqp_url", "exchange", "queue", "replay_queue") or (
            f.name.startswith("dead_letter")
        ):
            env[f.metadata["env"]] = str(getattr(settings, f.name))
    env.update(extra)
    return env


async def start(settings: Settings, *args: str, **extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        cwd=ROOT,
        env=environment(settings, **extra),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def cli_run(settings: Settings, *args: str, stdin: bytes = b"", **extra: str) -> Result:
    """Run ``prompter-worker ARGS`` to completion (without blocking the event loop, so a
    worker in this process keeps consuming)."""
    process = await start(settings, *args, **extra)
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=90)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def unknown_tenant() -> Tenant:
    return Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))


def test_cli_defaults_agree_with_their_modules() -> None:
    """The defaults the command modules repeat (to keep --help fast) are the modules' own."""
    assert options.DEFAULT_WINDOW == publisher.DEFAULT_WINDOW
    assert backfill_cli.DEFAULT_BATCH_SIZE == replay.DEFAULT_BATCH_SIZE
    assert backfill_cli.DEFAULT_CONCURRENCY == replay.DEFAULT_CONCURRENCY
    assert backfill_cli.DEFAULT_REJECTS_PATH == replay.DEFAULT_REJECTS_PATH
    assert cli.DEFAULT_DEMO_EVENTS == demo.DEFAULT_EVENTS
    assert (cli.DEMO_ORG_ID, cli.DEMO_WORKSPACE_ID) == (demo.DEMO_ORG_ID, demo.DEMO_WORKSPACE_ID)


async def test_publish_from_stdin_reports_invalid_lines_and_exits_1(settings: Settings) -> None:
    """gzip JSONL on stdin: the valid events are published on the live routing key, each
    invalid line is reported with its number and reason, and the exit code is 1."""
    tenant = unknown_tenant()
    good = [encode(event_doc(tenant)) for _ in range(5)]
    lines = [good[0], good[1], b"{oops", good[2], b"", b"42", good[3], good[4]]
    data = gzip.compress(b"\n".join(lines))
    result = await cli_run(settings, "publish", "-", stdin=data)
    assert result.code == 1, result
    assert "-:3: invalid_json" in result.out
    assert "-:6: not_an_object" in result.out
    assert "published 5 events (confirmed by the broker), 2 invalid lines not sent" in result.out
    assert "Traceback" not in result.err
    assert sorted(m.body for m in await drain(settings.queue)) == sorted(good)


async def test_publish_of_a_valid_file_exits_0_and_prints_json(
    settings: Settings, tmp_path: Path
) -> None:
    """All lines valid and confirmed: exit 0; --json gives the counts."""
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\n".join(encode(event_doc(unknown_tenant())) for _ in range(25)))
    result = await cli_run(settings, "publish", str(path), "--json")
    assert result.code == 0, result
    summary = orjson.loads(result.out)
    assert (summary["confirmed"], summary["invalid"], summary["error"]) == (25, [], None)
    assert "%|" not in result.err  # stderr is not a terminal: no progress bar
    assert await queue_depth(settings.queue) == 25


async def test_publish_with_the_broker_down_is_a_clean_error(
    settings: Settings, tmp_path: Path
) -> None:
    """No broker: exit 1, a one-line reason naming the node (password masked), nothing
    reported as published, no traceback."""
    path = tmp_path / "ok.jsonl"
    path.write_bytes(encode(event_doc(unknown_tenant())))
    result = await cli_run(
        settings, "publish", str(path), AMQP_URL="amqp://guest:topsecret@127.0.0.1:1/"
    )
    assert result.code == 1
    assert "published 0 events" in result.out
    assert "Error: cannot reach RabbitMQ: amqp://guest:***@127.0.0.1:1/" in result.err
    assert "topsecret" not in result.out + result.err
    assert "Traceback" not in result.err


async def test_publish_to_a_missing_exchange_is_a_clean_error(
    settings: Settings, tmp_path: Path
) -> None:
    """Told not to declare, with no such exchange: exit 1, saying the topology is missing."""
    path = tmp_path / "ok.jsonl"
    path.write_bytes(encode(event_doc(unknown_tenant())))
    result = await cli_run(
        settings,
        "publish",
        str(path),
        "--no-declare",
        "--exchange",
        f"test.missing.{uuid.uuid4().hex[:8]}",
    )
    assert result.code == 1
    assert "topology is missing" in result.err
    assert "published 0 events" in result.out
    assert "Traceback" not in result.err


async def test_bad_input_is_a_clean_error_before_anything_is_sent(
    settings: Settings, tmp_path: Path
) -> None:
    """A missing file, or stdin with a checkpoint: exit 1 with the reason, no traceback."""
    missing = await cli_run(settings, "replay", str(tmp_path / "nope.jsonl.gz"))
    assert missing.code == 1
    assert "nope.jsonl.gz: cannot read: No such file or directory" in missing.err
    stdin = await cli_run(settings, "replay", "-", "--checkpoint", str(tmp_path / "cp"))
    assert stdin.code == 1
    assert "stdin (-) cannot be resumed" in stdin.err
    for result in (missing, stdin):
        assert "Traceback" not in result.err


async def test_replay_interrupted_by_sigint_resumes_where_it_stopped(
    settings: Settings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Ctrl-C during `replay --checkpoint`: exit 130 after saving; the same command again
    resumes after the confirmed lines and exits 0; the worker stores every event once."""
    tenant = await make_tenant(conn)
    n = 1500
    path = tmp_path / "history.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(encode(event_doc(tenant)) for _ in range(n))))
    checkpoint = tmp_path / "replay.checkpoint"
    args = ("replay", str(path), "--checkpoint", str(checkpoint))

    process = await start(settings, *args, "--rate", "500")
    await wait_until(lambda: _checkpointed(checkpoint), message="a first checkpoint")
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 130, (out, err)
    assert "interrupted" in out.decode()
    assert "run the same command again to continue" in out.decode()
    line = Checkpoint.load(str(checkpoint)).entries[str(path)]["line"]
    assert 0 < line < n

    again = await cli_run(settings, *args)
    assert again.code == 0, again
    assert f"resumed after line {line:,}" in again.out
    async with running(Worker(settings)):
        await wait_until(lambda: _rows(conn, n), message="every event stored")
    assert await count(conn) == n


async def _checkpointed(path: Path) -> bool:
    entries = Checkpoint.load(str(path)).entries
    return any(e["line"] > 0 for e in entries.values())


async def _rows(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


async def test_replay_direct_stores_and_writes_rejects(
    settings: Settings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """`replay --direct`: valid events stored without the broker, refused lines in the
    rejects file, exit 1 because some were refused."""
    tenant = await make_tenant(conn)
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"\n".join([*(encode(event_doc(tenant)) for _ in range(30)), b"nope"]) + b"\n")
    rejects = tmp_path / "rejects.jsonl"
    result = await cli_run(settings, "replay", "--direct", str(path), "--rejects", str(rejects))
    assert result.code == 1, result
    assert "stored 30 events (0 stored before), 1 refused" in result.out
    assert f"1 refused line appended to {rejects}" in result.out
    assert await count(conn) == 30
    [reject] = [orjson.loads(line) for line in rejects.read_bytes().splitlines()]
    assert (reject["line"], reject["reason"]) == (31, "invalid_json")


async def test_dead_letters_commands(settings: Settings) -> None:
    """list --json shows the queue; redrive needs a selection; purge refuses without --yes
    and empties the queue with it."""
    tenant = unknown_tenant()
    doc = event_doc(tenant)
    # Let a worker dead-letter one event (its template is unknown).
    async with running(Worker(settings)):
        await cli_run(settings, "publish", "-", stdin=encode(doc))
        await wait_until(lambda: _depth(settings.dead_letter_queue, 1), message="dead letter")

    listing = await cli_run(settings, "dead-letters", "list", "--json")
    assert listing.code == 0, listing
    shown = orjson.loads(listing.out)
    assert shown["by_reason"] == {"unknown_template": 1}
    assert shown["messages"][0]["event_id"] == doc["event_id"]

    unselected = await cli_run(settings, "dead-letters", "redrive")
    assert unselected.code == 2
    assert "--reason, --event-id, --id, --limit or --all" in unselected.err

    refused = await cli_run(settings, "dead-letters", "purge")
    assert refused.code == 2
    assert "refusing to delete 1 message from" in refused.err
    assert await queue_depth(settings.dead_letter_queue) == 1
    purged = await cli_run(settings, "dead-letters", "purge", "--yes")
    assert purged.code == 0
    assert f"purged 1 message from {settings.dead_letter_queue}" in purged.out
    assert await queue_depth(settings.dead_letter_queue) == 0


async def _depth(queue: str, n: int) -> bool:
    return await queue_depth(queue) == n


async def test_demo_shows_data_flowing_end_to_end_and_can_run_again(
    settings: Settings, conn: asyncpg.Connection, database: str
) -> None:
    """`demo` registers its template and publishes realistic events the worker stores; run
    again, it reuses the template and adds new events; `status` then shows the rows."""
    owner = settings.replace(database_url=database)  # registering a template is an admin's job
    async with running(Worker(settings)):
        first = await cli_run(owner, "demo", "--events", "120")
        assert first.code == 0, first
        assert "registered" in first.out
        assert "published 120 events" in first.out
        assert "prompter-worker status" in first.out
        second = await cli_run(owner, "demo", "--events", "80")
        assert second.code == 0, second
        assert "already registered" in second.out
        await wait_until(lambda: _rows(conn, 200), message="the demo's events stored")
    assert await count(conn) == 200
    assert await count(conn, "SELECT count(*) FROM prompt_templates") == 1
    versions = await count(conn, "SELECT count(DISTINCT provider_version_key) FROM prompt_versions")
    assert versions == 2
    usage = await conn.fetchval(
        "SELECT count(*) FROM prompt_results WHERE response -> 'usage' ? 'total_tokens'"
    )
    assert usage == 200
    status = await cli_run(owner, "status")
    assert status.code == 0, status
    assert "prompt_results" in status.out


@pytest.mark.parametrize("command", ["publish", "replay", "replay --direct"])
async def test_a_line_the_writer_is_halfway_through_is_stored_once_it_is_written(
    settings: Settings, conn: asyncpg.Connection, tmp_path: Path, command: str
) -> None:
    """Issue 13, case 3. A file of 3 lines and half of line 4 (a writer is still writing
    it): the run stores lines 1-3, neither judges nor checkpoints line 4, says so, and
    exits 1. The writer finishes line 4 and adds line 5; the same command with --force
    (for an appended file) stores lines 4 and 5: no line is lost, none sent twice."""
    tenant = await make_tenant(conn)
    events = [encode(event_doc(tenant)) for _ in range(5)]
    path = tmp_path / "growing.jsonl"
    half = len(events[3]) // 2
    path.write_bytes(b"".join(e + b"\n" for e in events[:3]) + events[3][:half])
    checkpoint = tmp_path / "cp"
    args = (*command.split(), str(path), "--checkpoint", str(checkpoint))
    if command == "publish":  # publish takes one file and no checkpoint: it re-reads it whole
        args = ("publish", str(path))
    rejects = ("--rejects", str(tmp_path / "rejects"))

    first = await cli_run(settings, *args, *rejects)
    assert first.code == 1, first
    assert "invalid_json" not in first.out
    assert f"{path}:4: no line ending yet" in first.out
    assert not (tmp_path / "rejects").exists()
    if command != "publish":
        saved = Checkpoint.load(str(checkpoint)).entries[str(path)]
        assert (saved["line"], saved["complete"]) == (3, False)

    with path.open("ab") as fh:  # the writer goes on
        fh.write(events[3][half:] + b"\n" + events[4] + b"\n")
    if command == "publish":
        # publish has no checkpoint: the file is published again from its start
        second = await cli_run(settings, *args, *rejects)
    else:
        second = await cli_run(settings, *args, "--force", *rejects)
    assert second.code == 0, second
    if command == "replay --direct":
        rows = {str(r["id"]) for r in await conn.fetch("SELECT id FROM prompt_results")}
        assert rows == {orjson.loads(e)["event_id"] for e in events}
    else:
        queue = settings.queue if command == "publish" else settings.replay_queue
        bodies = [m.body for m in await drain(queue)]
        assert set(bodies) == set(events)
        if command == "replay":
            assert len(bodies) == 5  # resumed after line 3: nothing sent twice
