"""The fault suite's harness: a stream of events published with confirms, real worker
processes, and the total-queue check.

The check, after every scenario (:meth:`Scenario.account`):

- every confirmed good event is a row of ``prompt_results`` with its own content, and
  every row is a confirmed good event (nothing lost, nothing invented, none twice);
- the dead-letter queue holds exactly the confirmed poison messages, by message id (a worker
  killed between a dead-letter copy's confirm and the ack dead-letters it again on
  redelivery: copies are deduplicated by message id, never missing);
- the ingest queues have settled: 0 ready, 0 unacked, every worker consuming again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiormq
import aiormq.abc
import asyncpg
import orjson
from pamqp import commands as spec

from bench.data import Template, make_events
from tests.faults.servers import PrivatePostgres, PrivateRabbit, free_port
from tests.helpers import drain
from worker import broker
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
EVENTS_PER_SCENARIO = int(os.environ.get("PROMPTER_FAULTS_EVENTS", "20000"))
POISON_PER_SCENARIO = 24
MAX_EVENT_BYTES = 65536

#: One line per scenario, printed in the terminal summary as a table.
RESULTS: list[Result] = []


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, within: float = 60, message: str = ""
) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for: {message}")
        await asyncio.sleep(0.05)


# --- the stream of messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One message to publish: its id (``message_id``, the event_id of a good event)."""

    id: str
    body: bytes
    good: bool
    expect: str = ""  # a good event: its response.id, to check the stored content
    content_type: str | None = "application/json"
    routing_key: str = broker.LIVE_ROUTING_KEY


def poison_messages(templates: Sequence[Template], rng: random.Random, n: int) -> list[Message]:
    """``n`` messages the worker must dead-letter, of every kind it can tell apart."""
    t, other = templates[0], templates[1]
    base = orjson.loads(make_events(1, list(templates), seed=rng.randrange(10**9))[0])

    def doc(**changes: Any) -> bytes:
        return orjson.dumps({**base, "event_id": str(uuid.uuid4()), **changes})

    makers: list[Callable[[], tuple[bytes, str | None]]] = [
        lambda: (b'{"event_id": "broken', "application/json"),
        lambda: (b"[1, 2, 3]", "application/json"),
        lambda: (doc(request=None), "application/json"),
        lambda: (doc(occurred_at="2025-02-30T10:00:00Z"), "application/json"),
        lambda: (doc(template_id=str(uuid.uuid4())), "application/json"),
        lambda: (doc(template_id=t.template_id, workspace_id=other.workspace_id), None),
        lambda: (doc(response={"text": "a\u0000b"}), "application/json"),
        lambda: (doc(request={"blob": "x" * (MAX_EVENT_BYTES + 10)}), "application/json"),
        lambda: (b"plain text", "text/plain"),
    ]
    out = []
    for i in range(n):
        body, content_type = makers[i % len(makers)]()
        out.append(Message(f"poison-{i}-{uuid.uuid4().hex[:8]}", body, False, "", content_type))
    return out


def good_messages(bodies: Iterable[bytes]) -> list[Message]:
    out = []
    for body in bodies:
        doc = orjson.loads(body)
        out.append(Message(doc["event_id"], body, True, doc["response"]["id"]))
    return out


def interleave(good: list[Message], poison: list[Message], rng: random.Random) -> list[Message]:
    """Poison spread over the stream, a few among the very first messages."""
    out = list(good)
    for i, p in enumerate(poison):
        at = rng.randrange(0, 300) if i < 4 else rng.randrange(0, len(out))
        out.insert(at, p)
    return out


# --- the confirmed publisher ---------------------------------------------------------------


