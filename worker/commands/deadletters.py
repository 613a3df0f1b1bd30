"""The dead-letter queue: ``dead-letters list | redrive | purge``.

Two kinds of message end up in ``prompter.ingest.dead``:

- copies the worker made of events it refused, with ``x-error-reason``,
  ``x-error-detail``, ``x-failed-at``, ``x-original-routing-key`` and friends
  (:mod:`worker.ingest.deadletter`);
- messages the broker itself dead-lettered (a message over the queue's delivery limit, or
  one a worker rejected unread because its body was too large to hold), which carry
  ``x-death`` and no ``x-error-reason``.

Whatever a message holds (a binary message id, header keys that are not UTF-8, a property
list that does not parse), it is read with the worker's own connection
(:mod:`worker.amqp.protocol`), its properties as raw bytes (:mod:`worker.amqp.frames`): it is listed
(text escaped, never decoded lossily for republishing), and it can be redriven or purged by
its key (its message id, or ``sha256:`` and the start of its body's hash when it has none).

Nothing here consumes what it does not mean to remove. The queue is read with a consumer
whose deliveries are not acknowledged: what is only looked at, or not selected, is handed
back when the connection closes, body and headers untouched. (RabbitMQ 4.0 to 4.2 count
such a return as a delivery attempt against a quorum queue's delivery limit, which
defaults to 20 there; the worker declares the dead-letter queue with ``x-delivery-limit:
-1`` on RabbitMQ 4.) The prefetch count is a 16-bit number, so one run looks at most at
:data:`MAX_HELD_BACK` messages it does not take; a larger selection is redriven or purged
by running the command again.

**Redrive** republishes a selected message (its body, and its property list without the
dead-lettering headers, with ``x-redrive-count`` one higher) to the main exchange with its
original routing key, mandatory and confirmed, and acknowledges the dead-letter copy only
once that confirm is in. An interruption at any point loses nothing: an unacknowledged copy
returns to the queue, and a message republished twice is stored once (ingestion is
idempotent). The first Ctrl-C (or SIGTERM) stops taking more, finishes the republishes in
flight and reports what was moved; a second stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from worker.amqp import broker
from worker.amqp import protocol as amqp
from worker.amqp.frames import Malformed, decode_table, encode_entries, table_entries
from worker.config import Settings
from worker.errors import BrokerUnavailable, ConfigError
from worker.ingest.deadletter import RAW_PROPERTIES_HEADER, WORKER_HEADERS
from worker.security import mask_url
from worker.signals import handle_signals

DEFAULT_LIST_LIMIT: Final = 1000
DEFAULT_WINDOW: Final = 256
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0
#: Messages a run may hold back unacknowledged (the 16-bit prefetch, less the window).
MAX_HELD_BACK: Final = 60_000
#: A read that brings nothing for this long means the queue has nothing more to give.
IDLE_SECONDS: Final = 5.0
REDRIVE_COUNT: Final = "x-redrive-count"
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
_READ_CHANNEL: Final = 1
_QUERY_CHANNEL: Final = 2
_PUBLISH_CHANNEL: Final = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """What a dead-lettered message says about itself (never its body)."""

    event_id: str | None  # the message id (invalid UTF-8 escaped)
    reason: str
    detail: str
    failed_at: str | None
    routing_key: str  # the routing key it had, and gets again when redriven
    by: str  # "worker" (x-error-reason), "broker" (x-death) or "unknown"
    redrives: int = 0
    key: str = ""  # how to name it for --id: its message id, or sha256:<hash of the body>
    size: int = 0  # body bytes
    original_routing_key: bytes = field(default=b"", repr=False)  # raw, for redrive

    def as_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "reason": self.reason,
            "detail": self.detail,
            "failed_at": self.failed_at,
            "routing_key": self.routing_key,
            "by": self.by,
            "redrives": self.redrives,
            "key": self.key,
            "size": self.size,
        }


def _key(message_id: str | None, body: bytes) -> str:
    return message_id or "sha256:" + hashlib.sha256(body).hexdigest()[:16]


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def describe(delivery: amqp.Delivery) -> DeadLetter:
    """Reason, detail, time and original routing key of one dead-lettered message."""
    body = delivery.body
    try:
        props = delivery.properties
        headers = decode_table(props.fields.get("headers", b""))
    except Malformed as exc:
        return DeadLetter(
            event_id=None,
            reason="invalid_properties",
            detail=f"its properties cannot be read ({exc}); purge or redrive it by key",
            failed_at=None,
            routing_key=delivery.routing_key or broker.LIVE_ROUTING_KEY,
            by="unknown",
            key=_key(None, body),
            size=len(body),
            original_routing_key=delivery.routing_key_raw,
        )
    message_id = props.text("message_id")
    redrives = headers.get(REDRIVE_COUNT)
    redrives = redrives if isinstance(redrives, int) else 0
    common: dict[str, Any] = {
        "event_id": message_id,
        "redrives": redrives,
        "key": _key(message_id, body),
        "size": len(body),
    }
    reason = _text(headers.get("x-error-reason"))
    if reason:
        raw_key = {k: v for k, _, v in table_entries(props.fields["headers"])}.get(
            b"x-original-routing-key", b""
        )
        raw_key = raw_key or delivery.routing_key_raw or broker.LIVE_ROUTING_KEY.encode()
        return DeadLetter(
            reason=reason,
            detail=_text(headers.get("x-error-detail")) or "",
            failed_at=_text(headers.get("x-failed-at")),
            routing_key=raw_key.decode("utf-8", "backslashreplace"),
            by="worker",
            original_routing_key=raw_key,
            **common,
        )
    deaths = headers.get("x-death")
    death: dict[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]
    reason = _text(death.get("reason")) or _text(headers.get("x-first-death-reason"))
    queue = _text(death.get("queue")) or _text(headers.get("x-first-death-queue")) or "?"
    count = death.get("count")
    keys = death.get("routing-keys")
    original = _text(keys[0]) if isinstance(keys, list) and keys else None
    if reason:
        times = f", {count} times" if isinstance(count, int) and count > 1 else ""
        detail = f"dead-lettered by the broker from queue {queue} ({reason}{times})"
        if reason == "rejected":
            detail += (
                f"; a worker rejects unread a body too large to hold (this one is "
                f"{len(body):,} bytes)"
            )
    else:
        reason, detail = "unknown", "no x-error-reason or x-death header"
    when = death.get("time")
    if not isinstance(when, int):
        raw_time = props.fields.get("timestamp")
        when = int.from_bytes(raw_time, "big") if raw_time else None
    routing_key = (
        original.encode() if original else delivery.routing_key_raw
    ) or broker.LIVE_ROUTING_KEY.encode()
    return DeadLetter(
        reason=reason,
        detail=detail,
        failed_at=None if when is None else datetime.fromtimestamp(when, UTC).isoformat(),
        routing_key=routing_key.decode("utf-8", "backslashreplace"),
        by="broker",
        original_routing_key=routing_key,
        **common,
    )


def redriven_header(delivery: amqp.Delivery, redrives: int) -> bytes:
    """The message's own property list again, without the dead-lettering headers, with
    ``x-redrive-count``; persistent, no expiry, no user id (the broker checks it against
    the publishing user). Raises :class:`Malformed`."""
    props = delivery.properties.replace(
        delivery_mode=b"\x02", expiration=None, user_id=None, cluster_id=None
    )
    again = props.with_headers(_DROPPED, encode_entries([(REDRIVE_COUNT, redrives + 1)]))
    return again.build(len(delivery.body))


# --- reading the queue ----------------------------------------------------------------------


class _Reader:
    """A consumer on the dead-letter queue that acknowledges only what it is told to."""

    def __init__(self, connection: amqp.Connection, depth: int) -> None:
        self.connection = connection
        self.depth = depth
        self.arrived: asyncio.Queue[amqp.Delivery] = asyncio.Queue()

    async def next(self) -> amqp.Delivery | None:
        """The next delivery, or None once the queue gives nothing for a while or the
        connection closed (``connection.closed`` then says why)."""
        if self.connection.closed.done() and self.arrived.empty():
            return None
        try:
            async with asyncio.timeout(IDLE_SECONDS):
                getter = asyncio.ensure_future(self.arrived.get())
                closed = asyncio.ensure_future(_settled(self.connection.closed))
                try:
                    await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                if getter.done():
                    return getter.result()
                getter.cancel()
                return None
        except TimeoutError:
            return None


@contextlib.asynccontextmanager
async def _reading(settings: Settings, name: str, prefetch: int) -> AsyncIterator[_Reader]:
    """Connect, learn the queue's depth, consume it unacknowledged; closing the connection
    afterwards hands back everything not acknowledged."""
    queue = settings.dead_letter_queue
    reader: _Reader | None = None

    def on_delivery(delivery: amqp.Delivery) -> None:
        if reader is not None:
            reader.arrived.put_nowait(delivery)

    connection = await _connect(settings, name, on_delivery)
    try:
        try:
            await connection.open_plain(_QUERY_CHANNEL)
            depth, _ = await connection.queue_depth(_QUERY_CHANNEL, queue)
        except amqp.AMQPError as exc:
            if "404" in str(exc):
                raise ConfigError(
                    f"the dead-letter queue {queue!r} does not exist (has a worker or "
                    "publisher with these settings ever run?)"
                ) from None
            raise BrokerUnavailable(f"cannot inspect queue {queue!r}: {exc}") from None
        reader = _Reader(connection, depth)
        if depth and prefetch > 0:
            try:
                await connection.open_channel(_READ_CHANNEL, max(1, min(prefetch, 65_535)))
                await connection.consume(_READ_CHANNEL, queue)
            except amqp.AMQPError as exc:
                raise BrokerUnavailable(f"reading {queue!r} failed: {exc}") from None
        yield reader
    finally:
        await connection.close()


async def _connect(
    settings: Settings, name: str, on_delivery: Callable[[amqp.Delivery], None] = lambda _: None
) -> amqp.Connection:
    """The first node of AMQP_URL that answers (see :func:`worker.amqp.broker.connect`)."""
    failures = []
    for url in settings.amqp_url.split(","):
        try:
            return await amqp.connect(url, on_delivery, name=name)
        except (amqp.AMQPError, OSError, TimeoutError) as exc:
            failures.append(f"{mask_url(url)}: {type(exc).__name__}: {exc}")
    raise BrokerUnavailable("cannot reach RabbitMQ: " + "; ".join(failures))


async def _settled(future: asyncio.Future[None]) -> None:
    with contextlib.suppress(BaseException):
        await asyncio.shield(future)


async def depth(settings: Settings) -> int:
    """Messages ready in the dead-letter queue."""
    async with _reading(settings, "prompter-worker dead-letters", prefetch=0) as reader:
        return reader.depth


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
    """The first ``limit`` messages of the dead-letter queue (at most 65,535), described;
    none is removed."""
    limit = min(limit, 65_535)
    async with _reading(settings, "prompter-worker dead-letters list", prefetch=limit) as reader:
        listing = Listing(queue=settings.dead_letter_queue, depth=reader.depth)
        while len(listing.messages) < min(limit, reader.depth):
            delivery = await reader.next()
            if delivery is None:
                break
            listing.messages.append(describe(delivery))
            delivery.body = b""  # only what it says about itself is kept
    return listing


def render_listing(listing: Listing) -> str:
    lines = [f"{'event_id / key':36}  {'reason':26}  {'failed at':25}  detail"]
    for m in listing.messages:
        lines.append(
            f"{(m.event_id or m.key)[:36]:36}  {m.reason[:26]:26}  {(m.failed_at or '-')[:25]:25}"
            f"  {m.detail}"
        )
    shown = len(listing.messages)
    more = f" (the first {shown:,} listed)" if shown < listing.depth else ""
    lines.append(f"{listing.depth:,} messages in {listing.queue}{more}")
    if listing.messages:
        lines.append("by reason: " + ", ".join(f"{r} {n:,}" for r, n in listing.by_reason.items()))
    return "\n".join(lines)


# --- selecting ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which dead letters to act on: those matching every given filter (none: all), at
    most ``limit`` of them. ``event_ids`` match a message's id or its key."""

    reasons: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if not self.event_ids:
            return True
        return (letter.event_id or "").lower() in self.event_ids or letter.key in self.event_ids


