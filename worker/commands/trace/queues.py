"""The broker side of ``trace``: the depth and consumers of the live and replay queues,
and the event's copies among the first messages of the dead-letter queue.

The dead-letter queue's messages are looked at and handed back untouched
(:func:`worker.commands.deadletters.list_dead_letters`), matched by ``message_id``, which
the contract makes the ``event_id``. The live and replay queues are *not* browsed. Looking
at a message of a quorum queue means taking it (``basic.get``) and handing it back, and
RabbitMQ counts every hand-back as a delivery: the message's ``x-delivery-count`` grows,
from 2 the worker takes it for a message that may have killed its consumers and processes
it alone (slowly, on purpose), and after ``PROMPTER_DELIVERY_LIMIT`` deliveries the broker
dead-letters it. Browsing to answer "where is my event?" could itself push healthy events
into the dead-letter queue. It would not see much either: what the workers hold
unacknowledged (up to their prefetch) cannot be fetched, and AMQP does not tell a
message's position. So the answer for an event in neither place is "not stored yet; N
messages waiting in <queue>".
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.commands import deadletters
from worker.commands.deadletters import DeadLetter
from worker.commands.status import QueueStatus, queue_statuses
from worker.config import Settings
from worker.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class BrokerView:
    queues: tuple[QueueStatus, ...]
    dead_letter_queue: QueueStatus
    dead_letters: tuple[DeadLetter, ...]
    scanned: int


async def look_in_broker(settings: Settings, event_id: str, limit: int) -> BrokerView:
    live, replay, dead = await queue_statuses(settings, name="prompter-worker trace")
    copies: tuple[DeadLetter, ...] = ()
    scanned = 0
    if dead.ready:
        try:
            listing = await deadletters.list_dead_letters(settings, limit=limit)
        except ConfigError:  # deleted between the two looks: nothing to find there
            listing = deadletters.Listing(queue=dead.name, depth=0)
        scanned = len(listing.messages)
        copies = tuple(m for m in listing.messages if (m.event_id or "").lower() == event_id)
    return BrokerView(
        queues=(live, replay), dead_letter_queue=dead, dead_letters=copies, scanned=scanned
    )