class ConfirmedPublisher:
    """Publishes with publisher confirms, a window of outstanding confirms at a time.

    A message counts as published only once the broker confirmed it. Anything not confirmed
    (a nack, a return, a closed channel or connection) is published again, reconnecting as
    needed, until confirmed: a well-behaved service publishes at least once.
    """

    def __init__(self, amqp_url: str, exchange: str, *, window: int = 500) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.window = window
        self.confirmed: set[str] = set()
        self.attempts = 0
        self.reconnects = 0

    async def publish(self, messages: Sequence[Message], *, rate: float | None = None) -> None:
        todo: deque[Message] = deque(messages)
        started = time.monotonic()
        sent = 0
        while todo:
            try:
                connection = await aiormq.connect(self.amqp_url + "?name=fault-publisher")
            except (OSError, aiormq.exceptions.AMQPError, ConnectionError):
                self.reconnects += 1
                await asyncio.sleep(0.2)
                continue
            failed: list[Message] = []
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                window = asyncio.Semaphore(self.window)
                tasks = []
                while todo and not channel.is_closed:
                    await window.acquire()
                    if channel.is_closed:
                        window.release()
                        break
                    message = todo.popleft()
                    tasks.append(asyncio.create_task(self._one(channel, message, window, failed)))
                    sent += 1
                    if rate is not None and sent % 100 == 0:
                        ahead = sent / rate - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                await asyncio.gather(*tasks)
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError):
                pass  # the connection is gone: counted below, whichever way it ended
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)
            todo.extendleft(reversed(failed))
            if todo:  # the connection ended (by an error or a closed channel) with work left
                self.reconnects += 1

    async def _one(
        self,
        channel: aiormq.abc.AbstractChannel,
        message: Message,
        window: asyncio.Semaphore,
        failed: list[Message],
    ) -> None:
        self.attempts += 1
        try:
            confirmation = await channel.basic_publish(
                message.body,
                exchange=self.exchange,
                routing_key=message.routing_key,
                mandatory=True,
                properties=spec.Basic.Properties(
                    content_type=message.content_type, delivery_mode=2, message_id=message.id
                ),
                timeout=30,
            )
        except Exception:
            failed.append(message)
        else:
            if isinstance(confirmation, spec.Basic.Ack):
                self.confirmed.add(message.id)
            else:
                failed.append(message)
        finally:
            window.release()


# --- worker processes -----------------------------------------------------------------------


class WorkerProcess:
    """One ``prompter-worker run`` process (or a launcher of it), its log in a file."""

    def __init__(
        self, env: dict[str, str], log: Path, *, argv: Sequence[str] = ("-m", "worker", "run")
    ) -> None:
        self.port = free_port()
        self.env = {**env, "PROMPTER_METRICS_PORT": str(self.port)}
        self.log = log
        self.argv = list(argv)
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> WorkerProcess:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.argv,
                env=self.env,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.starts += 1
        return self

    async def ready(self, within: float = 60) -> None:
        async def up() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.tail()}")
            return await asyncio.to_thread(self._get, "/readyz") is not None

        await wait_for(up, within=within, message=f"worker on :{self.port} ready")

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return None

    async def metric(self, name: str) -> float:
        text = await asyncio.to_thread(self._get, "/metrics") or ""
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, within: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait(30)

    async def stop(self) -> int:
        """SIGTERM: a graceful stop; its exit code."""
        self.signal(signal.SIGTERM)
        return await self.wait(60)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# --- one scenario -----------------------------------------------------------------------------


@dataclass
class Result:
    fault: str
    published: int
    stored: int
    dead_lettered: int
    lost: int
    duplicated: int
    seconds: float
    dead_copies: int = 0  # dead-letter messages before deduplication by message id

    HEADER = (
        "fault",
        "published",
        "stored",
        "dead-lettered",
        "lost",
        "duplicated",
        "seconds",
    )

    def cells(self) -> tuple[str, ...]:
        return (
            self.fault,
            str(self.published),
            str(self.stored),
            str(self.dead_lettered),
            str(self.lost),
            str(self.duplicated),
            f"{self.seconds:.1f}",
        )

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(self.HEADER, self.cells(), strict=True))


