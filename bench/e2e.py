"""End-to-end measurements against the local servers: pre-filled queues drained by the
bare consumer, the naive consumer and ``prompter-worker run``; latency at a steady rate;
peak RSS on a large backlog.

Every run gets its own topology names and its own scratch database; all are removed after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiormq
import asyncpg
import orjson
from pamqp import commands as spec

from bench.harness import AMQP_URL, Series, delete_topology, truncate
from worker.amqp import broker

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Names:
    exchange: str
    queue: str
    replay_queue: str
    dead_letter_exchange: str
    dead_letter_queue: str

    @classmethod
    def fresh(cls) -> Names:
        s = uuid.uuid4().hex[:8]
        return cls(
            f"bench.{s}.events",
            f"bench.{s}.ingest",
            f"bench.{s}.ingest.replay",
            f"bench.{s}.dlx",
            f"bench.{s}.ingest.dead",
        )

    def topology(self) -> broker.Topology:
        return broker.Topology(
            exchange=self.exchange,
            queue=self.queue,
            replay_queue=self.replay_queue,
            dead_letter_exchange=self.dead_letter_exchange,
            dead_letter_queue=self.dead_letter_queue,
            delivery_limit=20,
        )

    def env(self) -> dict[str, str]:
        return {
            "PROMPTER_EXCHANGE": self.exchange,
            "PROMPTER_QUEUE": self.queue,
            "PROMPTER_REPLAY_QUEUE": self.replay_queue,
            "PROMPTER_DEAD_LETTER_EXCHANGE": self.dead_letter_exchange,
            "PROMPTER_DEAD_LETTER_QUEUE": self.dead_letter_queue,
        }


@contextlib.asynccontextmanager
async def topology() -> AsyncIterator[Names]:
    """Fresh names, declared; deleted afterwards (:func:`bench.harness.delete_topology`)."""
    names = Names.fresh()
    connection = await aiormq.connect(AMQP_URL)
    try:
        await broker.open_topology(connection, names.topology(), passive=False)
    finally:
        await connection.close()
    try:
        yield names
    finally:
        await delete_topology(names.topology())


async def prefill(
    names: Names, bodies: Sequence[bytes], *, routing_key: str = broker.LIVE_ROUTING_KEY
) -> None:
    """Publish persistent messages with confirms, many outstanding at once: up to 2,000
    messages or 32 MiB of bodies, whichever comes first."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        props = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
        i = 0
        while i < len(bodies):
            end, held = i, 0
            while end < len(bodies) and end - i < 2000 and (held < 32 * 2**20 or end == i):
                held += len(bodies[end])
                end += 1
            await asyncio.gather(
                *(
                    channel.basic_publish(
                        b, exchange=names.exchange, routing_key=routing_key, properties=props
                    )
                    for b in bodies[i:end]
                )
            )
            i = end
    finally:
        await connection.close()


