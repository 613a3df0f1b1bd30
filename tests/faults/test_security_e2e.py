"""Security end to end, on the fault suite's private servers (they get users, TLS listeners
and refusals the shared servers must not): the least-privilege broker user with
``--no-declare``, secrets from ``*_FILE`` that never reach any output, and TLS to both
servers with verification (and its refusal of a certificate from another CA)."""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from tests.faults.conftest import ScenarioFactory, Servers
from tests.faults.harness import Message, Scenario, declare, grep, wait_for
from tests.helpers import run_cli

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

EVENTS = 3000


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


def _broker_user(s: Scenario) -> tuple[str, str]:
    """A broker user with exactly the rights docs/security.md lists for the worker: read
    on its two queues, write on the dead-letter exchange, configure nothing."""
    user, password = f"prompter-worker-{secrets.token_hex(4)}", secrets.token_hex(16)
    n = s.names
    s.mq.ctl("add_user", user, password)
    s.mq.ctl(
        "set_permissions",
        "-p",
        "/",
        user,
        "^$",
        f"^{_re(n['dead_letter_exchange'])}$",
        f"^({_re(n['queue'])}|{_re(n['replay_queue'])})$",
    )
    return user, password


def _re(name: str) -> str:
    return name.replace(".", r"\.")


#: Later than the whole stream, not in the future (the decoder refuses the far future).
LATE = datetime(2026, 6, 1, tzinfo=UTC)


def _second_wave(first: list[Message], spare: list[Message]) -> list[Message]:
    """Five stored events again, five with other content (each under a message id of its
    own, to be dead-lettered as conflicting_duplicate), new events, and two whose number
    PostgreSQL's numeric cannot hold (1e-20000: valid JSON the decoder takes), shuffled."""
    originals = [m for m in first if m.good][:5]
    conflicting = []
    for i, m in enumerate(originals):
        doc = orjson.loads(m.body)
        doc.update(occurred_at=LATE.isoformat(), provider="zzz", model_id="zzz")
        conflicting.append(Message(f"conflict-{i}-{m.id}", orjson.dumps(doc), False))
    unstorable = []
    for i, m in enumerate(spare[-2:]):
        doc = {**orjson.loads(m.body), "event_id": str(uuid.uuid4()), "request": {"x": "N"}}
        body = orjson.dumps(doc).replace(b'"x":"N"', b'"x":1e-20000')
        unstorable.append(Message(f"unstorable-{i}-{uuid.uuid4().hex[:8]}", body, False))
    wave = [*originals, *conflicting, *spare[:-2], *unstorable]
    random.Random(5).shuffle(wave)
    return wave


