"""``dead-letters purge``: delete the whole dead-letter queue, or only a selection of it
(acknowledged; the rest stay queued)."""

from __future__ import annotations

from worker.amqp import protocol as amqp
from worker.commands.deadletters.letters import DeadLetter
from worker.commands.deadletters.reading import QUERY_CHANNEL, READ_CHANNEL, Reader, reading
from worker.commands.deadletters.scan import DEFAULT_WINDOW, RedriveReport, Selection, scan
from worker.config import Settings
from worker.errors import BrokerUnavailable


async def purge_selected(settings: Settings, selection: Selection) -> RedriveReport:
    """Delete the selected dead letters (acknowledge them); the rest stay queued."""
    report = RedriveReport(queue=settings.dead_letter_queue, exchange="", purge=True)

    async def act(delivery: amqp.Delivery, letter: DeadLetter, reader: Reader) -> None:
        try:
            reader.connection.ack(READ_CHANNEL, delivery.delivery_tag, multiple=False)
        except amqp.AMQPError as exc:
            report.failed.append((letter, f"acknowledging failed: {exc}"))
            return
        report.redriven.append(letter)

    await scan(settings, selection, report, act, window=DEFAULT_WINDOW, name="purge")
    return report


async def purge(settings: Settings) -> int:
    """Delete every ready message of the dead-letter queue; how many were deleted."""
    queue = settings.dead_letter_queue
    async with reading(settings, "prompter-worker dead-letters purge", prefetch=0) as reader:
        try:
            return await reader.connection.purge(QUERY_CHANNEL, queue)
        except amqp.AMQPError as exc:
            raise BrokerUnavailable(f"purging {queue!r} failed: {exc}") from None
