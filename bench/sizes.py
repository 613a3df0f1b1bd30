"""Production-sized events: throughput in events/s and MB/s by event size.

For the size mix (:func:`bench.data.mix_sizes`: log-normal, median 4 KiB, capped at
4 MiB) and each fixed size of :data:`bench.data.FIXED_SIZES`, three contenders on the
same bodies, interleaved (bare, worker, COPY; then the reverse):

- the bare aio-pika consumer that only acks, draining a pre-filled queue;
- ``prompter-worker run`` with default settings, draining a pre-filled queue;
- COPY of the same rows (request and response as their JSON text, rows built before the
  clock starts), in the transactions the worker would make by default: at most
  ``PROMPTER_BATCH_SIZE`` events and ``PROMPTER_BATCH_MAX_BYTES`` bytes each.

MB/s counts event bodies (10^6 bytes). Each data set holds about ``megabytes`` of bodies
(at least 100 events), so every run moves the same bytes whatever the size.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from bench import e2e
from bench.data import FIXED_SIZES, SizedEvents, Template, mix_sizes
from bench.harness import Series, truncate
from worker.config import Settings
from worker.events import Event, decode
from worker.store import pool as store_module
from worker.store.ingest import RESULT_COLUMNS

BARE = "bare aio-pika, ack only"
WORKER = "prompter-worker run"
COPY = "COPY of the same rows"
CONTENDERS = (BARE, WORKER, COPY)
MIX = "mix"


def label(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 1024} KiB"


@dataclass
class SizeRun:
    """One data set's contenders: events/s and MB/s series."""

    name: str
    events: int
    mean_bytes: float
    rates: dict[str, Series] = field(default_factory=dict)

    def mbps(self, contender: str) -> float:
        return self.rates[contender].median * self.mean_bytes / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "mean_bytes": self.mean_bytes,
            "events_per_second": {k: v.as_dict() for k, v in self.rates.items()},
            "mb_per_second": {k: self.mbps(k) for k in self.rates},
            "worker_over_copy_per_rep": paired(self, COPY),
            "worker_over_bare_per_rep": paired(self, BARE),
        }


def data_sets(
    tpls: list[Template],
    megabytes: float,
    *,
    fixed: tuple[int, ...] = FIXED_SIZES,
    min_events: int = 100,
) -> dict[str, list[bytes]]:
    """The mix and each fixed size, each about ``megabytes`` of bodies (at least
    ``min_events`` events)."""
    maker = SizedEvents(tpls)
    target = megabytes * 1e6
    sizes = mix_sizes(200_000)
    mean = sum(sizes) / len(sizes)
    out = {MIX: maker.make(sizes[: max(min_events, int(target / mean))])}
    for size in fixed:
        out[label(size)] = maker.make([size] * max(min_events, int(target / size)))
    return out


def _decoded(bodies: list[bytes]) -> list[Event]:
    events = []
    for b in bodies:
        e = decode(b)
        if not isinstance(e, Event):
            raise RuntimeError(f"the data set holds an invalid event: {e}")
        events.append(e)
    return events


async def copy_rate(url: str, bodies: list[bytes], settings: Settings) -> float:
    """COPY of the rows the worker would store, in its default transactions; events/s."""
    events = _decoded(bodies)
    await truncate(url)
    conn = await asyncpg.connect(url)
    try:
        await store_module.init_connection(conn)
        keys = sorted({e.version_key for e in events})
        version_ids = {k: uuid.uuid4() for k in keys}
        first = min(e.occurred_at for e in events)
        versions = [
            (vid, *(uuid.UUID(x) for x in k[:3]), "p", k[3], "m", None, first, first)
            for k, vid in version_ids.items()
        ]
        batches: list[list[tuple[Any, ...]]] = [[]]
        held = 0
        for e in events:
            assert e.columns is not None, "the data set's bodies are compact"
            request, response, analysis = e.columns
            if batches[-1] and (
                len(batches[-1]) >= settings.batch_size
                or held + len(e.body) > settings.batch_max_bytes
            ):
                batches.append([])
                held = 0
            held += len(e.body)
            batches[-1].append(
                (
                    e.event_id, e.org_id, e.workspace_id, e.template_id,
                    version_ids[e.version_key], e.provider_version_key, e.system_fingerprint,
                    orjson.Fragment(request), orjson.Fragment(response),
                    None if analysis is None else orjson.Fragment(analysis), e.occurred_at,
                )
            )  # fmt: skip
        start = time.perf_counter()
        await conn.copy_records_to_table(
            "prompt_versions",
            records=versions,
            columns=[
                "id", "org_id", "workspace_id", "template_id", "provider",
                "provider_version_key", "model_id", "fingerprint_captured_at",
                "first_seen_at", "last_seen_at",
            ],
        )  # fmt: skip
        for batch in batches:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "prompt_results", records=batch, columns=RESULT_COLUMNS
                )
        return len(events) / (time.perf_counter() - start)
    finally:
        await conn.close()


