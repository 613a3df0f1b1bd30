"""`python -m bench`: the benchmark suite against the local PostgreSQL and RabbitMQ.

Measures, on one deterministic data set: (a) a bare aio-pika consumer that only acks,
(b) COPY of the same rows, (c) the naive per-message consumer, (d) `prompter-worker run`
end to end from a pre-filled queue, (e) the worker's CPU per event, (f) latency at a steady
publish rate, (g) peak RSS on a large backlog; plus ingest alone vs COPY, publishing
(pipelined vs awaited confirms), direct backfill, and throughput by batch size; and for
production-sized events: events/s and MB/s by size (the size mix and fixed sizes) beside
the bare consumer and COPY, peak RSS on backlogs of the mix and of 1 MiB events, ingest as
the table grows (v4 vs v7 ids), and TOAST compression (pglz vs lz4). Writes
`<out>/<date>-<host>.md`, `.json` and `.png` (plus `-sizes.png` and `-growth.png`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import asyncpg
import orjson

from bench import e2e, growth, ingest, publish, sizes, toast
from bench.data import SizedEvents, make_events, make_templates, mix_sizes, register_templates
from bench.harness import scratch_database
from bench.report import Results, write

#: The parts on ~2.3 KB events, then those on production-sized ones (issue 14).
PARTS = ("drain", "ingest", "latency", "rss", "publish", "sweep", "variants")
LARGE_PARTS = ("sizes", "large-rss", "growth", "toast")


async def run(args: argparse.Namespace) -> Results:
    tpls = make_templates()
    bodies = make_events(args.events, tpls)
    results = Results(
        events=args.events,
        event_bytes=sum(map(len, bodies)) // len(bodies),
        reps=args.reps,
        quick=args.quick,
    )
    parts = args.only or PARTS + LARGE_PARTS
    async with scratch_database() as url:
        conn = await asyncpg.connect(url)
        await register_templates(conn, tpls)
        await conn.close()
        if "drain" in parts:
            print("draining pre-filled queues: bare, worker, naive", flush=True)
            naive = min(args.events, 500 if args.quick else 10_000)
            results.series = await e2e.drains(url, bodies, args.reps, naive)
        if "latency" in parts:
            print(f"latency at {args.rate:,} events/s", flush=True)
            docs = [orjson.loads(b) for b in bodies[:1000]]
            for rep in range(args.reps):
                lat = await e2e.latency(url, docs, args.rate, args.seconds)
                results.latency_runs.append(lat)
                print(f"  rep {rep + 1}: p99 {sorted(lat)[int(len(lat) * 0.99)] * 1000:.1f} ms")
            results.latency_rate = args.rate
        if "sweep" in parts:
            print("throughput by batch size", flush=True)
            batch_sizes = (50, 500) if args.quick else (25, 100, 250, 500, 1000, 2000)
            sweep_events = bodies[: min(len(bodies), 30_000)]
            results.sweep = await e2e.batch_sweep(url, sweep_events, batch_sizes)
        if "variants" in parts:
            print("worker variants: processes, pool size, batch wait", flush=True)
            sample = bodies[: min(len(bodies), 30_000)]
            configs: dict[str, tuple[dict[str, str], int]] = {
                "1 process, pool 2 (default)": ({}, 1),
                "1 process, pool 1": ({"PROMPTER_DB_POOL_SIZE": "1"}, 1),
            }
            if not args.quick:  # too few events in a quick run for two processes to share
                configs["1 process, pool 4"] = ({"PROMPTER_DB_POOL_SIZE": "4"}, 1)
                configs["2 processes, pool 2 each"] = ({}, 2)
            results.variants = await e2e.variants(url, sample, configs)
            docs = [orjson.loads(b) for b in bodies[:1000]]
            for wait in (5, 20, 50) if not args.quick else (5,):
                lat = await e2e.latency(
                    url, docs, args.rate, args.seconds, {"PROMPTER_BATCH_WAIT_MS": str(wait)}
                )
                results.wait_latency[wait] = lat
                print(
                    f"  batch wait {wait} ms: p99 {sorted(lat)[int(len(lat) * 0.99)] * 1000:.1f} ms"
                )
        if "rss" in parts:
            print(f"peak RSS on a backlog of {args.backlog:,}", flush=True)
            for _ in range(args.reps):
                results.rss_runs.append(await e2e.peak_rss(url, bodies, args.backlog))
        if "sizes" in parts:
            print(f"events/s and MB/s by size, ~{args.size_mb:,.0f} MB per data set", flush=True)
            sets = sizes.data_sets(tpls, args.size_mb, min_events=10 if args.quick else 100)
            results.size_runs = await sizes.run(url, sets, args.reps)
        if "large-rss" in parts:
            maker = SizedEvents(tpls)
            if args.mix_backlog:
                mix = maker.make(mix_sizes(min(args.mix_backlog, 20_000)))
                print(f"peak RSS on a backlog of {args.mix_backlog:,} of the mix", flush=True)
                results.large_rss["mix"] = await e2e.peak_rss(url, mix, args.mix_backlog)
            if args.mib_backlog:
                big = maker.make([2**20] * min(args.mib_backlog, 100))
                print(f"peak RSS on a backlog of {args.mib_backlog:,} of 1 MiB", flush=True)
                results.large_rss["1 MiB"] = await e2e.peak_rss(url, big, args.mib_backlog)
    if "growth" in parts:
        print(f"ingest as the table grows to {args.growth_rows:,} rows, v4 vs v7", flush=True)
        deadline = time.monotonic() + args.growth_minutes * 60 if args.growth_minutes else None
        results.growth_run = await growth.run(
            args.growth_rows, args.growth_slice, deadline=deadline
        )
    if "toast" in parts:
        print("TOAST compression: pglz vs lz4 on the size mix", flush=True)
        results.toast_run = await toast.run(args.toast_events, args.reps)
    if "ingest" in parts:
        print("ingest alone vs COPY", flush=True)
        results.ingest = await ingest.run(args.events, args.reps)
    if "publish" in parts:
        print("publishing: pipelined vs awaited; direct backfill", flush=True)
        results.publish = await publish.run(args.events, args.reps)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    parser.add_argument("--quick", action="store_true", help="a few thousand events, once")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS + LARGE_PARTS, help="run only these parts"
    )
    parser.add_argument("--rate", type=int, default=2000, help="events/s for the latency run")
    parser.add_argument("--seconds", type=float, default=20, help="length of the latency run")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="events for peak RSS")
    parser.add_argument(
        "--size-mb", type=float, default=256, help="MB of bodies per data set of the sizes part"
    )
    parser.add_argument(
        "--mix-backlog", type=int, default=100_000, help="events of the mix for peak RSS (0: none)"
    )
    parser.add_argument(
        "--mib-backlog", type=int, default=3000, help="events of 1 MiB for peak RSS (0: none)"
    )
    parser.add_argument(
        "--growth-rows", type=int, default=5_000_000, help="rows the growth part grows to"
    )
    parser.add_argument(
        "--growth-slice", type=int, default=500_000, help="rows per measured growth slice"
    )
    parser.add_argument(
        "--growth-minutes",
        type=float,
        default=0,
        help="stop growing after the slice that ends past this many minutes (0: never)",
    )
    parser.add_argument(
        "--toast-events", type=int, default=20_000, help="events of the mix for the TOAST part"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="report folder"
    )
    args = parser.parse_args()
    if args.quick:
        args.events, args.reps = min(args.events, 3000), 1
        args.seconds, args.backlog = min(args.seconds, 3), min(args.backlog, 5000)
        args.size_mb, args.mix_backlog, args.mib_backlog = min(args.size_mb, 0.5), 200, 10
        args.growth_rows, args.growth_slice = 2000, 1000
        args.toast_events = min(args.toast_events, 100)
    results = asyncio.run(run(args))
    path = write(results, args.out)
    print(path.read_text())
    print(f"written: {path}")


if __name__ == "__main__":
    main()
