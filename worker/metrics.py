"""Prometheus metrics, and the HTTP endpoint serving them with ``/healthz`` and ``/readyz``.

The endpoint runs in a thread (prometheus_client's WSGI server), so a scrape never waits on
the event loop; it reads the worker's :class:`Health`, a few plain attributes the event
loop writes. ``/healthz`` is liveness: the event loop has ticked recently. ``/readyz`` is
readiness: connected to RabbitMQ and PostgreSQL and holding at least one consumer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.samples import Sample

LIVENESS_STALE_SECONDS = 30.0
#: Problems that make the worker unready even while it is connected and consuming.
BLOCKING = frozenset({"dead_letter"})

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


@dataclass
class Health:
    """What the probes read. Written by the event loop, read by the HTTP thread."""

    broker_connected: bool = False
    database_ok: bool = False
    consumers: int = 0
    last_tick: float = field(default_factory=time.monotonic)
    stopping: bool = False
    problems: dict[str, str] = field(default_factory=dict)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    @property
    def live(self) -> bool:
        return time.monotonic() - self.last_tick < LIVENESS_STALE_SECONDS

    @property
    def ready(self) -> bool:
        return (
            self.broker_connected
            and self.database_ok
            and self.consumers > 0
            and not self.stopping
            and not BLOCKING.intersection(self.problems)
        )

    def report(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "broker_connected": self.broker_connected,
            "database_ok": self.database_ok,
            "consumers": self.consumers,
            "stopping": self.stopping,
            "problems": dict(self.problems),
        }


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def make_app(
    metrics: Metrics, health: Health
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok = health.live
            return _json(start_response, 200 if ok else 503, {"live": ok})
        if path == "/readyz":
            report = health.report()
            return _json(start_response, 200 if report["ready"] else 503, report)
        if path == "/metrics":
            metrics.ready.set(1 if health.ready else 0)
            return prometheus(environ, start_response)  # type: ignore[no-any-return]
        return _json(
            start_response,
            404,
            {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]},
        )

    return app


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> list[bytes]:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    payload = orjson.dumps(body)
    start_response(
        f"{status} {reason}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
    )
    return [payload]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """The HTTP endpoint in a daemon thread; ``port=0`` picks a free port."""

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        self._server = make_server(
            host,
            port,
            make_app(metrics, health),
            server_class=ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="prompter-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
