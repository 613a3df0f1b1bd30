"""Private PostgreSQL and RabbitMQ servers for the fault suite, on 127.0.0.1 only.

Fault scenarios stop, restart and cut the connections of their servers; other people run
tests against the machine's shared servers at the same time. So the suite starts its own
cluster and its own node in a temporary directory, on free ports, and every disruptive
command targets only them:

- :class:`PrivatePostgres`: ``initdb`` as the ``postgres`` OS user, ``pg_ctl`` on a free port,
  the socket in the temporary directory, TLS on (a certificate from :class:`Certificates`),
  ``client_connection_check_interval`` so a backend notices a client killed mid-statement.
- :class:`PrivateRabbit`: ``rabbitmq-server -detached`` under its own node name, ports,
  data, logs, cookie (its own ``HOME``), no plugins, a TLS listener beside the plain one.

Both are stopped and their directory removed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

PG_BIN = Path(os.environ.get("PROMPTER_FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
RABBIT_BIN = Path(os.environ.get("PROMPTER_FAULTS_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))


class ServerError(RuntimeError):
    """A private server could not be started or commanded."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    try:
        out = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"{' '.join(args[:3])}: {exc}") from exc
    if out.returncode != 0:
        raise ServerError(
            f"{' '.join(args[:4])} exited {out.returncode}: {(out.stderr or out.stdout)[-2000:]}"
        )
    return out.stdout


@dataclass(frozen=True)
class Certificates:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost (openssl)."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing here: verification against it must fail

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        directory.mkdir(parents=True, exist_ok=True)
        d = str(directory)

        def openssl(*args: str) -> None:
            run(["openssl", *args])

        for name in ("ca", "other-ca"):
            openssl(
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.pem",
                "-subj", f"/CN=prompter-faults {name}",
            )  # fmt: skip
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/server.key",
            "-out", f"{d}/server.csr", "-subj", "/CN=localhost",
        )  # fmt: skip
        (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl(
            "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem",
            "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-days", "2",
            "-out", f"{d}/server.pem", "-extfile", f"{d}/san.ext",
        )  # fmt: skip
        return cls(
            ca=directory / "ca.pem",
            cert=directory / "server.pem",
            key=directory / "server.key",
            other_ca=directory / "other-ca.pem",
        )


@dataclass
class PrivatePostgres:
    base: Path
    port: int
    certs: Certificates
    data: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.base / "data"

    # -- lifecycle -----------------------------------------------------------------------

    def _as_postgres(self, *args: str, timeout: float = 120) -> str:
        return run(["runuser", "-u", "postgres", "--", *args], timeout=timeout)

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise ServerError(f"no initdb in {PG_BIN}")
        self.base.mkdir(parents=True)
        shutil.chown(self.base, "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )
        for name in ("cert", "key"):
            target = self.data / f"server.{'crt' if name == 'cert' else 'key'}"
            shutil.copy(getattr(self.certs, name), target)
            shutil.chown(target, "postgres")
            target.chmod(0o600)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"""
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.base}'
max_connections = 100
shared_buffers = 128MB
# Durability against an OS crash is not under test (fast restarts flush everything),
# and the disk is shared with other people's tests.
fsync = off
full_page_writes = off
# A backend whose client was SIGKILLed mid-statement notices it and rolls back.
client_connection_check_interval = 100ms
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
log_min_messages = warning
"""
            )
        self.pg_ctl("start")

    def pg_ctl(self, action: str, *extra: str) -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "postgres.log"),
            "-w",
            "-t",
            "60",
            *extra,
            action,
        )

    def restart_fast(self) -> None:
        """``pg_ctl restart -m fast``: every session is terminated, the server comes back."""
        self.pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(ServerError):
            self.pg_ctl("stop", "-m", "immediate")
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():  # pg_ctl failed: stop our own postmaster by its pid
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)

    # -- connections -----------------------------------------------------------------------

    def url(self, database: str = "postgres", *, user: str = "postgres", password: str = "") -> str:
        auth = urllib.parse.quote(user) + (
            ":" + urllib.parse.quote(password, safe="") if password else ""
        )
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    async def execute(self, sql: str, database: str = "postgres") -> None:
        conn = await asyncpg.connect(self.url(database))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def terminate(self, database: str, application_name: str) -> int:
        """pg_terminate_backend on the sessions of ``application_name`` in ``database``."""
        conn = await asyncpg.connect(self.url(database))
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()",
                database,
                application_name,
            )
        finally:
            await conn.close()
        return int(killed)


@dataclass
class PrivateRabbit:
    base: Path
    port: int
    tls_port: int
    dist_port: int
    certs: Certificates
    node: str = field(init=False)

    def __post_init__(self) -> None:
        self.node = f"prompter-faults-{os.getpid()}@localhost"

    @property
    def env(self) -> dict[str, str]:
        b = self.base
        keep = ("PATH", "LANG", "LC_ALL")
        return {
            **{k: os.environ[k] for k in keep if k in os.environ},
            "HOME": str(b),  # its own Erlang cookie: the shared node's CLI never reaches it
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            raise ServerError(f"no rabbitmq-server in {RABBIT_BIN}")
        b = self.base
        b.mkdir(parents=True)
        cookie = b / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex())
        cookie.chmod(0o400)
        (b / "enabled_plugins").write_text("[].\n")
        (b / "rabbitmq-env.conf").write_text("")
        c = self.certs
        (b / "rabbitmq.conf").write_text(
            f"""listeners.tcp.local = 127.0.0.1:{self.port}
listeners.ssl.local = 127.0.0.1:{self.tls_port}
ssl_options.cacertfile = {c.ca}
ssl_options.certfile = {c.cert}
ssl_options.keyfile = {c.key}
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
log.file.level = warning
"""
        )
        run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env)
        self.ctl("wait", str(b / "rabbit.pid"), "--timeout", "120", timeout=150)

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "-q", *args],
            env=self.env,
            timeout=timeout,
        )

    def stop(self) -> None:
        with contextlib.suppress(ServerError):
            self.ctl("stop", timeout=60)
        pid_file = self.base / "rabbit.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
            os.kill(pid, signal.SIGKILL)  # still there: our own node, by its pid

    def restart_app(self) -> None:
        """``rabbitmqctl stop_app`` then ``start_app``: every connection drops, queues stay."""
        self.ctl("stop_app")
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60")

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "fault suite: closing every connection")

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def queues(self) -> dict[str, tuple[int, int, int]]:
        """Every queue: (ready, unacked, consumers)."""
        out: dict[str, tuple[int, int, int]] = {}
        text = self.ctl(
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "--no-table-headers",
        )
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[1].isdigit():
                out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        return out


def wait_port(port: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise ServerError(f"nothing answers on 127.0.0.1:{port}")
