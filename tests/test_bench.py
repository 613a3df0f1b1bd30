"""The benchmark still runs: `python -m bench --quick` end to end (a smoke test, no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(420)  # every part of the bench, small: about 2 minutes on a busy machine
def test_quick_benchmark_writes_its_report(tmp_path: Path) -> None:
    """Every part runs against the local servers and the report, its JSON and its plot are
    written (the numbers of a quick run mean nothing, so none is asserted)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [md] = tmp_path.glob("*.md")
    [raw] = tmp_path.glob("*.json")
    [png] = tmp_path.glob("*.png")
    text = md.read_text()
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
    data = json.loads(raw.read_text())
    assert data["quick"] is True
    assert data["latency"]["runs"][0]["count"] > 0
    assert data["rss"][0]["peak_rss_bytes"] > 0
    assert png.stat().st_size > 10_000
