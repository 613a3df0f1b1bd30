"""The dead-letter queue: ``dead-letters list | redrive | purge``.

Two kinds of message end up in ``prompter.ingest.dead``:

- copies the worker made of events it refused, with ``x-error-reason``,
  ``x-error-detail``, ``x-failed-at``, ``x-original-routing-key`` and friends;
- messages the broker itself dead-lettered (a message that exceeded the delivery limit),
  which carry ``x-death`` (reason ``delivery_limit``, or ``rejected``, ``expired``,
  ``maxlen``) and no ``x-error-reason``.

Nothing here consumes what it does not mean to remove. Messages are taken with
``basic.get`` without acknowledgement: what is only looked at, or not selected, is held
unacknowledged until the scan ends and then handed back with ``basic.nack(requeue)``, so
the queue keeps every message, body and headers untouched. (RabbitMQ 4.0 to 4.2 count such
a return as a delivery attempt against a quorum queue's delivery limit, which defaults to
20 there; on those versions give the dead-letter queue an explicit ``x-delivery-limit`` by
policy before listing it many times.)

**Redrive** republishes a selected message's body and properties, without the
dead-lettering headers, to the main exchange with its original routing key, mandatory and
confirmed, and acknowledges the dead-letter copy only once that confirm is in. An
interruption at any point loses nothing: an unacknowledged copy returns to the queue, and a
message republished twice is stored once (ingestion is idempotent). ``x-redrive-count``
counts how many times a message went round, so a loop shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast

import aiormq
import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec

from worker import broker
from worker.config import Settings
from worker.errors import BrokerUnavailable, ConfigError, WorkerError
from worker.publisher import (
    BROKER_ERRORS,
    DEFAULT_CONFIRM_TIMEOUT,
    DEFAULT_WINDOW,
    publish_confirmed,
)

DEFAULT_LIST_LIMIT: Final = 1000
REDRIVE_COUNT: Final = "x-redrive-count"
#: Headers that describe a dead-lettering, dropped from a redriven message.
DEAD_LETTER_HEADERS: Final = frozenset(
    {
        "x-error-reason",
        "x-error-detail",
        "x-failed-at",
        "x-worker-version",
        "x-original-exchange",
        "x-original-routing-key",
        "x-raw-properties",
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        "x-last-death-reason",
        "x-last-death-queue",
        "x-last-death-exchange",
        "x-delivery-count",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """What a dead-lettered message says about itself (never its body)."""

    event_id: str | None  # the message id
    reason: str
    detail: str
    failed_at: str | None
    routing_key: str  # the routing key it had, and gets again when redriven
    by: str  # "worker" (x-error-reason) or "broker" (x-death)
    redrives: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def describe(message: aiormq.abc.DeliveredMessage) -> DeadLetter:
    """Reason, detail, time and original routing key of one dead-lettered message."""
    props = message.header.properties
    headers: Mapping[str, Any] = props.headers or {}
    frame = cast(spec.Basic.GetOk, message.delivery)
    redrives = headers.get(REDRIVE_COUNT)
    redrives = redrives if isinstance(redrives, int) else 0
    reason = _text(headers.get("x-error-reason"))
    if reason:
        routing_key = _text(headers.get("x-original-routing-key")) or frame.routing_key or ""
        return DeadLetter(
            event_id=props.message_id,
            reason=reason,
            detail=_text(headers.get("x-error-detail")) or "",
            failed_at=_text(headers.get("x-failed-at")),
            routing_key=routing_key or broker.LIVE_ROUTING_KEY,
            by="worker",
            redrives=redrives,
        )
    deaths = headers.get("x-death")
    death: Mapping[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
    reason = _text(death.get("reason")) or _text(headers.get("x-first-death-reason"))
    queue = _text(death.get("queue")) or _text(headers.get("x-first-death-queue")) or "?"
    count = death.get("count")
    keys = death.get("routing-keys")
    original = _text(keys[0]) if isinstance(keys, list) and keys else None
    if reason:
        times = f", {count} times" if isinstance(count, int) and count > 1 else ""
        detail = f"dead-lettered by the broker from queue {queue} ({reason}{times})"
    else:
        reason, detail = "unknown", "no x-error-reason or x-death header"
    when = death.get("time") or props.timestamp
    return DeadLetter(
        event_id=props.message_id,
        reason=reason,
        detail=detail,
        failed_at=_text(when),
        routing_key=original or frame.routing_key or broker.LIVE_ROUTING_KEY,
        by="broker",
        redrives=redrives,
    )


def redriven_properties(props: spec.Basic.Properties) -> spec.Basic.Properties:
    """The message's own properties again, without the dead-lettering headers; persistent,
    no expiry, no user id (the broker checks it against the publishing user)."""
    headers = {k: v for k, v in (props.headers or {}).items() if k not in DEAD_LETTER_HEADERS}
    previous = headers.get(REDRIVE_COUNT)
    headers[REDRIVE_COUNT] = (previous if isinstance(previous, int) else 0) + 1
    return broker.republished_properties(props, headers)


# --- connecting -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connected(settings: Settings, name: str) -> Any:
    connection = await broker.connect(settings.amqp_url, name=name)
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=10)


async def _depth(connection: aiormq.Connection, queue: str) -> int:
    channel = await connection.channel()  # a failed passive declare closes its channel
    try:
        ok = await channel.queue_declare(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise ConfigError(
            f"the dead-letter queue {queue!r} does not exist (has a worker or publisher with "
            "these settings ever run?)"
        ) from None
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"cannot inspect queue {queue!r}: {exc}") from None
    with contextlib.suppress(Exception):
        await channel.close()
    return int(ok.message_count or 0)


async def _get(
    channel: aiormq.abc.AbstractChannel, queue: str
) -> aiormq.abc.DeliveredMessage | None:
    try:
        message = await channel.basic_get(queue, no_ack=False)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"reading {queue!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(message.delivery, spec.Basic.GetEmpty):
        return None
    return message


async def _give_back(channel: aiormq.abc.AbstractChannel, last_tag: int) -> None:
    """Return every message still unacknowledged on ``channel`` to the queue, untouched."""
    if last_tag and not channel.is_closed:
        with contextlib.suppress(*BROKER_ERRORS):
            await channel.basic_nack(last_tag, multiple=True, requeue=True)
    with contextlib.suppress(Exception):
        await channel.close()  # returns anything the nack missed, too


# --- list -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Listing:
    queue: str
    depth: int  # messages in the queue when listing began
    messages: list[DeadLetter] = field(default_factory=list)

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(m.reason for m in self.messages).most_common())

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "depth": self.depth,
            "listed": len(self.messages),
            "by_reason": self.by_reason,
            "messages": [m.as_dict() for m in self.messages],
        }


async def list_dead_letters(settings: Settings, *, limit: int = DEFAULT_LIST_LIMIT) -> Listing:
    """The first ``limit`` messages of the dead-letter queue, described; none is removed."""
    queue = settings.dead_letter_queue
    async with _connected(settings, "prompter-worker dead-letters list") as connection:
        listing = Listing(queue=queue, depth=await _depth(connection, queue))
        channel = await connection.channel()
        last_tag = 0
        try:
            while len(listing.messages) < limit:
                message = await _get(channel, queue)
                if message is None:
                    break
                last_tag = message.delivery_tag or last_tag
                listing.messages.append(describe(message))
        finally:
            await _give_back(channel, last_tag)
    return listing


def render_listing(listing: Listing) -> str:
    lines = [f"{'event_id':36}  {'reason':26}  {'failed at':25}  detail"]
    for m in listing.messages:
        lines.append(
            f"{(m.event_id or '-')[:36]:36}  {m.reason[:26]:26}  {(m.failed_at or '-')[:25]:25}"
            f"  {m.detail}"
        )
    shown = len(listing.messages)
    more = f" (the first {shown:,} listed)" if shown < listing.depth else ""
    lines.append(f"{listing.depth:,} messages in {listing.queue}{more}")
    if listing.messages:
        lines.append("by reason: " + ", ".join(f"{r} {n:,}" for r, n in listing.by_reason.items()))
    return "\n".join(lines)


# --- redrive --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which dead letters to redrive: those matching every given filter (none: all), at
    most ``limit`` of them."""

    reasons: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        return not self.event_ids or (letter.event_id or "").lower() in self.event_ids