@dataclass(kw_only=True)
class RedriveReport:
    queue: str
    exchange: str
    redriven: list[DeadLetter] = field(default_factory=list)
    kept: int = 0  # looked at, not selected: back in the queue
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # back in the queue
    error: str | None = None
    interrupted: bool = False
    elapsed: float = 0.0
    purge: bool = False  # a selective purge: "redriven" were deleted

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "exchange": self.exchange,
            "purged" if self.purge else "redriven": len(self.redriven),
            "by_reason": dict(Counter(d.reason for d in self.redriven).most_common()),
            "kept": self.kept,
            "failed": [{**d.as_dict(), "error": e} for d, e in self.failed],
            "error": self.error,
            "interrupted": self.interrupted,
            "elapsed_seconds": round(self.elapsed, 3),
        }


def render_redrive(report: RedriveReport) -> str:
    lines = [f"{d.event_id or d.key}: {error}" for d, error in report.failed[:20]]
    if len(report.failed) > 20:
        lines.append(f"... and {len(report.failed) - 20:,} more failures")
    counts = Counter(d.reason for d in report.redriven).most_common()
    detail = f" ({', '.join(f'{r} {n:,}' for r, n in counts)})" if counts else ""
    rate = len(report.redriven) / report.elapsed if report.elapsed > 0 else 0.0
    if report.purge:
        lines.append(
            f"purged {len(report.redriven):,} messages{detail} from {report.queue}; "
            f"{report.kept:,} not selected stay in the queue"
        )
    else:
        lines.append(
            f"redrove {len(report.redriven):,} messages{detail} from {report.queue} to "
            f"{report.exchange} in {report.elapsed:.1f}s ({rate:,.0f}/s); {report.kept:,} "
            f"not selected and {len(report.failed):,} failed stay in the queue"
        )
    if report.interrupted:
        lines.append("interrupted: the messages above were moved; the rest stay queued")
    return "\n".join(lines)


