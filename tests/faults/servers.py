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
- :class:`RabbitCluster`: three such nodes sharing a cookie, joined with ``rabbitmqctl
  join_cluster``; nodes stopped, killed, frozen (SIGSTOP) and started again by index.
- :class:`PostgresPair`: a primary and a streaming standby (``pg_basebackup -R``),
  synchronous or not; the primary crashed, the standby promoted.

All are stopped and their directories removed by the fixtures that start them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
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

    def start_standby(self, primary: PrivatePostgres) -> None:
        """A streaming standby of ``primary``: ``pg_basebackup -R`` copies its data and
        writes ``standby.signal`` and ``primary_conninfo``; its own port and socket."""
        self.base.mkdir(parents=True)
        shutil.chown(self.base, "postgres")
        self._as_postgres(
            str(PG_BIN / "pg_basebackup"),
            "-d", f"host=127.0.0.1 port={primary.port} user=postgres application_name=standby",
            "-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {self.port}\nunix_socket_directories = '{self.base}'\n")
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
class PostgresPair:
    """A private primary and its streaming standby (:meth:`PrivatePostgres.start_standby`);
    :meth:`url` names both hosts with ``target_session_attrs=read-write``, as a deployment
    with a failover standby does, so every connection lands on whichever one is writable.

    ``synchronous`` sets ``synchronous_standby_names = '*'`` (with the default
    ``synchronous_commit = on``: a commit returns once the standby has flushed its WAL).
    """

    base: Path
    certs: Certificates
    synchronous: bool
    primary: PrivatePostgres = field(init=False)
    standby: PrivatePostgres = field(init=False)
    _receiver: int = field(init=False, default=0)  # the WAL receiver frozen, if any

    def __post_init__(self) -> None:
        self.primary = PrivatePostgres(self.base / "primary", free_port(), self.certs)
        self.standby = PrivatePostgres(self.base / "standby", free_port(), self.certs)

    def start(self) -> None:
        self.primary.start()
        self.standby.start_standby(self.primary)

    async def replicate(self) -> None:
        """Wait until the standby streams (synchronously, if asked); raise if it does not."""
        conn = await asyncpg.connect(self.primary.url())
        try:
            if self.synchronous:
                await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                await conn.execute("SELECT pg_reload_conf()")
            want = "sync" if self.synchronous else "async"
            deadline = time.monotonic() + 60
            while True:
                state = await conn.fetchrow("SELECT state, sync_state FROM pg_stat_replication")
                if state is not None and tuple(state) == ("streaming", want):
                    return
                if time.monotonic() > deadline:
                    raise ServerError(f"the standby does not stream ({want}): {state}")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.thaw_receiver()
        self.standby.stop()
        self.primary.stop()

    # -- connections -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.primary.port

    def url(self, database: str = "postgres", *, user: str = "postgres", password: str = "") -> str:
        auth = urllib.parse.quote(user) + (
            ":" + urllib.parse.quote(password, safe="") if password else ""
        )
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return (
            f"postgresql://{auth}@{hosts}/{database}"
            "?sslmode=disable&target_session_attrs=read-write"
        )

    async def execute(self, sql: str, database: str = "postgres") -> None:
        conn = await asyncpg.connect(self.url(database))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    # -- faults ------------------------------------------------------------------------------

    async def freeze_receiver(self) -> None:
        """SIGSTOP the standby's WAL receiver: the standby falls behind, as on a slow link."""
        conn = await asyncpg.connect(self.standby.url())
        try:
            pid = await conn.fetchval("SELECT pid FROM pg_stat_wal_receiver")
        finally:
            await conn.close()
        if not pid:
            raise ServerError("the standby has no WAL receiver")
        self._receiver = int(pid)
        os.kill(self._receiver, signal.SIGSTOP)

    def thaw_receiver(self) -> None:
        if self._receiver:
            os.kill(self._receiver, signal.SIGCONT)
            self._receiver = 0

    def crash_primary(self) -> None:
        """``pg_ctl stop -m immediate``: the primary goes away without a clean shutdown
        (no final checkpoint; WAL not yet sent to the standby is never sent)."""
        self.primary.pg_ctl("stop", "-m", "immediate")

    def promote(self) -> None:
        """``pg_ctl promote``, waiting until the standby accepts writes."""
        self.standby.pg_ctl("promote")