@dataclass(kw_only=True)
class RedriveReport:
    queue: str
    exchange: str
    redriven: list[DeadLetter] = field(default_factory=list)
    kept: int = 0  # looked at, not selected: back in the queue
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # back in the queue
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "exchange": self.exchange,
            "redriven": len(self.redriven),
            "redriven_by_reason": dict(Counter(d.reason for d in self.redriven).most_common()),
            "kept": self.kept,
            "failed": [{**d.as_dict(), "error": e} for d, e in self.failed],
            "error": self.error,
        }


def render_redrive(report: RedriveReport) -> str:
    lines = [f"{d.event_id}: {error}" for d, error in report.failed[:20]]
    if len(report.failed) > 20:
        lines.append(f"... and {len(report.failed) - 20:,} more failures")
    counts = Counter(d.reason for d in report.redriven).most_common()
    detail = f" ({', '.join(f'{r} {n:,}' for r, n in counts)})" if counts else ""
    lines.append(
        f"redrove {len(report.redriven):,} messages{detail} from {report.queue} to "
        f"{report.exchange}; {report.kept:,} not selected and {len(report.failed):,} failed "
        "stay in the queue"
    )
    return "\n".join(lines)


async def redrive(
    settings: Settings,
    selection: Selection,
    *,
    window: int = DEFAULT_WINDOW,
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
) -> RedriveReport:
    """Republish the selected dead letters to the main exchange (confirmed), acknowledging
    each dead-letter copy only after its confirm. Everything not redriven stays queued."""
    queue, exchange = settings.dead_letter_queue, settings.exchange
    report = RedriveReport(queue=queue, exchange=exchange)
    async with _connected(settings, "prompter-worker dead-letters redrive") as connection:
        depth = await _depth(connection, queue)
        await broker.open_topology(
            connection, broker.Topology.from_settings(settings), passive=not settings.declare
        )
        getter = await connection.channel()
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        slots = asyncio.Semaphore(window)
        tasks: set[asyncio.Task[None]] = set()
        in_flight: dict[str, asyncio.Task[None]] = {}  # returns are matched by message id
        last_tag = 0
        seen = selected = 0

        async def move(message: aiormq.abc.DeliveredMessage, letter: DeadLetter) -> None:
            try:
                await publish_confirmed(
                    publisher,
                    message.body,
                    exchange=exchange,
                    routing_key=letter.routing_key,
                    props=redriven_properties(message.header.properties),
                    confirm_timeout=confirm_timeout,
                )
                await getter.basic_ack(message.delivery_tag or 0)
            except WorkerError as exc:
                report.failed.append((letter, str(exc)))
            except BROKER_ERRORS as exc:  # the ack: the copy returns, redriven twice is fine
                report.failed.append((letter, f"acknowledging failed: {exc}"))
            else:
                report.redriven.append(letter)
            finally:
                slots.release()

        try:
            # Every message is looked at once: the unselected stay unacknowledged (so
            # basic.get moves on past them) until the end. ``depth`` bounds the scan, so
            # messages dead-lettered meanwhile wait for the next run.
            while seen < depth and (selection.limit is None or selected < selection.limit):
                if publisher.is_closed or getter.is_closed:
                    break  # the failures say why
                message = await _get(getter, queue)
                if message is None:
                    break
                seen += 1
                last_tag = message.delivery_tag or last_tag
                letter = describe(message)
                if not selection.matches(letter):
                    report.kept += 1
                    continue
                selected += 1
                earlier = in_flight.get(letter.event_id or "")
                if earlier is not None:
                    await asyncio.wait([earlier])
                await slots.acquire()
                task = asyncio.create_task(move(message, letter))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if letter.event_id:
                    in_flight[letter.event_id] = task
                    task.add_done_callback(functools.partial(_forget, in_flight, letter.event_id))
        except WorkerError as exc:
            report.error = str(exc)
        finally:
            if tasks:
                await asyncio.wait(set(tasks))
            await _give_back(getter, last_tag)
            with contextlib.suppress(Exception):
                await publisher.close()
    if report.failed and report.error is None:
        report.error = f"{len(report.failed):,} messages could not be redriven"
    return report


def _forget(in_flight: dict[str, asyncio.Task[None]], key: str, task: asyncio.Task[None]) -> None:
    if in_flight.get(key) is task:
        del in_flight[key]


# --- purge ----------------------------------------------------------------------------------


async def depth(settings: Settings) -> int:
    """Messages ready in the dead-letter queue."""
    async with _connected(settings, "prompter-worker dead-letters") as connection:
        return await _depth(connection, settings.dead_letter_queue)


async def purge(settings: Settings) -> int:
    """Delete every ready message of the dead-letter queue; how many were deleted."""
    queue = settings.dead_letter_queue
    async with _connected(settings, "prompter-worker dead-letters purge") as connection:
        await _depth(connection, queue)  # a clear error if it does not exist
        channel = await connection.channel()
        try:
            ok = await channel.queue_purge(queue)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"purging {queue!r} failed: {exc}") from None
        with contextlib.suppress(Exception):
            await channel.close()
    return int(ok.message_count or 0)