# --- redrive and purge ----------------------------------------------------------------------


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
    publisher = await _connect(settings, "prompter-worker dead-letters redrive (publish)")
    try:
        await publisher.open_publisher(_PUBLISH_CHANNEL)
        exchange = settings.exchange.encode()

        async def act(delivery: amqp.Delivery, letter: DeadLetter, reader: _Reader) -> None:
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
                reader.connection.ack(_READ_CHANNEL, delivery.delivery_tag, multiple=False)
            except amqp.AMQPError as exc:  # the copy returns; redriven twice is harmless
                report.failed.append((letter, f"acknowledging failed: {exc}"))
                return
            report.redriven.append(letter)

        await _scan(settings, selection, report, act, window=window, name="redrive")
    finally:
        await publisher.close()
    return report


async def purge_selected(settings: Settings, selection: Selection) -> RedriveReport:
    """Delete the selected dead letters (acknowledge them); the rest stay queued."""
    report = RedriveReport(queue=settings.dead_letter_queue, exchange="", purge=True)

    async def act(delivery: amqp.Delivery, letter: DeadLetter, reader: _Reader) -> None:
        try:
            reader.connection.ack(_READ_CHANNEL, delivery.delivery_tag, multiple=False)
        except amqp.AMQPError as exc:
            report.failed.append((letter, f"acknowledging failed: {exc}"))
            return
        report.redriven.append(letter)

    await _scan(settings, selection, report, act, window=DEFAULT_WINDOW, name="purge")
    return report


