"""`python -m bench`: benchmarks against the local PostgreSQL and RabbitMQ."""

from __future__ import annotations

import argparse
import asyncio

from bench import ingest, publish


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    parser.add_argument("--quick", action="store_true", help="a few thousand events, once")
    parser.add_argument("--only", choices=["ingest", "publish"], help="run one benchmark")
    args = parser.parse_args()
    if args.quick:
        args.events, args.reps = min(args.events, 3000), 1
    if args.only == "publish":
        print(publish.report(asyncio.run(publish.run(args.events, args.reps))))
        return
    series = asyncio.run(ingest.run(args.events, args.reps))
    print(ingest.report(series))


if __name__ == "__main__":
    main()