async def run(url: str, sets: dict[str, list[bytes]], reps: int) -> dict[str, SizeRun]:
    """Each data set, each contender ``reps`` times, interleaved."""
    settings = Settings.from_env({})
    out: dict[str, SizeRun] = {}
    for name, bodies in sets.items():
        n = len(bodies)
        mean = sum(map(len, bodies)) / n
        run = out[name] = SizeRun(
            name, n, mean, {c: Series(f"{name}: {c}", "events/s") for c in CONTENDERS}
        )
        print(f"  {name}: {n:,} events, mean {mean / 1024:,.1f} KiB", flush=True)
        for rep in range(reps):
            order = CONTENDERS if rep % 2 == 0 else tuple(reversed(CONTENDERS))
            for contender in order:
                if contender == COPY:
                    rate = await copy_rate(url, bodies, settings)
                else:
                    await truncate(url)
                    async with e2e.topology() as names:
                        await e2e.prefill(names, bodies)
                        if contender == BARE:
                            r = await e2e.run_baseline("bare", names, n)
                            rate = n / r["seconds"]
                        else:
                            w = await e2e.drain_with_worker(names, url, n)
                            rate = w.events / w.seconds
                run.rates[contender].values.append(rate)
                print(
                    f"    rep {rep + 1} {contender:<24} {rate:>9,.0f} events/s"
                    f" {rate * mean / 1e6:>7,.1f} MB/s",
                    flush=True,
                )
    return out


def paired(r: SizeRun, other: str) -> list[float]:
    """The worker's rate over ``other``'s, repetition by repetition."""
    return [w / o for w, o in zip(r.rates[WORKER].values, r.rates[other].values, strict=True)]


def _paired(r: SizeRun, other: str) -> str:
    ratios = paired(r, other)
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f})"


def report(runs: dict[str, SizeRun], plot_name: str | None = None) -> str:
    lines = [
        "Bodies of each data set through each contender, interleaved; medians (min - max "
        "in events/s). MB/s counts event bodies (10^6 bytes).",
        "",
        "| data set | events | mean body | contender | events/s | min - max | MB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs.values():
        for c in CONTENDERS:
            s = r.rates[c]
            lines.append(
                f"| {r.name} | {r.events:,} | {r.mean_bytes / 1024:,.1f} KiB | {c} | "
                f"{s.median:,.0f} | {s.low:,.0f} - {s.high:,.0f} | {r.mbps(c):,.1f} |"
            )
    lines += [
        "",
        "Ratios of the medians, and of each repetition's runs (back to back, so alike in the "
        "machine's drift): median (min - max).",
        "",
        "| data set | worker / COPY | per repetition | worker / bare | per repetition |",
        "|---|---|---|---|---|",
    ]
    for r in runs.values():
        copy, bare = r.mbps(COPY), r.mbps(BARE)
        lines.append(
            f"| {r.name} | {r.mbps(WORKER) / copy:.2f}x | {_paired(r, COPY)} | "
            f"{r.mbps(WORKER) / bare:.2f}x | {_paired(r, BARE)} |"
        )
    if MIX in runs:
        ratio = runs[MIX].mbps(WORKER) / runs[MIX].mbps(COPY)
        lines += [
            "",
            "Target: worker MB/s on the mix >= 0.7x COPY's: "
            f"{'met' if ratio >= 0.7 else '**not met**'} ({ratio:.2f}x).",
        ]
    lines.append("")
    if plot_name:
        lines += [f"![MB/s by event size]({plot_name})", ""]
    return "\n".join(lines)
