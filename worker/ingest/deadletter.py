"""Dead letters: the copy of a refused message, and publishing it until the broker confirms.

**The copy** (:func:`copy_of`) is the original message, byte for byte: its body, and its
property list with every field the publisher set (a binary ``message_id``, header keys
that are not UTF-8, anything), changed only where a republished message must be:
persistent (``delivery_mode`` 2), no ``expiration`` (a dead letter must not expire), no
``user_id`` (the broker checks it against the publishing user) and no ``cluster_id``;
and the worker's own headers spliced into its headers table:

====================== =================================================================
``x-error-reason``     the machine reason (``docs/events.md``)
``x-error-detail``     the human detail, at most 1,000 characters, naming the field
``x-failed-at``        when it was refused (UTC, ISO 8601)
``x-worker-version``   the worker's version
``x-original-exchange``, ``x-original-routing-key``  where it was published
``x-raw-properties``   only for ``invalid_properties``: the property list as received
====================== =================================================================

A message whose property list cannot be split at all keeps it as ``x-raw-properties``
(a byte array) on a copy that carries nothing else of it. If the copy's properties would
not fit one frame (the broker takes a content header in one frame of ``frame_max``
bytes), the original headers are dropped and ``x-error-detail`` says so, with their size.

**Publishing** (:class:`DeadLetters`) goes through the session's publishing connection
(:meth:`worker.amqp.protocol.Connection.publish`): confirms are matched by delivery tag and returns
by content, never by message id, so two refused messages with the same id (or none) are
each confirmed or returned on their own. A copy is retried, with the one backoff policy,
until the broker confirms it or the source delivery's channel closed (the broker then
redelivers the source). While it fails, readiness is false with the reason, and a copy
returned as unroutable has the topology declared again before the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from worker import __version__
from worker.amqp import protocol as amqp
from worker.amqp.broker import LIVE_ROUTING_KEY
from worker.amqp.frames import ByteArray, Malformed, RawProperties, encode_entries
from worker.errors import Rejection
from worker.metrics import Health, Metrics
from worker.retry import Backoff, Retrying

if TYPE_CHECKING:
    from worker.ingest.batching import Held

log = logging.getLogger(__name__)

#: Headers a dead-lettering writes; any of them already on the message is replaced.
WORKER_HEADERS: Final = (
    "x-error-reason",
    "x-error-detail",
    "x-failed-at",
    "x-worker-version",
    "x-original-exchange",
    "x-original-routing-key",
)
RAW_PROPERTIES_HEADER: Final = "x-raw-properties"
_REPLACED: Final = frozenset(h.encode() for h in (*WORKER_HEADERS, RAW_PROPERTIES_HEADER))
MAX_DETAIL: Final = 1000
#: The basic class id, weight and body size before a content header's property flags.
_HEADER_PREFIX: Final = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class Copy:
    """A dead-letter copy ready to publish: its content header and routing key, and the
    detail it carries (the rejection's, plus a note when headers had to be dropped)."""

    header: bytes
    routing_key: bytes
    detail: str


def copy_of(
    delivery: amqp.Delivery,
    rejection: Rejection,
    *,
    failed_at: str,
    frame_max: int,
    fallback_routing_key: bytes,
) -> Copy:
    """The dead-letter copy of ``delivery`` (see the module docstring). Pure."""
    routing_key = delivery.routing_key_raw or fallback_routing_key
    room = frame_max - amqp.FRAME_OVERHEAD - _HEADER_PREFIX
    detail = rejection.detail[:MAX_DETAIL]

    def ours(text: str, *extra: tuple[str, str | int | bytes]) -> bytes:
        return encode_entries(
            [
                ("x-error-reason", rejection.reason),
                ("x-error-detail", text[:MAX_DETAIL]),
                ("x-failed-at", failed_at),
                ("x-worker-version", __version__),
                ("x-original-exchange", delivery.exchange_raw),
                ("x-original-routing-key", delivery.routing_key_raw),
                *extra,
            ]
        )

    size = len(delivery.body)  # an oversize body is rejected unread, never copied
    try:
        original = delivery.properties
    except Malformed:
        raw = delivery.header[_HEADER_PREFIX:]
        bare = RawProperties({"delivery_mode": b"\x02"})
        copy = bare.replace(headers=ours(detail, (RAW_PROPERTIES_HEADER, ByteArray(raw))))
        if copy.size() > room:
            note = f"{detail} (the raw properties, {len(raw)} bytes, were dropped: too large)"
            detail = note[:MAX_DETAIL]
            copy = bare.replace(headers=ours(detail))
        return Copy(header=copy.build(size), routing_key=routing_key, detail=detail)
    kept = original.replace(delivery_mode=b"\x02", expiration=None, user_id=None, cluster_id=None)
    copy = kept.with_headers(_REPLACED, ours(detail))
    if copy.size() > room:
        dropped = len(original.fields.get("headers", b""))
        detail = (
            f"{detail} (the original headers, {dropped} bytes, were dropped: with them "
            f"the copy would exceed the broker's frame size of {frame_max} bytes)"
        )[:MAX_DETAIL]
        copy = kept.replace(headers=ours(detail))
    return Copy(header=copy.build(size), routing_key=routing_key, detail=detail)


def failure_time() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class DeadLetters:
    """Publishes the copies of a batch's refused deliveries, confirmed (see the module
    docstring). ``publisher`` gives the session's publishing connection (None while the
    session reconnects); ``redeclare`` declares the topology again."""

    def __init__(
        self,
        *,
        exchange: str,
        publisher: Callable[[], tuple[amqp.Connection, int] | None],
        redeclare: Callable[[], Awaitable[None]],
        renew: Callable[[int], Awaitable[None]],
        metrics: Metrics,
        health: Health,
        backoff: Backoff,
        forced: asyncio.Event,
        confirm_timeout: float = 30.0,
    ) -> None:
        self.exchange = exchange.encode()
        self._publisher = publisher
        self._redeclare = redeclare
        self._renew = renew
        self.metrics = metrics
        self.health = health
        self.backoff = backoff
        self.forced = forced
        self.confirm_timeout = confirm_timeout
        self.retrying = Retrying(
            failing="dead-lettering failed", recovered="dead-lettering works again", logger=log
        )

    async def publish(
        self, batch: Sequence[Held], rejected: list[tuple[int, Rejection]]
    ) -> set[int]:
        """Dead-letter each rejected delivery of ``batch`` (by position); return the
        positions left unconfirmed (their channel closed, or a forced stop): never acked."""
        failed_at = failure_time()
        attempt = 0
        todo = rejected
        while True:
            todo = [(i, r) for i, r in todo if batch[i].source.open]
            if not todo:
                self._recovered()
                return set()
            if self.forced.is_set():
                return {i for i, _ in todo}
            publishing = self._publisher()
            if publishing is None or publishing[0].closed.done():
                await self._wait(attempt)
                attempt += 1
                continue
            connection, channel = publishing
            results = await asyncio.gather(
                *(self._one(connection, channel, batch[i].delivery, r, failed_at) for i, r in todo),
                return_exceptions=True,
            )
            retry = []
            unroutable = refused = False
            problem = ""
            for (i, r), outcome in zip(todo, results, strict=True):
                if isinstance(outcome, BaseException):
                    retry.append((i, r))
                    unroutable = unroutable or isinstance(outcome, amqp.Returned)
                    refused = refused or isinstance(outcome, (amqp.Nacked, TimeoutError))
                    problem = _describe(outcome)
                    self.metrics.retries.labels(kind="dead_letter").inc()
            todo = retry
            if not todo:
                self._recovered()
                return set()
            self.retrying.failed(problem)
            self.health.problems["dead_letter"] = problem
            if unroutable:
                try:
                    await self._redeclare()
                except Exception as exc:  # reported through readiness; retried
                    self.health.problems["dead_letter"] = f"{problem}; declaring again: {exc}"
            if refused:  # a nack, or no confirm: the next attempt on a new channel
                with contextlib.suppress(amqp.AMQPError, TimeoutError):
                    await self._renew(channel)
            await self._wait(attempt)
            attempt += 1

    async def _one(
        self,
        connection: amqp.Connection,
        channel: int,
        delivery: amqp.Delivery,
        rejection: Rejection,
        failed_at: str,
    ) -> None:
        copy = copy_of(
            delivery,
            rejection,
            failed_at=failed_at,
            frame_max=connection.frame_max,
            fallback_routing_key=LIVE_ROUTING_KEY.encode(),
        )
        confirmed = connection.publish(
            channel,
            exchange=self.exchange,
            routing_key=copy.routing_key,
            header=copy.header,
            body=delivery.body,
        )
        async with asyncio.timeout(self.confirm_timeout):
            await confirmed
        self.metrics.rejected.labels(reason=rejection.reason).inc()
        log.warning(
            "event rejected: %s",
            rejection.reason,
            extra={
                "event_id": delivery.message_id,
                "reason": rejection.reason,
                "detail": copy.detail,
                "routing_key": delivery.routing_key,
            },
        )

    async def _wait(self, attempt: int) -> None:
        try:
            async with asyncio.timeout(self.backoff.delay(attempt)):
                await self.forced.wait()
        except TimeoutError:
            return

    def _recovered(self) -> None:
        if self.retrying.succeeded() or "dead_letter" in self.health.problems:
            self.health.problems.pop("dead_letter", None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, amqp.Returned):
        return (
            f"the dead-letter exchange routed a copy nowhere ({exc}): is the dead-letter "
            "queue declared and bound?"
        )
    if isinstance(exc, amqp.Nacked):
        return "the broker refused a dead-letter copy (nack): is the dead-letter queue full?"
    if isinstance(exc, TimeoutError):
        return "no confirm for a dead-letter copy in time"
    return f"publishing a dead-letter copy failed: {exc}"