def table(results: Sequence[Result]) -> str:
    rows = [Result.HEADER, *(r.cells() for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(Result.HEADER))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in rows)


@dataclass
class Scenario:
    """One fault scenario's own database, queues, message stream and workers."""

    name: str
    pg: PrivatePostgres
    mq: PrivateRabbit
    database: str
    role: tuple[str, str]
    messages: list[Message]
    logs: Path
    names: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.names = {
            "exchange": f"faults.{self.name}.{suffix}.events",
            "queue": f"faults.{self.name}.{suffix}.ingest",
            "replay_queue": f"faults.{self.name}.{suffix}.ingest.replay",
            "dead_letter_exchange": f"faults.{self.name}.{suffix}.dlx",
            "dead_letter_queue": f"faults.{self.name}.{suffix}.ingest.dead",
        }

    # -- configuration -------------------------------------------------------------------

    @property
    def worker_database_url(self) -> str:
        return self.pg.url(self.database, user=self.role[0], password=self.role[1])

    def env(
        self, *, amqp_url: str | None = None, database_url: str | None = None, **settings: Any
    ) -> dict[str, str]:
        """The environment of a worker process of this scenario (its settings)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTER_", "PG"))}
        env.pop("DATABASE_URL", None)
        env.pop("AMQP_URL", None)
        values: dict[str, Any] = {
            "database_url": database_url or self.worker_database_url,
            "amqp_url": amqp_url or self.mq.amqp_url,
            "prefetch": 2000,
            "replay_prefetch": 200,
            "batch_size": 500,
            "batch_wait_ms": 20,
            "db_pool_size": 2,
            "retry_max_seconds": 1.0,
            "shutdown_timeout": 30.0,
            "max_event_bytes": MAX_EVENT_BYTES,
            "log_format": "json",
            **self.names,
            **settings,
        }
        for f in Settings.fields():
            if f.name in values:
                value = values[f.name]
                env[f.metadata["env"]] = (
                    str(value).lower() if isinstance(value, bool) else str(value)
                )
        return env

    def worker(self, *, argv: Sequence[str] | None = None, **env_settings: Any) -> WorkerProcess:
        n = len(self.workers)
        kwargs = {} if argv is None else {"argv": argv}
        w = WorkerProcess(
            self.env(**env_settings), self.logs / f"{self.name}-worker{n}.log", **kwargs
        )
        self.workers.append(w)
        return w

    def publisher(self, **kwargs: Any) -> ConfirmedPublisher:
        return ConfirmedPublisher(self.mq.amqp_url, self.names["exchange"], **kwargs)

    # -- observation ---------------------------------------------------------------------

    async def connect(self) -> asyncpg.Connection:
        """A superuser connection to this scenario's database (for checks and faults)."""
        return await asyncpg.connect(self.pg.url(self.database))

    async def rows(self) -> int:
        conn = await self.connect()
        try:
            return int(await conn.fetchval("SELECT count(*) FROM prompt_results"))
        finally:
            await conn.close()

    async def wait_rows(self, n: int, within: float = 90) -> None:
        async def enough() -> bool:
            return await self.rows() >= n

        await wait_for(enough, within=within, message=f"{self.name}: {n} rows")

    def queues(self) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
        """(ready, unacked, consumers) of the live, replay and dead-letter queues."""
        q = self.mq.queues()
        missing = (0, 0, 0)
        return (
            q.get(self.names["queue"], missing),
            q.get(self.names["replay_queue"], missing),
            q.get(self.names["dead_letter_queue"], missing),
        )

    async def settled(self, consumers: int, within: float = 120) -> None:
        """Both ingest queues at 0 ready and 0 unacked, with ``consumers`` workers on each."""
        state: list[Any] = []

        async def done() -> bool:
            live, replay, _ = await asyncio.to_thread(self.queues)
            state[:] = [live, replay]
            return all(q[0] == 0 and q[1] == 0 and q[2] == consumers for q in (live, replay))

        try:
            await wait_for(done, within=within, message=f"{self.name}: queues settled")
        except AssertionError as exc:
            logs = "\n".join(w.tail(8) for w in self.workers)
            raise AssertionError(f"{exc}; (ready, unacked, consumers) = {state}\n{logs}") from None

    # -- the total-queue check -------------------------------------------------------------

    async def account(self, publisher: ConfirmedPublisher, *, consumers: int) -> Result:
        """Check every invariant; record and return the scenario's line."""
        await self.settled(consumers)
        good = {m.id: m.expect for m in self.messages if m.good}
        poison = {m.id for m in self.messages if not m.good}
        confirmed_good = {i for i in publisher.confirmed if i in good}
        confirmed_poison = publisher.confirmed & poison
        assert confirmed_good == set(good), "the publisher confirmed every good event"
        assert confirmed_poison == poison, "the publisher confirmed every poison message"

        conn = await self.connect()
        try:
            rows = await conn.fetch("SELECT id::text, response->>'id' FROM prompt_results")
        finally:
            await conn.close()
        stored = Counter(r[0] for r in rows)
        content = {r[0]: r[1] for r in rows}
        dead = await drain(self.names["dead_letter_queue"], self.mq.amqp_url)
        dead_ids = Counter(m.header.properties.message_id for m in dead)

        lost = len(confirmed_good - stored.keys()) + len(confirmed_poison - dead_ids.keys())
        duplicated = sum(n - 1 for n in stored.values()) + len(dead_ids.keys() & good.keys())
        invented = sorted(stored.keys() - confirmed_good)
        wrong = sorted(i for i in stored if i in good and content[i] != good[i])
        unexpected_dead = sorted(dead_ids.keys() - poison)

        result = Result(
            fault=self.name,
            published=len(publisher.confirmed),
            stored=len(stored),
            dead_lettered=len(dead_ids),
            lost=lost,
            duplicated=duplicated,
            seconds=time.monotonic() - self.started,
            dead_copies=len(dead),
        )
        RESULTS.append(result)
        print("\n" + result.line(), flush=True)
        assert lost == 0, result.line()
        assert duplicated == 0, result.line()
        assert invented == [], f"rows nobody published: {invented[:5]}"
        assert wrong == [], f"rows with other content than published: {wrong[:5]}"
        assert unexpected_dead == [], f"dead-lettered but not poison: {unexpected_dead[:5]}"
        assert set(dead_ids) == poison, "the dead-letter queue holds exactly the poison"
        self.assert_clean_logs()
        return result

    def assert_clean_logs(self) -> None:
        """No worker log names the payload, a password, or a traceback of a bug."""
        secret = self.role[1]
        for w in self.workers:
            text = w.log.read_text(errors="replace") if w.log.exists() else ""
            assert secret not in text, f"{w.log.name} holds the database password"
            assert "guest:guest" not in text, f"{w.log.name} holds the broker password"
            assert "chatcmpl-" not in text, f"{w.log.name} quotes a payload"

    async def stop_workers(self) -> None:
        """SIGTERM every live worker; each must exit 0."""
        codes = {}
        for w in self.workers:
            if w.alive:
                codes[w.log.name] = await w.stop()
        assert all(c == 0 for c in codes.values()), codes


async def declare(scenario: Scenario, **settings: Any) -> None:
    """Declare the scenario's topology (as a publishing service does before publishing)."""
    s = Settings.from_env({}, **scenario.names, max_event_bytes=MAX_EVENT_BYTES, **settings)
    connection = await aiormq.connect(scenario.mq.amqp_url)
    try:
        await broker.open_topology(connection, broker.Topology.from_settings(s), passive=False)
    finally:
        await connection.close()


def grep(path: Path, pattern: str) -> list[str]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]
