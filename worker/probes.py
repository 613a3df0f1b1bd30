"""The worker's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

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
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from worker.metrics import Metrics

LIVENESS_STALE_SECONDS = 30.0
#: Problems that make the worker unready even while it is connected and consuming.
BLOCKING = frozenset({"dead_letter"})


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
