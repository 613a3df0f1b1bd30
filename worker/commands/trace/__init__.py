"""``prompter-worker trace EVENT_ID``: where is this event? The database and the broker
are asked at the same time, each bounded; nothing is written.

``lookup`` asks both and holds the answer (:class:`Trace`); ``database`` finds the stored
row; ``queues`` looks at the queues and the dead-letter copies (and says why the live
queues are not browsed); ``text`` renders the answer. Every name below is imported from
``worker.commands.trace`` itself.
"""

from worker.commands.trace.database import (
    COMMIT_TIME_NEEDS_SELECT,
    COMMIT_TIME_UNRECORDED,
    COMMIT_TIME_UNTRACKED,
    QUERY_TIMEOUT_SECONDS,
    SQL,
    StoredEvent,
    find_stored,
)
from worker.commands.trace.lookup import (
    DEAD_LETTERED,
    DEFAULT_DEAD_LETTER_LIMIT,
    NOT_FOUND,
    STORED,
    UNKNOWN,
    WAITING,
    Trace,
    canonical_event_id,
    trace,
)
from worker.commands.trace.text import render

__all__ = [
    "COMMIT_TIME_NEEDS_SELECT",
    "COMMIT_TIME_UNRECORDED",
    "COMMIT_TIME_UNTRACKED",
    "DEAD_LETTERED",
    "DEFAULT_DEAD_LETTER_LIMIT",
    "NOT_FOUND",
    "QUERY_TIMEOUT_SECONDS",
    "SQL",
    "STORED",
    "UNKNOWN",
    "WAITING",
    "StoredEvent",
    "Trace",
    "canonical_event_id",
    "find_stored",
    "render",
    "trace",
]