async def _scan(
    settings: Settings,
    selection: Selection,
    report: RedriveReport,
    act: Callable[[amqp.Delivery, DeadLetter, _Reader], Any],
    *,
    window: int,
    name: str,
) -> None:
    """Look at each message once (up to the depth found at the start: messages
    dead-lettered meanwhile wait for the next run), ``act`` on the selected with at most
    ``window`` in flight and the bytes held bounded by PROMPTER_MAX_HELD_BYTES; stop at a
    signal (the second one: without waiting for what is in flight)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop, now = asyncio.Event(), asyncio.Event()

    def on_signal(_: int) -> None:
        (now if stop.is_set() else stop).set()

    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()
    budget = settings.max_held_bytes
    held = 0
    async with _reading(settings, f"prompter-worker dead-letters {name}", window) as reader:
        connection = reader.connection
        seen = selected = 0
        prefetch = window

        def done(task: asyncio.Task[None], *, size: int) -> None:
            nonlocal held
            held -= size
            slots.release()
            tasks.discard(task)
            if held <= budget // 2:
                connection.resume()

        with handle_signals(on_signal):
            while seen < reader.depth and not stop.is_set():
                if selection.limit is not None and selected >= selection.limit:
                    break
                delivery = await reader.next()
                if delivery is None:
                    break
                seen += 1
                letter = describe(delivery)
                if not selection.matches(letter):
                    report.kept += 1
                    delivery.body = b""  # held back unacknowledged; its body is not needed
                    if report.kept >= MAX_HELD_BACK:
                        report.error = (
                            f"stopped after looking at {seen:,} messages: {report.kept:,} "
                            "not selected are held back at once at most; run it again"
                        )
                        break
                    if report.kept + window > prefetch:
                        prefetch = min(report.kept + window * 2, 65_535)
                        connection.set_prefetch(_READ_CHANNEL, prefetch)
                    continue
                selected += 1
                await slots.acquire()
                size = len(delivery.body)
                held += size
                if held > budget:
                    connection.pause()
                task = asyncio.create_task(act(delivery, letter, reader))
                tasks.add(task)
                task.add_done_callback(functools.partial(done, size=size))
            if tasks:
                waiter = asyncio.ensure_future(asyncio.wait(set(tasks)))
                aborted = asyncio.ensure_future(now.wait())
                await asyncio.wait({waiter, aborted}, return_when=asyncio.FIRST_COMPLETED)
                aborted.cancel()
                for task in set(tasks):
                    task.cancel()
        report.interrupted = stop.is_set()
        if connection.closed.done() and report.error is None:
            report.error = f"the connection closed: {connection.closed.exception()}"
    report.elapsed = loop.time() - started
    if report.failed and report.error is None:
        report.error = f"{len(report.failed):,} messages could not be handled"


async def purge(settings: Settings) -> int:
    """Delete every ready message of the dead-letter queue; how many were deleted."""
    queue = settings.dead_letter_queue
    async with _reading(settings, "prompter-worker dead-letters purge", prefetch=0) as reader:
        try:
            return await reader.connection.purge(_QUERY_CHANNEL, queue)
        except amqp.AMQPError as exc:
            raise BrokerUnavailable(f"purging {queue!r} failed: {exc}") from None
