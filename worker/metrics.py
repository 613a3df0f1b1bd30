"""Prometheus metrics (:class:`Metrics`) and the totals behind the worker's summary line
(:class:`Totals`, :func:`summary_text`); :mod:`worker.probes` serves them over HTTP with
``/healthz`` and ``/readyz`` (re-exported here: :class:`Health`, :class:`MetricsServer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.samples import Sample

from worker.probes import BLOCKING, LIVENESS_STALE_SECONDS, Health, MetricsServer, make_app

__all__ = [
    "BLOCKING",
    "LIVENESS_STALE_SECONDS",
    "Health",
    "Metrics",
    "MetricsServer",
    "Totals",
    "make_app",
    "summary_text",
]

_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)


class Metrics:
    """Every metric of one worker process, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stored = Counter("prompter_events_stored", "Events stored as new rows.", registry=r)
        self.duplicates = Counter(
            "prompter_events_duplicate", "Events already stored (repeats).", registry=r
        )
        self.rejected = Counter(
            "prompter_events_rejected",
            "Events dead-lettered, by reason.",
            ["reason"],
            registry=r,
        )
        self.batches = Counter("prompter_batches", "Batches committed.", registry=r)
        self.batch_size = Histogram(
            "prompter_batch_size", "Deliveries per batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.commit_seconds = Histogram(
            "prompter_commit_seconds",
            "Time to write one batch (its transaction, retries excluded).",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.lag_seconds = Histogram(
            "prompter_event_lag_seconds",
            "Per batch, the oldest stored event's lag: commit time minus occurred_at.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "prompter_retries", "Retries of transient faults, by kind.", ["kind"], registry=r
        )
        self.reconnects = Counter(
            "prompter_reconnects", "Connections re-established, by server.", ["server"], registry=r
        )
        self.consumers = Gauge(
            "prompter_consumers", "Consumers this process holds on the broker.", registry=r
        )
        self.ready = Gauge("prompter_ready", "1 when ready (see /readyz).", registry=r)
        self.inflight = Gauge(
            "prompter_deliveries_held", "Deliveries received and not yet acked.", registry=r
        )
        self.bytes_held = Gauge(
            "prompter_bytes_held",
            "Bytes of messages received and not yet acked (bounded by PROMPTER_MAX_HELD_BYTES).",
            registry=r,
        )
        self.reading_paused = Gauge(
            "prompter_reading_paused",
            "1 while the worker holds its byte budget and has stopped reading from the broker.",
            registry=r,
        )
        self.bytes = Counter(
            "prompter_bytes_processed",
            "Bytes of the deliveries processed in batches (bodies and properties).",
            registry=r,
        )
        self.dropped = Counter(
            "prompter_deliveries_dropped",
            "Deliveries dropped because their channel closed (the broker redelivers them).",
            registry=r,
        )

    def totals(self, at: float) -> Totals:
        """What the counters say now (the summary line compares two of these)."""

        def by_label(counter: Counter, label: str) -> dict[str, float]:
            return {s.labels[label]: s.value for s in _totals(counter)}

        def value(counter: Counter) -> float:
            return sum(s.value for s in _totals(counter))

        lag = {
            sample.name: sample.value
            for family in self.lag_seconds.collect()
            for sample in family.samples
            if sample.name.endswith(("_sum", "_count"))
        }
        return Totals(
            at=at,
            batches=value(self.batches),
            stored=value(self.stored),
            duplicates=value(self.duplicates),
            rejected=by_label(self.rejected, "reason"),
            retries=by_label(self.retries, "kind"),
            reconnects=by_label(self.reconnects, "server"),
            dropped=value(self.dropped),
            bytes=value(self.bytes),
            lag_sum=lag.get("prompter_event_lag_seconds_sum", 0.0),
            lag_count=lag.get("prompter_event_lag_seconds_count", 0.0),
        )


def _totals(counter: Counter) -> list[Sample]:
    return [s for family in counter.collect() for s in family.samples if s.name.endswith("_total")]


@dataclass(frozen=True, kw_only=True)
class Totals:
    """The worker's counters at one moment (:meth:`Metrics.totals`)."""

    at: float
    batches: float
    stored: float
    duplicates: float
    rejected: dict[str, float]
    retries: dict[str, float]
    reconnects: dict[str, float]
    dropped: float
    bytes: float
    lag_sum: float
    lag_count: float

    def since(self, before: Totals) -> dict[str, Any] | None:
        """The summary of what happened between ``before`` and this: the fields of the
        worker's summary line, or None if nothing happened."""

        def delta(now: dict[str, float], then: dict[str, float]) -> dict[str, int]:
            out = {k: int(v - then.get(k, 0.0)) for k, v in now.items()}
            return {k: v for k, v in sorted(out.items()) if v}

        rejected = delta(self.rejected, before.rejected)
        retries = delta(self.retries, before.retries)
        reconnects = delta(self.reconnects, before.reconnects)
        batches = int(self.batches - before.batches)
        dropped = int(self.dropped - before.dropped)
        if not (batches or rejected or retries or reconnects or dropped):
            return None
        stored = int(self.stored - before.stored)
        duplicates = int(self.duplicates - before.duplicates)
        seconds = max(self.at - before.at, 1e-9)
        events = stored + duplicates + sum(rejected.values())
        lagged = self.lag_count - before.lag_count
        out: dict[str, Any] = {
            "seconds": round(seconds, 1),
            "batches": batches,
            "stored": stored,
            "duplicates": duplicates,
            "rejected": rejected,
            "retries": retries,
            "events_per_second": round(events / seconds, 1),
            "mb_per_second": round((self.bytes - before.bytes) / seconds / 1_000_000, 3),
        }
        if lagged:  # the mean lag of the batches that stored something
            out["lag_seconds"] = round((self.lag_sum - before.lag_sum) / lagged, 3)
        if reconnects:
            out["reconnects"] = reconnects
        if dropped:
            out["dropped"] = dropped
        return out


def summary_text(fields: dict[str, Any]) -> str:
    """The summary line's message: the fields :meth:`Totals.since` returns, for people."""
    rejected = fields["rejected"]
    said = [
        f"{fields['stored']} stored",
        f"{fields['duplicates']} duplicates",
        f"{sum(rejected.values())} rejected"
        + (" (" + ", ".join(f"{k} {v}" for k, v in rejected.items()) + ")" if rejected else ""),
        f"{sum(fields['retries'].values())} retries",
        f"{fields['events_per_second']:g} events/s",
        f"{fields['mb_per_second']:g} MB/s",
    ]
    if "lag_seconds" in fields:
        said.append(f"lag {_duration(fields['lag_seconds'])}")
    return f"in the last {_duration(fields['seconds'])}: " + ", ".join(said)


def _duration(seconds: float) -> str:
    """``0.25 s``, ``90 s``, ``12.5 min``, ``3.2 h``, ``474.4 days``: for people."""
    for unit, size in (("days", 86_400.0), ("h", 3_600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.3g} s"
