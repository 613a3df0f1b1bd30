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
import functools
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
import pytest
from pamqp import commands as spec

from bench.data import Template, make_events
from tests.faults.servers import PrivatePostgres, PrivateRabbit, free_port
from tests.helpers import drain
from worker.amqp import broker
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
EVENTS_PER_SCENARIO = int(os.environ.get("PROMPTER_FAULTS_EVENTS", "20000"))
POISON_PER_SCENARIO = 24
MAX_EVENT_BYTES = 65536

#: The slowest scenarios (a three-node cluster, failovers) run only with ``make faults``,
#: which sets PROMPTER_FAULTS_SLOW=1: ``make test`` stays within its time budget.
SLOW_ENABLED = os.environ.get("PROMPTER_FAULTS_SLOW", "") == "1"
SLOW_REASON = "a slow fault scenario: `make faults` (PROMPTER_FAULTS_SLOW=1)"
SLOW = [pytest.mark.faults_slow, pytest.mark.skipif(not SLOW_ENABLED, reason=SLOW_REASON)]

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

    def __init__(
        self, amqp_url: str, exchange: str, *, window: int = 500, confirm_timeout: float = 30
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.window = window
        self.confirm_timeout = confirm_timeout
        self.confirmed: set[str] = set()
        self.attempts = 0
        self.reconnects = 0
        # A cluster's nodes, comma-separated: each reconnection goes to the next node.
        self.urls = [u for u in amqp_url.split(",") if u]
        self._node = 0
        # Cleared, it holds the stream (its connection open) before the next message: a
        # test sets off a fault that then always finds the publisher mid-stream.
        self.going = asyncio.Event()
        self.going.set()

    def _url(self) -> str:
        url = self.urls[self._node % len(self.urls)]
        return url + ("&" if "?" in url else "?") + "name=fault-publisher"

    async def publish(self, messages: Sequence[Message], *, rate: float | None = None) -> None:
        todo: deque[Message] = deque(messages)
        started = time.monotonic()
        sent = 0
        pace = max(1, min(100, int((rate or 1000) / 10)))  # check the rate this often
        while todo:
            try:
                # Bounded: a frozen node accepts the TCP connection and never answers.
                connection = await asyncio.wait_for(aiormq.connect(self._url()), 10)
            except (OSError, aiormq.exceptions.AMQPError, ConnectionError, TimeoutError):
                self.reconnects += 1
                self._node += 1
                await asyncio.sleep(0.2)
                continue
            failed: list[Message] = []
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                window = asyncio.Semaphore(self.window)
                tasks = []
                while todo and not channel.is_closed:
                    await self.going.wait()
                    await window.acquire()
                    if channel.is_closed:
                        window.release()
                        break
                    message = todo.popleft()
                    tasks.append(asyncio.create_task(self._one(channel, message, window, failed)))
                    sent += 1
                    if rate is not None and sent % pace == 0:
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
                self._node += 1

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
                timeout=self.confirm_timeout,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            failed.append(message)  # aiormq cancels the confirms of a connection it closes
        except Exception:
            failed.append(message)
        else:
            if isinstance(confirmation, spec.Basic.Ack):
                self.confirmed.add(message.id)
            else:
                failed.append(message)
        finally:
            window.release()


class LibraryPublisher:
    """Publishes good events with the publisher library other services use
    (:class:`worker.publisher.Publisher`: validation, a window of pipelined confirms, a
    cluster's node URLs, reconnection by the next call). A publish the library reports
    failed (it raises) is published again, until every event is confirmed.
    """

    def __init__(
        self,
        amqp_url: str,
        settings: Settings,
        *,
        window: int = 256,
        confirm_timeout: float = 10,
    ) -> None:
        self.amqp_url = amqp_url
        self.settings = settings
        self.window = window
        self.confirm_timeout = confirm_timeout
        self.confirmed: set[str] = set()
        self.attempts = 0
        self.failures = 0
        self.rate: float | None = None  # events per second; None = as fast as confirms come
        self.limit: int | None = None  # sends allowed so far (see allow()); None = no limit
        self.sent = 0  # events sent at least once
        self.reasons: Counter[str] = Counter()
        self._more = asyncio.Event()

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        what = re.sub(r"message \S+", "a message", str(exc)).partition(" (")[0]
        self.reasons[f"{type(exc).__name__}: {what[:100]}"] += 1

    def allow(self, n: int) -> None:
        """Let at least ``n`` more events be sent than have been so far."""
        if self.limit is not None:
            self.limit = max(self.limit, self.sent + n)
        self._more.set()

    def unlimited(self) -> None:
        """The rest as fast as the confirms come."""
        self.rate = self.limit = None
        self._more.set()

    async def publish(
        self, messages: Sequence[Message], *, rate: float | None = None, limit: int | None = None
    ) -> None:
        """Publish every message until confirmed, at ``rate``, and no more than ``limit``
        sends until :meth:`allow` or :meth:`unlimited` says so (a fault scenario thus spends
        as many events on each fault as it decides, however fast the machine is)."""
        from worker.errors import WorkerError
        from worker.publisher import Publisher, prepare

        library = Publisher(
            self.amqp_url,
            broker.Topology.from_settings(self.settings),
            window=self.window,
            timeout=self.confirm_timeout,
            max_event_bytes=MAX_EVENT_BYTES,
            name="fault-library-publisher",
        )
        todo: deque[Message] = deque(messages)  # not sent yet
        again: deque[Message] = deque()  # sent and failed: sent again first, outside the limit
        self.rate, self.limit = rate, limit
        pending: set[asyncio.Future[None]] = set()

        def settled(message: Message, future: asyncio.Future[None]) -> None:
            pending.discard(future)
            failure = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if failure is not None:
                self.failed(failure)
                again.append(message)  # published again: at least once, until confirmed
            else:
                self.confirmed.add(message.id)

        started = time.monotonic()
        paced = 0  # sends since the pace last changed
        pace = self.rate
        try:
            while todo or pending or again:
                if again:
                    message = again.popleft()
                elif not todo:
                    await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
                    continue
                elif self.limit is not None and self.sent >= self.limit:
                    self._more.clear()
                    with contextlib.suppress(TimeoutError):  # or a failure to send again
                        await asyncio.wait_for(self._more.wait(), 0.2)
                    continue
                else:
                    message = todo.popleft()
                    self.sent += 1
                if self.rate != pace:
                    started, paced, pace = time.monotonic(), 0, self.rate
                try:
                    future = await library.send(prepare(message.body))
                except WorkerError as exc:  # no node answered (BrokerUnavailable): again later
                    again.appendleft(message)
                    self.failed(exc)
                    await asyncio.sleep(0.2)
                    continue
                self.attempts += 1
                pending.add(future)
                future.add_done_callback(functools.partial(settled, message))
                paced += 1
                if pace is not None and paced % 10 == 0:
                    ahead = paced / pace - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        finally:
            await library.close(grace=0)


class ClusterPublisher:
    """The good events through the publisher library, the poison (which the library
    refuses to send, as it should) through a :class:`ConfirmedPublisher`, spread over the
    same time; both given every node's URL."""

    def __init__(self, amqp_urls: str, exchange: str, settings: Settings) -> None:
        self.library = LibraryPublisher(amqp_urls, settings)
        self.raw = ConfirmedPublisher(amqp_urls, exchange, confirm_timeout=10)

    @property
    def confirmed(self) -> set[str]:
        return self.library.confirmed | self.raw.confirmed

    @property
    def reconnects(self) -> int:
        return self.library.failures + self.raw.reconnects

    async def publish(
        self, messages: Sequence[Message], *, rate: float, limit: int | None = None
    ) -> None:
        """The good events at ``rate`` and within ``limit`` (see
        :meth:`LibraryPublisher.publish`), the poison over the first half minute."""
        good = [m for m in messages if m.good]
        poison = [m for m in messages if not m.good]
        await asyncio.gather(
            self.library.publish(good, rate=rate, limit=limit),
            self.raw.publish(poison, rate=len(poison) / 30),
        )


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


def print_table(terminal: pytest.TerminalReporter, results: Sequence[Result]) -> None:
    terminal.section("fault suite: every confirmed publish accounted for")
    terminal.write_line(table(results))


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

    def cluster_publisher(self, amqp_urls: str) -> ClusterPublisher:
        """The publisher library (good events) and a raw publisher (poison), both given
        every node of a cluster."""
        return ClusterPublisher(amqp_urls, self.names["exchange"], topology_settings(self))

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

    async def account(
        self,
        publisher: ConfirmedPublisher | ClusterPublisher,
        *,
        consumers: int,
        tolerate_loss: bool = False,
    ) -> Result:
        """Check every invariant; record and return the scenario's line.

        ``tolerate_loss`` is for a setup that is known to lose acknowledged writes (a
        failover to an asynchronous standby): confirmed good events missing from the table
        are counted in the line instead of failing the check; everything else still holds
        (nothing twice, nothing invented, the poison exactly in the dead-letter queue)."""
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
        assert lost == 0 or (tolerate_loss and not confirmed_poison - dead_ids.keys()), (
            result.line()
        )
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


def topology_settings(scenario: Scenario, **settings: Any) -> Settings:
    """The settings a publishing service of this scenario has: its names and limits."""
    return Settings.from_env({}, **scenario.names, max_event_bytes=MAX_EVENT_BYTES, **settings)


async def declare(scenario: Scenario, **settings: Any) -> None:
    """Declare the scenario's topology (as a publishing service does before publishing)."""
    s = topology_settings(scenario, **settings)
    connection = await aiormq.connect(scenario.mq.amqp_url)
    try:
        await broker.open_topology(connection, broker.Topology.from_settings(s), passive=False)
    finally:
        await connection.close()


def grep(path: Path, pattern: str) -> list[str]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]
