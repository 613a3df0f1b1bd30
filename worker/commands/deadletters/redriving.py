"""``dead-letters redrive``: republish selected dead letters to the main exchange, and
acknowledge each dead-letter copy only once the broker confirmed its republish.

A redriven message is its body, and its property list without the dead-lettering headers,
with ``x-redrive-count`` one higher, published to the main exchange with its original
routing key, mandatory and confirmed. An interruption at any point loses nothing: an
unacknowledged copy returns to the queue, and a message republished twice is stored once
(ingestion is idempotent).
"""

from __future__ import annotations

import asyncio
from typing import Final

from worker.amqp import protocol as amqp
from worker.amqp.frames import Malformed, encode_entries
from worker.commands.deadletters.letters import REDRIVE_COUNT, DeadLetter
from worker.commands.deadletters.reading import READ_CHANNEL, Reader, connect
from worker.commands.deadletters.scan import DEFAULT_WINDOW, RedriveReport, Selection, scan
from worker.config import Settings
from worker.ingest.deadletter import RAW_PROPERTIES_HEADER, WORKER_HEADERS

DEFAULT_CONFIRM_TIMEOUT: Final = 30.0
#: Headers that describe a dead-lettering, dropped from a redriven message.
DEAD_LETTER_HEADERS: Final = frozenset(
    {
        *WORKER_HEADERS,
        RAW_PROPERTIES_HEADER,
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        "x-last-death-reason",
        "x-last-death-queue",
        "x-last-death-exchange",
        "x-delivery-count",
        "x-acquired-count",
    }
)
_DROPPED: Final = frozenset(h.encode() for h in (*DEAD_LETTER_HEADERS, REDRIVE_COUNT))
_PUBLISH_CHANNEL: Final = 1


def redriven_header(delivery: amqp.Delivery, redrives: int) -> bytes:
    """The message's own property list again, without the dead-lettering headers, with
    ``x-redrive-count``; persistent, no expiry, no user id (the broker checks it against
    the publishing user). Raises :class:`Malformed`."""
    props = delivery.properties.replace(
        delivery_mode=b"\x02", expiration=None, user_id=None, cluster_id=None
    )
    again = props.with_headers(_DROPPED, encode_entries([(REDRIVE_COUNT, redrives + 1)]))
    return again.build(len(delivery.body))


async def redrive(
    settings: Settings,
    selection: Selection,
    *,
    window: int = DEFAULT_WINDOW,
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
) -> RedriveReport:
    """Republish the selected dead letters to the main exchange (confirmed), acknowledging
    each dead-letter copy only after its confirm. Everything not redriven stays queued."""
    report = RedriveReport(queue=settings.dead_letter_queue, exchange=settings.exchange)
    publisher = await connect(settings, "prompter-worker dead-letters redrive (publish)")
    try:
        await publisher.open_publisher(_PUBLISH_CHANNEL)
        exchange = settings.exchange.encode()

        async def act(delivery: amqp.Delivery, letter: DeadLetter, reader: Reader) -> None:
            try:
                header = redriven_header(delivery, letter.redrives)
            except Malformed as exc:
                report.failed.append((letter, f"its properties cannot be republished: {exc}"))
                return
            confirmed = publisher.publish(
                _PUBLISH_CHANNEL,
                exchange=exchange,
                routing_key=letter.original_routing_key,
                header=header,
                body=delivery.body,
            )
            try:
                async with asyncio.timeout(confirm_timeout):
                    await confirmed
            except amqp.Returned:
                report.failed.append(
                    (letter, f"returned: nothing is bound for routing key {letter.routing_key!r}")
                )
                return
            except amqp.Nacked:
                report.failed.append((letter, "the broker nacked it (is the queue full?)"))
                return
            except (amqp.AMQPError, TimeoutError) as exc:
                report.failed.append((letter, f"not confirmed: {exc or 'timed out'}"))
                return
            try:
                reader.connection.ack(READ_CHANNEL, delivery.delivery_tag, multiple=False)
            except amqp.AMQPError as exc:  # the copy returns; redriven twice is harmless
                report.failed.append((letter, f"acknowledging failed: {exc}"))
                return
            report.redriven.append(letter)

        await scan(settings, selection, report, act, window=window, name="redrive")
    finally:
        await publisher.close()
    return report
