"""A message's trace context, read from the raw bytes of its content header: the links of
a batch span to the publishes of its messages (W3C Trace Context, version 00).

**Hostile headers.** A ``traceparent`` comes from whoever published the message. It is
read only as a long string of exactly 55 characters matching the W3C version 00 format
(an invalid one is ignored, never logged); a ``tracestate`` is kept only when every
member is well formed and it is at most 512 characters. Nothing a header holds can fail
a batch. A batch is linked to at most ``OTEL_SPAN_LINK_COUNT_LIMIT`` (default 128)
messages, the first that carry a context: the SDK would drop the others anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from opentelemetry.trace import Link

#: A ``traceparent`` entry of a headers table, up to its value: the key (a short string),
#: the long-string type and the length of a version 00 value (55).
_TRACEPARENT_ENTRY: Final = b"\x0btraceparentS\x00\x00\x00\x37"
#: A ``tracestate`` entry, up to its value's length.
_TRACESTATE_KEY: Final = b"\x0atracestateS"
_TRACEPARENT_RE: Final = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
#: The SDK's default limit of links per span.
DEFAULT_LINKS: Final = 128
_MAX_TRACESTATE: Final = 512
_KEY = r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER_RE: Final = re.compile(rf"[ \t]*{_KEY}={_VALUE}[ \t]*")


def link_limit(environ: Mapping[str, str] | None = None) -> int:
    """Links one span keeps: the SDK's ``OTEL_SPAN_LINK_COUNT_LIMIT`` (default 128). A
    batch is linked to its first messages that carry a context, up to this many; the
    others are not even read."""
    raw = (os.environ if environ is None else environ).get("OTEL_SPAN_LINK_COUNT_LIMIT", "")
    try:
        return max(int(raw), 0) if raw.strip() else DEFAULT_LINKS
    except ValueError:
        return DEFAULT_LINKS


def links(headers: Iterable[bytes], limit: int) -> list[Link]:
    """A link to the context of each content header that carries a valid ``traceparent``
    (raw content header payloads, as delivered), at most ``limit``; the others are
    skipped."""
    from opentelemetry.trace import Link  # noqa: PLC0415

    out: list[Link] = []
    if limit <= 0:
        return out
    for header in headers:
        context = extract(header)
        if context is not None:
            out.append(Link(context))
            if len(out) >= limit:
                break
    return out


def extract(header: bytes) -> Any:
    """The remote span context a content header's ``traceparent`` names, or None: absent,
    malformed, or anything unexpected (never raises, never logs).

    The headers table is not parsed: the entry is found by its bytes (key, long-string
    type, length 55), which costs a search instead of a parse per message. A publisher
    could hide those bytes inside another header's value; it then links its message to a
    context of its choosing, which it can do with a ``traceparent`` of its own anyway. The
    55 characters must match the W3C format exactly.
    """
    at = header.find(_TRACEPARENT_ENTRY)
    if at < 0:
        return None
    start = at + len(_TRACEPARENT_ENTRY)
    parent = header[start : start + 55]
    state = None
    at = header.find(_TRACESTATE_KEY)
    if at >= 0:
        start = at + len(_TRACESTATE_KEY)
        length = int.from_bytes(header[start : start + 4], "big")
        if length <= _MAX_TRACESTATE:
            state = header[start + 4 : start + 4 + length]
    try:
        return _context(parent, state)
    except (ValueError, UnicodeDecodeError):
        return None


def _context(parent: bytes, state: bytes | None) -> Any:
    if len(parent) != 55:
        return None
    match = _TRACEPARENT_RE.fullmatch(parent)
    if match is None:
        return None
    trace_id, span_id, flags = (int(g, 16) for g in match.groups())
    if trace_id == 0 or span_id == 0:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState  # noqa: PLC0415

    trace_state = None
    if state and len(state) <= _MAX_TRACESTATE and state.isascii():
        text = state.decode("ascii")
        members = [m for m in text.split(",") if m.strip(" \t")]
        if all(_MEMBER_RE.fullmatch(m) for m in members) and len(members) <= 32:
            keys = [m.strip(" \t").split("=", 1)[0] for m in members]
            if len(set(keys)) == len(keys):
                trace_state = TraceState.from_header([text])
    return SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=TraceFlags(flags & 0xFF),
        trace_state=trace_state,
    )