@dataclass
class PrivateRabbit:
    base: Path
    port: int
    tls_port: int
    dist_port: int
    certs: Certificates
    name: str = ""  # a suffix of the node name, for the nodes of a cluster
    cookie: str = ""  # the Erlang cookie, the same on every node of a cluster; "" = its own
    net_ticktime: int = 0  # Erlang's net tick (seconds); 0 = the default (60)
    extra_config: str = ""  # more lines of rabbitmq.conf
    node: str = field(init=False)

    def __post_init__(self) -> None:
        suffix = f"-{self.name}" if self.name else ""
        self.node = f"prompter-faults-{os.getpid()}{suffix}@localhost"

    @property
    def env(self) -> dict[str, str]:
        b = self.base
        tick = f" -kernel net_ticktime {self.net_ticktime}" if self.net_ticktime else ""
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
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"
            + tick,
            # The CLI tools are Erlang nodes too: the same tick, or the node drops them.
            **({"RABBITMQ_CTL_ERL_ARGS": tick.strip()} if tick else {}),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            raise ServerError(f"no rabbitmq-server in {RABBIT_BIN}")
        b = self.base
        b.mkdir(parents=True)
        cookie = b / ".erlang.cookie"
        cookie.write_text(self.cookie or os.urandom(16).hex())
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
{self.extra_config}"""
        )
        self.boot()

    def boot(self) -> None:
        """Start the node's Erlang VM (again: its data and cluster membership are kept) and
        wait until RabbitMQ runs in it."""
        with contextlib.suppress(FileNotFoundError):
            (self.base / "rabbit.pid").unlink()  # a stale one would satisfy `wait` at once
        run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env)
        self.ctl("wait", str(self.base / "rabbit.pid"), "--timeout", "120", timeout=150)

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

    @property
    def pid(self) -> int:
        """The OS process id of the node's Erlang VM."""
        try:
            return int((self.base / "rabbit.pid").read_text().strip())
        except (OSError, ValueError) as exc:
            raise ServerError(f"{self.node}: no pid file: {exc}") from exc

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: the machine dying, as its peers and clients see it."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise ServerError(f"{self.node} (pid {pid}) survived SIGKILL")
            time.sleep(0.05)

    def freeze(self) -> None:
        """SIGSTOP the node's VM: sockets stay open, nothing answers (a stalled machine)."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

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


@dataclass
class RabbitCluster:
    """Private RabbitMQ nodes joined into one cluster (``rabbitmqctl join_cluster``), each
    on its own free ports and directory, sharing one Erlang cookie.

    ``net_ticktime`` is short so that a frozen node is declared down within seconds (the
    default, 60 s, would make every partition scenario last minutes). Partitions are
    handled with ``autoheal``, the setting docs/scaling.md recommends: after a node was
    suspended and resumed, ``pause_minority`` leaves the cluster partitioned for good (the
    resumed node never saw the others go down, so it never pauses), ``autoheal`` restarts
    the losing side and the cluster is whole again within seconds. The cluster
    keeps track of which nodes it stopped, killed or froze, so that its commands (and the
    URL the checks use) go to a node that answers.
    """

    base: Path
    certs: Certificates
    size: int = 3
    net_ticktime: int = 4
    nodes: list[PrivateRabbit] = field(init=False, default_factory=list)
    down: set[int] = field(init=False, default_factory=set)

    def start(self) -> None:
        cookie = os.urandom(16).hex()
        self.nodes = [
            PrivateRabbit(
                self.base / f"node{i}",
                free_port(),
                free_port(),
                free_port(),
                self.certs,
                name=f"c{i}",
                cookie=cookie,
                net_ticktime=self.net_ticktime,
                extra_config="cluster_partition_handling = autoheal\n",
            )
            for i in range(self.size)
        ]
        failures: list[BaseException] = []

        def boot(node: PrivateRabbit) -> None:
            try:
                node.start()
            except BaseException as exc:  # reported below, with the node
                failures.append(exc)

        threads = [threading.Thread(target=boot, args=(n,)) for n in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise ServerError(f"a cluster node did not start: {failures[0]}")
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")  # returns once RabbitMQ runs again, in the cluster
        self.wait_running(self.size)

    def stop(self) -> None:
        for i, node in enumerate(self.nodes):
            with contextlib.suppress(OSError, ServerError):
                node.thaw()
            with contextlib.suppress(OSError, ServerError):
                os.kill(node.pid, signal.SIGKILL)  # the directory goes next: no clean stop
            self.down.add(i)

    # -- addresses ---------------------------------------------------------------------------

    def urls(self, start: int = 0, *, query: str = "") -> str:
        """Every node's AMQP URL, comma-separated, starting with node ``start``."""
        ordered = self.nodes[start:] + self.nodes[:start]
        return ",".join(n.amqp_url + (f"?{query}" if query else "") for n in ordered)

    @property
    def up(self) -> PrivateRabbit:
        """A node that answers (the first one not stopped, killed or frozen)."""
        for i, node in enumerate(self.nodes):
            if i not in self.down:
                return node
        raise ServerError("every node of the cluster is down")

    @property
    def amqp_url(self) -> str:
        return self.up.amqp_url

    @property
    def port(self) -> int:
        return self.up.port

    def index(self, node_name: str) -> int:
        for i, node in enumerate(self.nodes):
            if node.node == node_name:
                return i
        raise LookupError(f"{node_name} is not a node of this cluster")

    # -- observation ---------------------------------------------------------------------------

    def queues(self) -> dict[str, tuple[int, int, int]]:
        return self.up.queues()

    def quorum(self, queue: str) -> tuple[str, list[str], list[str]]:
        """A quorum queue's (leader, members, online members), as a running node sees it."""
        text = self.up.ctl("list_queues", "name", "leader", "members", "online",
                           "--formatter", "json")  # fmt: skip
        for row in json.loads(text):
            if row["name"] == queue:
                return str(row["leader"]), list(row["members"]), list(row["online"])
        raise LookupError(f"no queue {queue}")

    def running(self) -> list[str]:
        """The nodes the cluster counts as running, as a running node sees it."""
        text = self.up.ctl("cluster_status", "--formatter", "json")
        return sorted(json.loads(text)["running_nodes"])

    def wait_running(self, n: int, within: float = 120) -> None:
        deadline = time.monotonic() + within
        seen: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerError, ValueError, KeyError):
                seen = self.running()
                if len(seen) == n:
                    return
            time.sleep(0.5)
        raise ServerError(f"{n} running nodes expected within {within}s, saw {seen}")

    # -- faults ----------------------------------------------------------------------------------

    def stop_app(self, i: int) -> None:
        self.down.add(i)
        self.nodes[i].ctl("stop_app")

    def start_app(self, i: int) -> None:
        self.nodes[i].ctl("start_app")
        self.nodes[i].ctl("await_startup", "--timeout", "60")
        self.down.discard(i)

    def kill(self, i: int) -> None:
        self.down.add(i)
        self.nodes[i].kill()

    def freeze(self, i: int) -> None:
        self.down.add(i)
        self.nodes[i].freeze()

    def thaw(self, i: int) -> None:
        self.nodes[i].thaw()
        self.down.discard(i)

    def stop_node(self, i: int) -> None:
        """``rabbitmqctl stop``: a clean shutdown of the node's VM."""
        self.down.add(i)
        self.nodes[i].ctl("stop", timeout=60)

    def boot(self, i: int) -> None:
        """Start a stopped or killed node again; it rejoins the cluster by itself."""
        self.nodes[i].boot()
        self.nodes[i].ctl("await_startup", "--timeout", "60")
        self.down.discard(i)

    def restore(self) -> None:
        """Every node running again, whatever a scenario left behind: a frozen VM thawed, a
        stopped app started, a dead VM booted."""
        for i in sorted(self.down):
            node = self.nodes[i]
            try:
                pid = node.pid
            except ServerError:
                pid = 0
            if pid and _alive(pid):
                os.kill(pid, signal.SIGCONT)
                node.ctl("start_app")  # nothing to do if it runs
                self.down.discard(i)
            else:
                self.boot(i)
        self.wait_running(self.size)

    def wait_quorum_safe(self, i: int, within: float = 120) -> None:
        """Until stopping node ``i`` would leave every quorum queue a majority of online
        members (``rabbitmq-queues check_if_node_is_quorum_critical``, the check the
        RabbitMQ upgrade guide runs before each node of a rolling restart)."""
        node = self.nodes[i]
        deadline = time.monotonic() + within
        while True:
            try:
                run([str(RABBIT_BIN / "rabbitmq-queues"), "-n", node.node, "-q",
                     "check_if_node_is_quorum_critical"], env=node.env, timeout=60)  # fmt: skip
                return
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is gone for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    return False


def wait_port(port: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise ServerError(f"nothing answers on 127.0.0.1:{port}")
