"""`python -m bench.tracing`: what tracing costs the worker, on vs off in one run.

The same pre-filled queue (every message carrying a W3C ``traceparent``, as from a traced
publisher) is drained by ``prompter-worker run`` with tracing off (no OTEL_* variable:
OpenTelemetry is not even imported) and on (``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at
an OTLP/HTTP receiver in this process that counts and discards what it is sent), the two
interleaved (off on, on off, ...) so that drift of the shared machine hits both alike.
Prints the medians of events/s and of the worker's CPU per event, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiormq
import asyncpg
from pamqp import commands as spec

from bench.data import make_events, make_templates, register_templates
from bench.e2e import Names, drain_with_worker, topology
from bench.harness import AMQP_URL, interleaved, scratch_database, truncate

OFF = "tracing off"
ON = "tracing on (OTLP/HTTP)"
OFF_CPU = "tracing off, CPU per event"
ON_CPU = "tracing on, CPU per event"


class Sink:
    """An OTLP/HTTP endpoint that answers 200 and counts the bytes it was sent."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(size)
                sink.requests += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def prefill_traced(names: Names, bodies: Sequence[bytes]) -> None:
    """Publish persistent messages, each with its own valid ``traceparent``."""
    rng = random.Random(3)
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        window = 2000
        for i in range(0, len(bodies), window):
            await asyncio.gather(
                *(
                    channel.basic_publish(
                        b,
                        exchange=names.exchange,
                        routing_key="prompt_run.v1",
                        properties=spec.Basic.Properties(
                            delivery_mode=2,
                            content_type="application/json",
                            headers={
                                "traceparent": f"00-{rng.getrandbits(128) | 1:032x}-"
                                f"{rng.getrandbits(64) | 1:016x}-01"
                            },
                        ),
                    )
                    for b in bodies[i : i + window]
                )
            )
    finally:
        await connection.close()


async def run(events: int, reps: int) -> dict[str, Any]:
    tpls = make_templates()
    bodies = make_events(events, tpls)
    sink = Sink()
    cpu: dict[str, list[float]] = {OFF: [], ON: []}
    envs = {
        OFF: {},
        ON: {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
            "OTEL_SERVICE_NAME": "prompter-worker-bench",
        },
    }
    async with scratch_database() as url:
        conn = await asyncpg.connect(url)
        await register_templates(conn, tpls)
        await conn.close()

        def drain(name: str) -> Any:
            async def one() -> float:
                await truncate(url)
                async with topology() as names:
                    await prefill_traced(names, bodies)
                    w = await drain_with_worker(names, url, len(bodies), envs[name])
                cpu[name].append(w.cpu_seconds / w.events * 1e6)
                return w.events / w.seconds

            return one

        series = await interleaved(
            reps, {OFF: drain(OFF), ON: drain(ON)}, {OFF: "events/s", ON: "events/s"}
        )
    off, on = series[OFF], series[ON]
    cpu_off = sorted(cpu[OFF])[len(cpu[OFF]) // 2]
    cpu_on = sorted(cpu[ON])[len(cpu[ON]) // 2]
    return {
        "events": events,
        "reps": reps,
        OFF: off.summary(),
        ON: on.summary(),
        "rate on / off": on.median / off.median,
        OFF_CPU: f"{cpu_off:.1f} us (values {', '.join(f'{v:.1f}' for v in cpu[OFF])})",
        ON_CPU: f"{cpu_on:.1f} us (values {', '.join(f'{v:.1f}' for v in cpu[ON])})",
        "CPU on / off": cpu_on / cpu_off,
        "OTLP requests received": sink.requests,
        "OTLP bytes received": sink.bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--events", type=int, default=30_000, help="events per drain")
    parser.add_argument("--reps", type=int, default=3, help="drains of each kind")
    args = parser.parse_args()
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]  # "off" means off: nothing inherited
    result = asyncio.run(run(args.events, args.reps))
    print()
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