async def queue_ready(names: Names) -> int:
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(names.queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


async def run_baseline(kind: str, names: Names, n: int, database_url: str = "") -> dict[str, Any]:
    """Run bench.baselines as a process on a pre-filled queue; its JSON result."""
    args = [sys.executable, "-m", "bench.baselines", kind, names.queue, str(n)]
    if database_url:
        args.append(database_url)
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"baseline {kind} failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, children excluded."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
            return True
    except OSError:
        return False


@dataclass
class WorkerRun:
    events: int
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int


@contextlib.asynccontextmanager
async def worker_process(
    names: Names, database_url: str, extra_env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``prompter-worker run`` as a process on these names; (process, metrics port)."""
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PROMPTER_")},
        **names.env(),
        "DATABASE_URL": database_url,
        "AMQP_URL": AMQP_URL,
        "PROMPTER_METRICS_PORT": str(port),
        "PROMPTER_LOG_FORMAT": "json",
        "PROMPTER_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_ready, port):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not become ready")
            await asyncio.sleep(0.02)
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def drain_with_worker(
    names: Names,
    database_url: str,
    n: int,
    extra_env: dict[str, str] | None = None,
    *,
    processes: int = 1,
) -> WorkerRun:
    """Start ``processes`` workers on a pre-filled queue; time from all ready to the last
    row committed. CPU is the sum over the processes, RSS the largest.

    Rows already written when the workers report ready are subtracted, so the rate covers
    exactly the time measured.
    """
    conn = await asyncpg.connect(database_url)
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Started together, so they become ready together.
            entered = await asyncio.gather(
                *(
                    stack.enter_async_context(worker_process(names, database_url, extra_env))
                    for _ in range(processes)
                )
            )
            procs = [proc for proc, _ in entered]
            t0 = time.perf_counter()
            cpu0 = sum(proc_cpu_seconds(p.pid) for p in procs)
            base = int(await conn.fetchval("SELECT count(*) FROM prompt_results"))
            while True:
                rows = int(await conn.fetchval("SELECT count(*) FROM prompt_results"))
                if rows >= n:
                    break
                if any(p.returncode is not None for p in procs):
                    raise RuntimeError("a worker exited during the run")
                await asyncio.sleep(0.02)
            t1 = time.perf_counter()
            cpu1 = sum(proc_cpu_seconds(p.pid) for p in procs)
            rss = max(proc_peak_rss(p.pid) for p in procs)
        if n - base < n // 2:
            raise RuntimeError(
                f"{base} of {n} rows were written before the workers were ready: too few "
                "events to measure (use more --events)"
            )
        return WorkerRun(n - base, t1 - t0, cpu1 - cpu0, rss)
    finally:
        await conn.close()


# --- the measurements -----------------------------------------------------------------------

BARE = "(a) bare aio-pika consumer, ack only"
NAIVE = "(c) naive consumer, one transaction per message"
WORKER = "(d) prompter-worker run"
WORKER_CPU = "(e) worker CPU per event"
BARE_CPU = "(a) bare consumer CPU per message"


async def drains(url: str, bodies: list[bytes], reps: int, naive_events: int) -> dict[str, Series]:
    """(a), (c), (d) and (e), interleaved: each run drains its own pre-filled queue.

    The naive consumer gets the first ``naive_events`` events only (it is two orders of
    magnitude slower; its rate is steady long before that)."""
    n = len(bodies)
    out = {
        BARE: Series(BARE, "events/s"),
        NAIVE: Series(NAIVE, "events/s"),
        WORKER: Series(WORKER, "events/s"),
        WORKER_CPU: Series(WORKER_CPU, "us"),
        BARE_CPU: Series(BARE_CPU, "us"),
    }
    order = [BARE, WORKER, NAIVE]
    for rep in range(reps):
        for name in order if rep % 2 == 0 else list(reversed(order)):
            await truncate(url)
            async with topology() as names:
                if name == BARE:
                    await prefill(names, bodies)
                    r = await run_baseline("bare", names, n)
                    out[BARE].values.append(n / r["seconds"])
                    out[BARE_CPU].values.append(r["cpu_seconds"] / n * 1e6)
                elif name == NAIVE:
                    await prefill(names, bodies[:naive_events])
                    r = await run_baseline("naive", names, naive_events, url)
                    out[NAIVE].values.append(naive_events / r["seconds"])
                else:
                    await prefill(names, bodies)
                    w = await drain_with_worker(names, url, n)
                    out[WORKER].values.append(w.events / w.seconds)
                    out[WORKER_CPU].values.append(w.cpu_seconds / w.events * 1e6)
            print(f"  rep {rep + 1} {name}: {out[name].values[-1]:,.0f} events/s", flush=True)
    return out


async def batch_sweep(url: str, bodies: list[bytes], sizes: Sequence[int]) -> dict[int, float]:
    """Worker drain rate by batch size (one run each, same events)."""
    rates = {}
    for size in sizes:
        await truncate(url)
        async with topology() as names:
            await prefill(names, bodies)
            w = await drain_with_worker(
                names,
                url,
                len(bodies),
                {"PROMPTER_BATCH_SIZE": str(size), "PROMPTER_PREFETCH": str(max(2000, 2 * size))},
            )
        rates[size] = w.events / w.seconds
        print(f"  batch size {size}: {rates[size]:,.0f} events/s", flush=True)
    return rates


async def variants(
    url: str, bodies: list[bytes], configs: dict[str, tuple[dict[str, str], int]]
) -> dict[str, tuple[float, float]]:
    """Worker drain rate and CPU per event under other settings or process counts:
    name -> (environment, processes). One run each, same events."""
    out = {}
    for name, (env, processes) in configs.items():
        await truncate(url)
        async with topology() as names:
            await prefill(names, bodies)
            w = await drain_with_worker(names, url, len(bodies), env, processes=processes)
        out[name] = (w.events / w.seconds, w.cpu_seconds / w.events * 1e6)
        print(f"  {name}: {out[name][0]:,.0f} events/s, {out[name][1]:.1f} us/event", flush=True)
    return out


def _cpu_busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def settle(threshold: float = 0.25, quiet_for: float = 2.0, within: float = 60.0) -> float:
    """Wait until the machine is quiet (busy share of all CPUs below ``threshold`` for
    ``quiet_for`` seconds), so background work left by an earlier part (a checkpoint, the
    broker deleting a drained queue's segments, autovacuum) does not land in a latency
    measurement. Returns the seconds waited (at most ``within``)."""
    start = time.monotonic()
    quiet = 0.0
    busy0, total0 = _cpu_busy()
    while time.monotonic() - start < within:
        await asyncio.sleep(0.5)
        busy1, total1 = _cpu_busy()
        share = (busy1 - busy0) / max(total1 - total0, 1)
        busy0, total0 = busy1, total1
        quiet = quiet + 0.5 if share < threshold else 0.0
        if quiet >= quiet_for:
            break
    return time.monotonic() - start


NOTIFY_TRIGGER = """
    CREATE OR REPLACE FUNCTION bench_notify_commit() RETURNS trigger AS $$
    DECLARE
        stamps text[];
        i int := 1;
    BEGIN
        SELECT array_agg((extract(epoch FROM created_at) * 1000000)::bigint::text)
        INTO stamps FROM new_rows;
        WHILE i <= coalesce(array_length(stamps, 1), 0) LOOP
            PERFORM pg_notify('bench_commit', array_to_string(stamps[i:i + 399], ','));
            i := i + 400;
        END LOOP;
        RETURN NULL;
    END $$ LANGUAGE plpgsql;
    CREATE TRIGGER bench_notify_commit AFTER INSERT ON prompt_results
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
        EXECUTE FUNCTION bench_notify_commit();
"""


async def latency(
    url: str,
    docs: list[dict[str, Any]],
    rate: int,
    seconds: float,
    extra_env: dict[str, str] | None = None,
) -> list[float]:
    """End-to-end latency at a steady publish rate: each event is published with
    ``occurred_at`` = now; a trigger (in the benchmark's database only) NOTIFYs each
    statement's ``created_at`` values, which PostgreSQL delivers at commit; latency is the
    time of that notification minus ``occurred_at``. Returns the latencies in seconds."""
    await truncate(url)
    waited = await settle()
    print(f"  settled in {waited:.1f} s", flush=True)
    conn = await asyncpg.connect(url)
    seen: list[float] = []

    def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
        now = time.time()
        seen.extend(now - int(us) / 1e6 for us in payload.split(","))

    await conn.execute(NOTIFY_TRIGGER)
    await conn.add_listener("bench_commit", on_notify)
    total = int(rate * seconds)
    try:
        async with topology() as names, worker_process(names, url, extra_env):
            # The publisher runs in a process of its own, so its CPU does not delay the
            # notifications measured here.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.baselines",
                "pace",
                names.exchange,
                str(rate),
                str(seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            paced = json.loads(out.decode().strip().splitlines()[-1])
            if paced["worst_lag_seconds"] > 0.01:
                print(
                    f"  warning: the publisher fell {paced['worst_lag_seconds'] * 1000:.0f} ms"
                    " behind schedule (the machine is busy); latencies include that",
                    flush=True,
                )
            deadline = time.monotonic() + 30
            while len(seen) < total and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a list filled by a callback
                await asyncio.sleep(0.05)
    finally:
        await conn.remove_listener("bench_commit", on_notify)
        await conn.execute("DROP TRIGGER bench_notify_commit ON prompt_results")
        await conn.close()
    if len(seen) < total:
        raise RuntimeError(f"only {len(seen)} of {total} events were committed")
    return seen


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def peak_rss(url: str, bodies: list[bytes], backlog: int) -> dict[str, float]:
    """Peak RSS of the worker (default settings) draining a backlog of ``backlog`` events
    (the data set repeated with fresh ids), with its drain rate and the backlog's bytes."""
    await truncate(url)
    total = 0
    async with topology() as names:
        published = 0
        while published < backlog:
            part: list[bytes] = []
            held = 0
            while published + len(part) < backlog and len(part) < 20_000 and held < 2**28:
                doc = orjson.loads(bodies[(published + len(part)) % len(bodies)])
                doc["event_id"] = str(uuid.uuid4())
                part.append(orjson.dumps(doc))
                held += len(part[-1])
            await prefill(names, part)
            published += len(part)
            total += held
            print(f"  backlog {published:,}/{backlog:,} ({total / 2**20:,.0f} MiB)", flush=True)
        w = await drain_with_worker(names, url, backlog)
    return {
        "events": backlog,
        "backlog_bytes": total,
        "peak_rss_bytes": w.peak_rss_bytes,
        "events_per_second": w.events / w.seconds,
    }