async def test_least_privilege_broker_user_and_secrets_from_files(
    scenario: ScenarioFactory, tmp_path: Path
) -> None:
    """A worker with no-declare, a broker user that may only read its queues and write to
    the dead-letter exchange, and the runtime database role (column rights), both URLs
    read from *_FILE: it stores the events and dead-letters the poison, through every path
    of the store (COPY; a later wave with exact and conflicting repeats, looked up and
    compared; bisection with ON CONFLICT for events PostgreSQL refuses); no conflicting
    copy moves a version row. Declaring is refused to that user
    (exit 2). No password appears in its logs, /metrics, /readyz, `status`, or the errors
    of a wrong port or password."""
    s = await scenario("least-privilege")
    spare = [m for m in s.messages[EVENTS:] if m.good][:20]
    del s.messages[EVENTS:]
    second = _second_wave(s.messages, spare)
    await declare(s)  # the administrator owns the topology
    user, password = await asyncio.to_thread(_broker_user, s)
    amqp = f"amqp://{user}:{password}@127.0.0.1:{s.mq.port}/"
    (tmp_path / "amqp").write_text(amqp)
    (tmp_path / "db").write_text(s.worker_database_url)
    env = s.env(declare=False)
    del env["AMQP_URL"], env["DATABASE_URL"]
    env.update(AMQP_URL_FILE=str(tmp_path / "amqp"), DATABASE_URL_FILE=str(tmp_path / "db"))

    w = s.worker()
    w.env = {**env, "PROMPTER_METRICS_PORT": str(w.port)}
    await w.start()
    await w.ready()
    publisher = s.publisher()
    await publisher.publish(s.messages)
    await s.wait_rows(sum(m.good for m in s.messages))
    # Every path of the store under the runtime role's column rights: the stream above was
    # COPYed; this wave repeats stored events (exactly, and with other content) beside new
    # ones and events PostgreSQL refuses, so the batch fails its COPY, looks its ids up,
    # compares the repeats with their rows, and is bisected under savepoints with
    # INSERT ... ON CONFLICT.
    await publisher.publish(second)
    s.messages.extend(m for m in second if m not in s.messages)
    await s.account(publisher, consumers=1)
    outputs = {
        "metrics": await asyncio.to_thread(w._get, "/metrics") or "",
        "readyz": await asyncio.to_thread(w._get, "/readyz") or "",
    }
    assert "prompter_events_stored_total" in outputs["metrics"]
    assert (
        'prompter_events_rejected_total{reason="conflicting_duplicate"} 5.0' in (outputs["metrics"])
    )
    assert "prompter_events_duplicate_total 5.0" in outputs["metrics"]
    conn = await s.connect()
    try:
        moved = await conn.fetchval(
            "SELECT count(*) FROM prompt_versions WHERE provider = 'zzz' OR last_seen_at >= $1",
            LATE,
        )
    finally:
        await conn.close()
    assert moved == 0, "a conflicting copy moved a version row"
    for args in (["status"], ["status", "--json"]):
        out = await asyncio.to_thread(_cli, env, *args)
        assert out.returncode == 0, out.stderr
        outputs[" ".join(args)] = out.stdout + out.stderr
    await s.stop_workers()

    (tmp_path / "wrong-port").write_text(amqp.replace(f":{s.mq.port}/", ":1/"))
    (tmp_path / "wrong-password").write_text(amqp.replace(password, password[::-1]))
    for name in ("wrong-port", "wrong-password"):
        out = await asyncio.to_thread(
            _cli, {**env, "AMQP_URL_FILE": str(tmp_path / name)}, "status"
        )
        assert out.returncode == 1, out.stdout
        outputs[name] = out.stdout + out.stderr
        assert password[::-1] not in outputs[name]
    assert "ACCESS_REFUSED" in outputs["wrong-password"] or "403" in outputs["wrong-password"]

    declaring = s.worker()
    declaring.env = {**w.env, "PROMPTER_DECLARE": "true", "PROMPTER_METRICS_PORT": "0"}
    await declaring.start()
    assert await declaring.wait(60) == 2
    assert grep(declaring.log, "refused access")

    logs = "\n".join(x.log.read_text() for x in s.workers)
    for name, text in {**outputs, "logs": logs}.items():
        assert password not in text, name
        assert s.role[1] not in text, name


async def test_tls_to_both_servers_is_verified(scenario: ScenarioFactory, servers: Servers) -> None:
    """sslmode=verify-full with sslrootcert, and amqps:// with cafile, pass through from
    the configuration: every connection of the worker is encrypted. With a certificate
    authority that did not sign the servers' certificates, the worker refuses to connect
    to either (it stays unready and says why)."""
    s = await scenario("tls")
    del s.messages[EVENTS:]
    await declare(s)
    certs = servers.certs
    role, password = s.role

    def urls(ca: Path) -> dict[str, str]:
        return {
            "database_url": (
                f"postgresql://{role}:{password}@127.0.0.1:{s.pg.port}/{s.database}"
                f"?sslmode=verify-full&sslrootcert={ca}"
            ),
            "amqp_url": f"amqps://guest:guest@localhost:{s.mq.tls_port}/?cafile={ca}",
        }

    w = await s.worker(**urls(certs.ca)).start()
    await w.ready()
    publisher = s.publisher()
    await publisher.publish(s.messages)
    await s.account(publisher, consumers=1)
    conn = await s.connect()
    try:
        ssl = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.datname = $1 AND a.application_name = 'prompter-worker'",
            s.database,
        )
    finally:
        await conn.close()
    assert ssl
    assert all(r["ssl"] for r in ssl)
    connections = await asyncio.to_thread(s.mq.ctl, "list_connections", "port", "ssl")
    worker_connections = [line for line in connections.splitlines() if str(s.mq.tls_port) in line]
    assert len(worker_connections) >= 2  # the consumer's and the publisher's
    assert all(line.split("\t")[1] == "true" for line in worker_connections)
    await s.stop_workers()

    wrong = urls(certs.other_ca)
    for broken in (
        {"database_url": wrong["database_url"]},
        {"amqp_url": wrong["amqp_url"]},
    ):
        refused = await s.worker(**{**urls(certs.ca), **broken}).start()
        await wait_for(
            lambda r=refused: _logged(r.log, "CERTIFICATE_VERIFY_FAILED|certificate verify failed"),
            within=30,
            message="the worker to refuse the certificate",
        )
        assert await asyncio.to_thread(refused._get, "/readyz") is None
        await refused.kill()


async def _logged(path: Path, pattern: str) -> bool:
    return bool(grep(path, pattern))
