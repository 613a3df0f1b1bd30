"""The benchmark still runs: `python -m bench --quick` end to end (a smoke test, no timing),
the parts on ~2.3 KB events and those on production-sized events each in a run of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import LARGE_PARTS, PARTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(420)  # every part of the bench, small: about 2 minutes on a busy machine
def test_quick_benchmark_writes_its_report(tmp_path: Path) -> None:
    """Every part runs against the local servers and the report, its JSON and its plot are
    written (the numbers of a quick run mean nothing, so none is asserted)."""
    text, data = _quick_run(PARTS, tmp_path, timeout=600)
    [png] = tmp_path.glob("*.png")
    for section in (
        "## Draining a pre-filled queue",
        "## Ingest alone vs COPY",
        "## Latency at a steady",
        "## Memory",
        "## Publishing and direct backfill",
        "## Throughput by batch size",
        "## Worker variants",
        "d / a: worker vs bare consumer",
        "e / a: worker CPU per event",
    ):
        assert section in text, section
    assert data["quick"] is True
    assert data["latency"]["runs"][0]["count"] > 0
    assert data["rss"][0]["peak_rss_bytes"] > 0
    assert png.stat().st_size > 10_000


@pytest.mark.timeout(300)  # the production-sized parts, small: under a minute when quiet
def test_quick_benchmark_of_large_events_writes_its_report(tmp_path: Path) -> None:
    """The production-sized parts run (sizes with MB/s beside the bare consumer and COPY,
    peak RSS on backlogs of the mix and of 1 MiB events, growth v4 vs v7, pglz vs lz4) and
    their sections, raw numbers and two plots are written."""
    text, data = _quick_run(LARGE_PARTS, tmp_path, timeout=300)
    for section in (
        "## Events/s and MB/s by event size",
        "Target: worker MB/s on the mix >= 0.7x COPY's",
        "## Memory on large events",
        "## Ingest as the table grows",
        "## TOAST compression: pglz vs lz4",
    ):
        assert section in text, section
    assert set(data["sizes"]) == {"mix", "2 KiB", "64 KiB", "1 MiB"}
    for name, run in data["sizes"].items():
        assert all(v > 0 for v in run["mb_per_second"].values()), name
    assert {k: v["peak_rss_bytes"] > 0 for k, v in data["large_rss"].items()} == {
        "mix": True,
        "1 MiB": True,
    }
    assert {k: len(v) for k, v in data["growth"]["rates"].items()} == {
        "v4": 2,
        "v7": 2,
        "empty": 2,
    }
    assert set(data["toast"]["bytes_per_event"]) == {"pglz", "lz4"}
    for png in ("sizes", "growth"):
        [path] = tmp_path.glob(f"*-{png}.png")
        assert path.stat().st_size > 10_000


def _quick_run(parts: tuple[str, ...], out: Path, *, timeout: float) -> tuple[str, Any]:
    """``python -m bench --quick --only PARTS``: its report's text and its raw numbers."""
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", *parts, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [md] = out.glob("*.md")
    [raw] = out.glob("*.json")
    return md.read_text(), json.loads(raw.read_text())
