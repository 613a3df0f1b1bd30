"""Where one event is: both sides asked at once (:func:`trace`), the answer as a
:class:`Trace`, its state and its one-sentence summary."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Final

from worker.backfill.reports import plural
from worker.commands.deadletters import DeadLetter
from worker.commands.status import QueueStatus
from worker.commands.trace.database import StoredEvent, look_up_stored
from worker.commands.trace.queues import look_in_broker
from worker.config import Settings
from worker.errors import WorkerError
from worker.security import mask_url

DEFAULT_DEAD_LETTER_LIMIT: Final = 10_000

STORED: Final = "stored"
DEAD_LETTERED: Final = "dead_lettered"
WAITING: Final = "waiting"
NOT_FOUND: Final = "not_found"
UNKNOWN: Final = "unknown"  # a server could not be read, and the other did not have it


@dataclass(frozen=True, kw_only=True)
class Trace:
    """Everything found about one event, and what could not be looked at."""

    event_id: str
    database: str  # masked URL
    broker: str  # masked URL
    stored: StoredEvent | None = None
    dead_letters: tuple[DeadLetter, ...] = ()  # its copies in the dead-letter queue
    dead_letter_queue: QueueStatus | None = None
    dead_letters_scanned: int = 0
    queues: tuple[QueueStatus, ...] = ()  # the live and the replay queue
    errors: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        if self.stored is not None:
            return STORED
        if self.dead_letters:
            return DEAD_LETTERED
        if self.errors:
            return UNKNOWN
        if any(q.ready for q in self.queues):
            return WAITING
        return NOT_FOUND

    @property
    def dead_letter_scan_complete(self) -> bool:
        dlq = self.dead_letter_queue
        return dlq is None or dlq.ready is None or self.dead_letters_scanned >= dlq.ready

    def summary(self) -> str:
        """One sentence: where the event is."""
        state = self.state
        if state == STORED:
            return "stored"
        if state == DEAD_LETTERED:
            first = self.dead_letters[0]
            return f"dead-lettered ({first.reason})"
        if state == WAITING:
            return f"not stored yet; {waiting_in_queues(self.queues)}"
        if state == UNKNOWN:
            return "unknown: " + "; ".join(self.errors)
        return "not seen anywhere"

    def as_dict(self) -> dict[str, Any]:
        dlq = self.dead_letter_queue
        return {
            "event_id": self.event_id,
            "state": self.state,
            "summary": self.summary(),
            "stored": self.stored.as_dict() if self.stored else None,
            "dead_letters": [d.as_dict() for d in self.dead_letters],
            "dead_letter_queue": {
                "name": dlq.name if dlq else None,
                "ready": dlq.ready if dlq else None,
                "scanned": self.dead_letters_scanned,
                "complete": self.dead_letter_scan_complete,
            },
            "queues": [
                {"name": q.name, "ready": q.ready, "consumers": q.consumers} for q in self.queues
            ],
            "queues_browsed": False,
            "database": self.database,
            "broker": self.broker,
            "errors": list(self.errors),
        }


def waiting_in_queues(queues: tuple[QueueStatus, ...]) -> str:
    parts = []
    for q in queues:
        if q.ready is None:
            parts.append(f"{q.name} does not exist")
        else:
            parts.append(f"{plural(q.ready, 'message')} waiting in {q.name}")
    return ", ".join(parts)


def canonical_event_id(value: str) -> str:
    """The event id in the form the database stores (lowercase 8-4-4-4-12); ValueError if
    ``value`` is not a UUID."""
    return str(uuid.UUID(value))


async def trace(
    settings: Settings, event_id: str, *, dead_letter_limit: int = DEFAULT_DEAD_LETTER_LIMIT
) -> Trace:
    """Where ``event_id`` is. A server that cannot be reached is reported in ``errors``,
    never raised: what the other one says is still worth having."""
    event_id = canonical_event_id(event_id)
    found, view = await asyncio.gather(
        look_up_stored(settings, event_id),
        look_in_broker(settings, event_id, dead_letter_limit),
        return_exceptions=True,
    )
    errors: list[str] = []
    stored: StoredEvent | None = None
    if isinstance(found, BaseException):
        errors.append(_error("database", found))
    else:
        stored = found
    result = Trace(
        event_id=event_id,
        database=mask_url(settings.database_url),
        broker=mask_url(settings.amqp_url),
        stored=stored,
    )
    if isinstance(view, BaseException):
        errors.append(_error("broker", view))
        return dataclasses.replace(result, errors=tuple(errors))
    return dataclasses.replace(
        result,
        dead_letters=view.dead_letters,
        dead_letter_queue=view.dead_letter_queue,
        dead_letters_scanned=view.scanned,
        queues=view.queues,
        errors=tuple(errors),
    )


def _error(server: str, exc: BaseException) -> str:
    if isinstance(exc, WorkerError):
        return str(exc)
    if isinstance(exc, Exception):
        return f"{server}: {type(exc).__name__}: {exc}"
    raise exc  # KeyboardInterrupt, CancelledError: not ours to swallow
