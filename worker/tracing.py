"""OpenTelemetry traces, opt-in: from a publish to the commit of the batch that stored it.

**When it is on.** Only with the ``otel`` extra installed (``pip install
'prompter-worker[otel]'``: the official ``opentelemetry-api``, ``-sdk`` and the OTLP/HTTP
exporter) *and* an exporter asked for through the standard variables:
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, or both comma-separated), or, when that is
unset, ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``.
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turns it off whatever else is
set. Off, nothing of OpenTelemetry is imported, and the hot path does nothing more than
before (one ``is None`` test per batch). The SDK reads the rest of its variables itself
(``OTEL_SERVICE_NAME``, default ``prompter-worker``; ``OTEL_RESOURCE_ATTRIBUTES``;
``OTEL_TRACES_SAMPLER``; ``OTEL_EXPORTER_OTLP_HEADERS``; ``OTEL_BSP_*``). The exporter
speaks OTLP over HTTP with protobuf; ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` is refused with
a clear error, since that exporter is not shipped.

A service that uses the publisher library and sets up OpenTelemetry itself needs none of
this: :func:`current` finds its tracer provider.

**What is recorded** (names in :data:`BATCH`, ...; see the README's Tracing section):

- the publisher (library, ``publish``, ``replay``, ``demo``): one PRODUCER span per
  message, ``publish <exchange>``, ended at the broker's confirm, whose context goes into
  the message's headers as W3C ``traceparent`` (and ``tracestate``);
- the worker: one CONSUMER span per batch, ``prompter.batch``, LINKED to the context of
  each message that carries one (a batch has many parents, so links, as the messaging
  conventions say), with its counts; under it ``prompter.ingest`` (one per attempt of the
  store's transaction) with a span per SQL statement, and ``prompter.dead_letter``;
- ``replay --direct``: ``prompter.replay.batch`` per batch, with the same children.

**Hostile headers**: see :mod:`worker.tracecontext`, which reads a message's context.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final

from worker import __version__
from worker.errors import ConfigError
from worker.tracecontext import DEFAULT_LINKS, extract, link_limit, links

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "BATCH",
    "DEAD_LETTER",
    "DEFAULT_LINKS",
    "INGEST",
    "REPLAY_BATCH",
    "SQL_PREFIX",
    "current",
    "end",
    "extract",
    "flush",
    "inject",
    "link_limit",
    "links",
    "setup",
    "span",
    "tracer_of",
    "wanted",
]

log = logging.getLogger(__name__)

#: Span names.
BATCH: Final = "prompter.batch"
INGEST: Final = "prompter.ingest"
DEAD_LETTER: Final = "prompter.dead_letter"
REPLAY_BATCH: Final = "prompter.replay.batch"
SQL_PREFIX: Final = "prompter.sql "

_EXPORTERS: Final = frozenset({"otlp", "console"})

_tracer: Tracer | None = None  # what setup() made; None: off (or not set up here)


def wanted(environ: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the environment asks for (empty: tracing off). Pure: imports
    nothing. Raises :class:`ConfigError` for an exporter or protocol not shipped."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw:
        names = [n.strip() for n in raw.split(",") if n.strip()]
        if "none" in names:
            return []
        unknown = sorted(set(names) - _EXPORTERS)
        if unknown:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not available here "
                "(otlp, console or none)"
            )
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        names = ["otlp"]
    else:
        return []
    if "otlp" in names:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(var, "").strip().lower()
            if protocol and protocol != "http/protobuf":
                raise ConfigError(
                    f"{var}={protocol}: only http/protobuf is supported (the OTLP/HTTP "
                    "exporter of the otel extra)"
                )
            if protocol:
                break
    return names


def setup(environ: Mapping[str, str] | None = None) -> Tracer | None:
    """Turn tracing on for this process if the environment asks for it (see the module
    docstring): a tracer provider with a batch span processor per exporter, set as the
    global one (it is flushed at exit). The tracer, or None when off. Idempotent."""
    global _tracer  # noqa: PLW0603 - one provider per process, as OpenTelemetry has
    if _tracer is not None:
        return _tracer
    names = wanted(environ)
    if not names:
        return None
    try:
        from opentelemetry import trace  # noqa: PLC0415 - only when asked for
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        log.warning(
            "OpenTelemetry is configured (OTEL_*) but not installed: tracing is off; "
            "install prompter-worker[otel]"
        )
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.version": __version__}).merge(
            Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME") or "prompter-worker"}
            )
        )
    )
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = tracer_of(provider)
    log.info("tracing on", extra={"exporters": names})
    return _tracer


def tracer_of(provider: TracerProvider | Any) -> Tracer:
    """The worker's tracer from ``provider`` (tests give their own)."""
    tracer: Tracer = provider.get_tracer("prompter-worker", __version__)
    return tracer


def current() -> Tracer | None:
    """The tracer to use by default: the one :func:`setup` made, else one from the
    application's own tracer provider if it set one; None (tracing off) otherwise, without
    importing OpenTelemetry if nothing imported it before."""
    if _tracer is not None:
        return _tracer
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace  # noqa: PLC0415 - already imported by the application

    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return tracer_of(provider)


def flush() -> None:
    """Export what is buffered (the worker calls it on its way out)."""
    if _tracer is None:
        return
    from opentelemetry import trace  # noqa: PLC0415

    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush(5000)


# -- the publisher's side --------------------------------------------------------------------


def inject(span: Span, headers: MutableMapping[str, Any]) -> None:
    """Put ``span``'s context into ``headers`` as W3C ``traceparent`` / ``tracestate``."""
    from opentelemetry.trace.propagation import set_span_in_context  # noqa: PLC0415
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(span))


def end(span: Span, done: asyncio.Future[None]) -> None:
    """End a message's PRODUCER span with its outcome (the exception's class only)."""
    if done.cancelled() or done.exception() is not None:
        from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

        what = "cancelled" if done.cancelled() else type(done.exception()).__name__
        span.set_status(Status(StatusCode.ERROR, what))
    span.end()


def span(
    tracer: Tracer | None, name: str, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Span | None]:
    """A child span of the current one, or nothing when ``tracer`` is None."""
    if tracer is None:
        return nullcontext()
    return _span(tracer, name, attributes)


@contextmanager
def _span(tracer: Tracer, name: str, attributes: Mapping[str, Any] | None) -> Iterator[Span]:
    """The span of a step; an exception marks it failed with the exception's class only
    (a database error's message may quote the data: it is neither recorded nor logged)."""
    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
