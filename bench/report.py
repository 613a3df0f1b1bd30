"""The benchmark report: a markdown table with the ratios and targets, the raw numbers as
JSON, and plots (throughput by batch size and latency percentiles; MB/s by event size;
ingest rate by table size)."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import statistics
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt

from bench import e2e, growth, ingest, publish, sizes, toast
from bench.harness import Series

#: Peak RSS targets: on ~2.3 KB events (issue 2), and on every mix and backlog (issue 14).
RSS_TARGET_MIB = 150
LARGE_RSS_TARGET_MIB = 256


@dataclass
class Results:
    events: int
    event_bytes: int
    reps: int
    quick: bool
    series: dict[str, Series] = field(default_factory=dict)
    ingest: dict[str, Series] = field(default_factory=dict)
    publish: dict[str, Series] = field(default_factory=dict)
    latency_runs: list[list[float]] = field(default_factory=list)
    latency_rate: int = 0
    rss_runs: list[dict[str, float]] = field(default_factory=list)

    @property
    def latency(self) -> list[float]:
        """Every latency of every run, for the plot."""
        return [x for run in self.latency_runs for x in run]

    sweep: dict[int, float] = field(default_factory=dict)
    variants: dict[str, tuple[float, float]] = field(default_factory=dict)
    wait_latency: dict[int, list[float]] = field(default_factory=dict)
    size_runs: dict[str, sizes.SizeRun] = field(default_factory=dict)
    large_rss: dict[str, dict[str, float]] = field(default_factory=dict)
    growth_run: growth.Growth | None = None
    toast_run: toast.Toast | None = None


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def _versions() -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            return out.stdout.strip()
        except OSError:
            return "unknown"

    rabbit = run("rabbitmqctl", "-q", "version")
    postgres = run("psql", "--version")
    return {
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "memory_gib": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}",
        "rabbitmq": rabbit or "unknown",
        "postgresql": m.group(0) if (m := re.search(r"\d+\.\d+", postgres)) else "unknown",
    }


def _row(s: Series, digits: int = 0) -> str:
    return f"| {s.name} | {s.median:,.{digits}f} | {s.low:,.{digits}f} - {s.high:,.{digits}f} |"


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(
    r: Results,
    plot_name: str | None,
    sizes_plot: str | None = None,
    growth_plot: str | None = None,
) -> str:
    v = _versions()
    lines = [
        f"# prompter-worker benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Host `{socket.gethostname()}`: {v['cpus']} cores, {v['memory_gib']} GiB; Python "
        f"{v['python']}, PostgreSQL {v['postgresql']}, RabbitMQ {v['rabbitmq']}; broker, "
        "database and consumers share the machine. "
        f"{r.events:,} events of about {r.event_bytes:,} bytes; each measurement "
        f"{r.reps} time(s), interleaved; medians with min - max."
        + (" **Quick run (smoke test): numbers not meaningful.**" if r.quick else ""),
        "",
    ]
    s = r.series
    if s:
        a, c, d = s[e2e.BARE].median, s[e2e.NAIVE].median, s[e2e.WORKER].median
        cpu_d, cpu_a = s[e2e.WORKER_CPU].median, s[e2e.BARE_CPU].median
        copy = r.ingest[ingest.COPY_PREBUILT].median if r.ingest else float("nan")
        lines += [
            "## Draining a pre-filled queue",
            "",
            "| contender | events/s | min - max |",
            "|---|---|---|",
            _row(s[e2e.BARE]),
            _row(s[e2e.NAIVE]),
            _row(s[e2e.WORKER]),
            "",
            "| CPU of the consumer's own process | µs per event | min - max |",
            "|---|---|---|",
            _row(s[e2e.BARE_CPU], 1),
            _row(s[e2e.WORKER_CPU], 1),
            "",
            "| ratio | value | target | |",
            "|---|---|---|---|",
            f"| d / a: worker vs bare consumer | {d / a:.2f}x | >= 1.0x | {_check(d >= a)} |",
            f"| d / b: worker vs COPY of the same rows | {d / copy:.2f}x | | |",
            f"| d / c: worker vs naive consumer | {d / c:.1f}x | >= 10x | {_check(d >= 10 * c)} |",
            f"| e / a: worker CPU per event vs bare CPU per message | {cpu_d / cpu_a:.2f} | <= 0.5"
            f" | {_check(cpu_d <= 0.5 * cpu_a)} |",
            "",
        ]
    if r.ingest:
        lines += ["## Ingest alone vs COPY (batches of 1,000)", "", ingest.report(r.ingest), ""]
    if r.latency_runs:
        runs = [{p: percentile(lat, p) * 1000 for p in (50, 90, 99, 100)} for lat in r.latency_runs]

        def cell(p: int) -> str:
            values = [run[p] for run in runs]
            return f"{statistics.median(values):.1f} ms ({min(values):.1f} - {max(values):.1f})"

        p99 = statistics.median(run[99] for run in runs)
        lines += [
            f"## Latency at a steady {r.latency_rate:,} events/s",
            "",
            "occurred_at (set at publish) to the commit of its row; "
            f"{len(runs)} run(s) of {len(r.latency_runs[0]):,} events: the median run's "
            "percentile, with min - max over the runs.",
            "",
            "| p50 | p90 | p99 | max | target |",
            "|---|---|---|---|---|",
            f"| {cell(50)} | {cell(90)} | {cell(99)} | {cell(100)} | p99 <= 50 ms: "
            f"{_check(p99 <= 50)} |",
            "",
        ]
    if r.rss_runs:
        mbs = [run["peak_rss_bytes"] / 2**20 for run in r.rss_runs]
        rates = [run["events_per_second"] for run in r.rss_runs]
        mb = statistics.median(mbs)
        lines += [
            "## Memory",
            "",
            f"Peak RSS of the worker draining a backlog of {int(r.rss_runs[0]['events']):,} "
            f"events: **{mb:.0f} MiB** ({min(mbs):.0f} - {max(mbs):.0f} over {len(mbs)} runs; "
            f"target <= {RSS_TARGET_MIB} MiB: {_check(max(mbs) <= RSS_TARGET_MIB)}), at "
            f"{statistics.median(rates):,.0f} events/s.",
            "",
        ]
    if r.publish:
        lines += ["## Publishing and direct backfill", "", publish.report(r.publish), ""]
        if s and publish.DIRECT in r.publish:
            direct = r.publish[publish.DIRECT].median
            lines += [
                f"`replay --direct` vs the worker end to end: {direct:,.0f} vs "
                f"{s[e2e.WORKER].median:,.0f} events/s ({direct / s[e2e.WORKER].median:.2f}x).",
                "",
            ]
    if r.sweep:
        lines += ["## Throughput by batch size", "", "| batch size | events/s |", "|---|---|"]
        lines += [f"| {size} | {rate:,.0f} |" for size, rate in sorted(r.sweep.items())]
        lines.append("")
    if r.variants:
        lines += [
            "## Worker variants (draining the same events)",
            "",
            "| variant | events/s | worker CPU µs/event |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v[0]:,.0f} | {v[1]:.1f} |" for k, v in r.variants.items()]
        lines.append("")
    if r.wait_latency:
        lines += [
            f"## Latency at {r.latency_rate or 2000:,} events/s by PROMPTER_BATCH_WAIT_MS",
            "",
            "| batch wait | p50 | p99 |",
            "|---|---|---|",
        ]
        for w, lat in sorted(r.wait_latency.items()):
            p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
            lines.append(f"| {w} ms | {p50:.1f} ms | {p99:.1f} ms |")
        lines.append("")
    if plot_name:
        lines += [f"![throughput by batch size, latency percentiles]({plot_name})", ""]
    if r.size_runs:
        lines += ["## Events/s and MB/s by event size", "", sizes.report(r.size_runs, sizes_plot)]
    if r.large_rss:
        lines += [
            "## Memory on large events",
            "",
            "Peak RSS (`VmHWM`) of `prompter-worker run`, default settings, draining a "
            "pre-filled queue.",
            "",
            "| backlog | events | bytes | peak RSS | drain events/s | MB/s | target "
            f"<= {LARGE_RSS_TARGET_MIB} MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, run in r.large_rss.items():
            mib = run["peak_rss_bytes"] / 2**20
            mbps = run["events_per_second"] * run["backlog_bytes"] / run["events"] / 1e6
            lines.append(
                f"| {name} | {int(run['events']):,} | {run['backlog_bytes'] / 2**30:,.2f} GiB | "
                f"{mib:,.0f} MiB | {run['events_per_second']:,.0f} | {mbps:,.1f} | "
                f"{_check(mib <= LARGE_RSS_TARGET_MIB)} |"
            )
        lines.append("")
    if r.growth_run is not None:
        lines += ["## Ingest as the table grows", "", growth.report(r.growth_run, growth_plot)]
    if r.toast_run is not None:
        lines += ["## TOAST compression: pglz vs lz4", "", toast.report(r.toast_run)]
    return "\n".join(lines)


def plot_sizes(runs: dict[str, sizes.SizeRun], path: Path) -> None:
    """MB/s of each contender by data set, the data sets by mean body size."""
    ordered = sorted(runs.values(), key=lambda x: x.mean_bytes)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    for k, contender in enumerate(sizes.CONTENDERS):
        ax.bar(
            [i + (k - 1) * width for i in range(len(ordered))],
            [x.mbps(contender) for x in ordered],
            width,
            label=contender,
        )
    ax.set_xticks(
        range(len(ordered)),
        [f"{x.name}\n(mean {x.mean_bytes / 1024:,.0f} KiB)" for x in ordered],
    )
    ax.set_ylabel("MB/s of event bodies (median)")
    ax.set_title("Throughput by event size")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_growth(g: growth.Growth, path: Path) -> None:
    """Ingest rate per slice against the rows in the table, one line per id kind (left);
    each kind's rate over the empty table's measured alongside (right): the machine's
    drift cancels out of the ratio."""
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, rates in g.rates.items():
        name = f"{kind} ids" if kind != growth.EMPTY else "empty table (v7), same moment"
        style = "--" if kind == growth.EMPTY else "-"
        ax.plot([x / 1e6 for x in g.rows(kind)], rates, style, marker="o", label=name)
        if kind != growth.EMPTY and g.rates.get(growth.EMPTY):
            ratios = [g.vs_empty(kind, i) for i in range(len(rates))]
            rx.plot([x / 1e6 for x in g.rows(kind)], ratios, marker="o", label=f"{kind} ids")
    ax.set_xlabel("rows in prompt_results at the end of the slice (millions)")
    ax.set_ylabel(f"events/s over the slice of {g.slice_rows:,}")
    ax.set_ylim(bottom=0)
    ax.set_title("Store.ingest rate as the table grows")
    ax.legend()
    ax.grid(True, alpha=0.3)
    rx.axhline(0.9, color="red", linestyle="--", label="target for v7: 0.9")
    rx.set_xlabel("rows in prompt_results at the end of the slice (millions)")
    rx.set_ylabel("rate / empty table's rate at the same moment")
    rx.set_ylim(0, 1.4)
    rx.set_title("Relative to an empty table")
    rx.legend()
    rx.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(r: Results, path: Path) -> bool:
    """Throughput by batch size, and the latency distribution; False if nothing to plot."""
    if not r.sweep and not r.latency:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if r.sweep:
        sizes = sorted(r.sweep)
        axes[0].plot(sizes, [r.sweep[x] for x in sizes], marker="o")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("batch size (events)")
        axes[0].set_ylabel("events/s (drain)")
        axes[0].set_title("Worker throughput by batch size")
        axes[0].grid(True, alpha=0.3)
    if r.latency:
        ps = [50, 75, 90, 95, 99, 99.9]
        values = [percentile(r.latency, p) * 1000 for p in ps]
        axes[1].bar([f"p{p:g}" for p in ps], values)
        axes[1].axhline(50, color="red", linestyle="--", label="target p99")
        axes[1].set_ylabel("ms, occurred_at to commit")
        axes[1].set_title(f"Latency at {r.latency_rate:,} events/s")
        axes[1].legend()
        axes[1].grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(r: Results, out: Path) -> Path:
    """Write ``<date>-<host>.md``, ``.json`` and ``.png`` under ``out``; the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{socket.gethostname()}"
    png = out / f"{stem}.png"
    has_plot = plot(r, png)
    sizes_png = growth_png = None
    if r.size_runs:
        sizes_png = out / f"{stem}-sizes.png"
        plot_sizes(r.size_runs, sizes_png)
    if r.growth_run is not None and r.growth_run.rates:
        growth_png = out / f"{stem}-growth.png"
        plot_growth(r.growth_run, growth_png)
    md = out / f"{stem}.md"
    md.write_text(
        markdown(
            r,
            png.name if has_plot else None,
            sizes_png.name if sizes_png else None,
            growth_png.name if growth_png else None,
        )
    )
    raw: dict[str, Any] = {
        "events": r.events,
        "event_bytes": r.event_bytes,
        "reps": r.reps,
        "quick": r.quick,
        "drain": {k: v.as_dict() for k, v in r.series.items()},
        "ingest": {k: v.as_dict() for k, v in r.ingest.items()},
        "publish": {k: v.as_dict() for k, v in r.publish.items()},
        "latency": {
            "rate": r.latency_rate,
            "runs": [
                {
                    "count": len(lat),
                    "p50": percentile(lat, 50),
                    "p90": percentile(lat, 90),
                    "p99": percentile(lat, 99),
                    "max": max(lat),
                    "mean": statistics.fmean(lat),
                }
                for lat in r.latency_runs
            ],
        },
        "rss": r.rss_runs,
        "batch_sweep": {str(k): v for k, v in r.sweep.items()},
        "variants": {
            k: {"events_per_second": v[0], "cpu_us_per_event": v[1]} for k, v in r.variants.items()
        },
        "latency_by_batch_wait_ms": {
            str(w): {"p50": percentile(lat, 50), "p99": percentile(lat, 99)}
            for w, lat in r.wait_latency.items()
        },
        "sizes": {k: v.as_dict() for k, v in r.size_runs.items()},
        "large_rss": r.large_rss,
        "growth": r.growth_run.as_dict() if r.growth_run is not None else None,
        "toast": r.toast_run.as_dict() if r.toast_run is not None else None,
        "versions": _versions(),
    }
    (out / f"{stem}.json").write_text(json.dumps(raw, indent=2))
    return md
