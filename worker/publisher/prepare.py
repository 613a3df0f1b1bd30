"""What a publisher sends: new event ids (UUIDv7), and events checked against the v1
contract and held as their exact JSON bytes, before anything reaches the broker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import uuid_utils

from worker import events
from worker.errors import Rejection
from worker.events import Event

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

EventInput = Mapping[str, Any] | bytes | bytearray | memoryview


def new_event_id(at: datetime | None = None) -> str:
    """A new ``event_id``: a UUIDv7 (RFC 9562) as a canonical lowercase string.

    Its first 48 bits are the Unix time in milliseconds (now, or ``at``, which must be
    timezone-aware and not before 1970), the rest random; ids made in one process are
    strictly increasing. Time-ordered keys are appended at the right edge of the
    ``prompt_results`` primary-key index, where random (v4) keys land on any page of it, so
    that the pages an insert touches stay few and in memory as the table grows. The worker
    accepts any UUID: this is a recommendation, not a rule.
    """
    if at is None:
        return str(uuid_utils.uuid7())
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    delta = at - _EPOCH
    if delta.days < 0:
        raise ValueError("a UUIDv7 cannot hold a time before 1970")
    nanoseconds = (delta.days * 86_400 + delta.seconds) * 1_000_000_000
    return str(uuid_utils.uuid7(nanoseconds=nanoseconds + delta.microseconds * 1000))


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """An event checked against the contract and ready to send: its id and its bytes."""

    event_id: str
    body: bytes

    @classmethod
    def from_event(cls, event: Event) -> Prepared:
        """From an event :func:`worker.events.decode` accepted (its body is sent as is)."""
        return cls(event_id=event.event_id, body=event.body)


def prepare(event: EventInput, *, max_bytes: int = events.DEFAULT_MAX_EVENT_BYTES) -> Prepared:
    """Serialize (a dict, with orjson) and validate one event; raise
    :class:`~worker.errors.Rejection` if the worker would refuse it.

    Dict values may be ``str``, numbers, ``bool``, ``None``, lists, dicts, and also
    ``uuid.UUID`` and timezone-aware ``datetime`` (written as RFC 3339); a naive datetime is
    refused, since the contract needs an offset. orjson writes a float NaN or infinity as
    ``null``: send bytes to control that. Bytes are sent exactly as given.

    The body is kept at its exact size: orjson's output buffer is allocated for the worst
    case (about 16 KB for a 2 KB document), so it is copied once; ``bytes`` are kept as
    given (no copy), a ``bytearray`` or ``memoryview`` copied (it could change).
    """
    if isinstance(event, (bytes, bytearray, memoryview)):
        body = bytes(event)
    elif isinstance(event, Mapping):
        try:
            written = orjson.dumps(event if isinstance(event, dict) else dict(event))
        except TypeError as exc:
            raise Rejection(
                events.INVALID_JSON, f"the event cannot be written as JSON: {exc}"
            ) from None
        body = bytes(memoryview(written))  # exact size; ``bytes(written)`` is ``written``
    else:
        raise Rejection(
            events.NOT_AN_OBJECT,
            f"an event is a dict or JSON bytes, not {type(event).__name__}",
        )
    decoded = events.decode(body, max_bytes, columns=False)  # validated, sent as is
    if isinstance(decoded, Rejection):
        raise decoded
    return Prepared.from_event(decoded)
