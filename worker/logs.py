"""Logging: one JSON object per line when not on a terminal, readable text on one.

Structured fields go in ``extra={"event_id": ..., "reason": ...}``; both formats print them.
Every message and field passes through :func:`redact` so a URL with a password that slips
into a log line (an exception from a driver, say) is masked before it is written.

Payloads never reach a log: the AMQP client (aiormq) logs whole messages and frames in some
paths (a returned message it cannot match, at ERROR; every frame sent or received, at
DEBUG). :class:`PayloadFilter` replaces each such object in its records with a summary
(sizes, message id, routing key) before any handler sees them. :func:`guard_amqp_loggers`
installs it on aiormq's loggers; :func:`configure` calls it and also puts it on its handler,
and importing :mod:`worker.publisher` calls it, so services that use the publisher library
with their own logging setup are covered too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import DeliveryError
from pamqp.body import ContentBody

from worker import security

# Attributes every LogRecord has; anything else came from ``extra=`` and is a field.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def redact(text: str) -> str:
    """Mask passwords in URLs and ``password=...`` pairs found anywhere in ``text``: the
    rule of every other output (:func:`worker.security.redact`), so they never disagree."""
    return security.redact(text)


#: The loggers aiormq writes to (module loggers, and one child it makes by name).
AMQP_LOGGERS: Final = (
    "aiormq",
    "aiormq.abc",
    "aiormq.auth",
    "aiormq.base",
    "aiormq.channel",
    "aiormq.connection",
    "aiormq.connection.marshall",
    "aiormq.tools",
)


def _summary(value: Any) -> Any:
    """``value`` itself, or a summary without its bytes if it carries a payload."""
    if isinstance(value, DeliveredMessage):
        props = value.header.properties
        return (
            f"<message id={props.message_id!r} exchange={value.exchange!r} "
            f"routing_key={value.routing_key!r}, body of {len(value.body)} bytes not logged>"
        )
    if isinstance(value, ChannelFrame):
        return f"<frames of {len(value.payload)} bytes, not logged>"
    if isinstance(value, ContentBody):
        return f"<content body of {len(value.value)} bytes, not logged>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes, not logged>"
    if isinstance(value, DeliveryError):
        return f"<{type(value).__name__}, its message not logged>"
    if isinstance(value, (list, tuple)) and any(map(_carries, value)):
        return [_summary(v) for v in value]
    return value


def _carries(value: Any) -> bool:
    if isinstance(value, (DeliveredMessage, ChannelFrame, ContentBody, bytes, bytearray)):
        return True
    if isinstance(value, (memoryview, DeliveryError)):
        return True
    if isinstance(value, (list, tuple)):
        return any(map(_carries, value))
    return False


def _exception_carries(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:  # the cause/context chain, bounded
        if any(map(_carries, exc.args)) or isinstance(exc, DeliveryError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class PayloadFilter(logging.Filter):
    """Keeps message bodies out of the AMQP client's log records: each argument that
    carries one (a delivered or returned message, a frame, raw bytes, an exception holding
    a message) becomes a summary; an exception that holds one loses its traceback and is
    named instead. Records of other loggers pass untouched; none is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiormq"):
            return True
        args = record.args
        if isinstance(args, tuple) and any(map(_carries, args)):
            record.args = tuple(_summary(a) for a in args)
        elif isinstance(args, Mapping) and any(map(_carries, args.values())):
            record.args = {k: _summary(v) for k, v in args.items()}
        if _carries(record.msg):
            record.msg = str(_summary(record.msg))
        if record.exc_info and _exception_carries(record.exc_info[1]):
            name = type(record.exc_info[1]).__name__
            record.msg = f"{record.msg} ({name}; its message is not logged)"
            record.exc_info = None
            record.exc_text = None
        return True


PAYLOAD_FILTER: Final = PayloadFilter()


def guard_amqp_loggers() -> None:
    """Put :data:`PAYLOAD_FILTER` on every aiormq logger (idempotent). A logger's filters
    see only the records made on that very logger, hence one per module logger."""
    names = set(AMQP_LOGGERS)
    names.update(n for n in list(logging.root.manager.loggerDict) if n.startswith("aiormq."))
    for name in names:
        logging.getLogger(name).addFilter(PAYLOAD_FILTER)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _fields(record).items():
            out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: message key=value ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        if extra:
            line += "  " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Install one handler on the root logger (replacing any), in the chosen format."""
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    guard_amqp_loggers()
    handler = logging.StreamHandler(stream)
    handler.addFilter(PAYLOAD_FILTER)  # also any aiormq logger made after this call
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The AMQP client logs every reconnect attempt with a traceback at ERROR/WARNING;
    # the worker logs those events itself, once, in its own words.
    for noisy in ("aiormq", "aio_pika", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # It logs every failed connection attempt at ERROR; the worker reports those itself,
    # once, with the node's URL masked.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
