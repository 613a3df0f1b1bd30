"""One message in flight: sent on the publishing channel with its properties (and, with
tracing on, its PRODUCER span), its confirm awaited by its deadline, the outcome given to
its sender as one of :mod:`worker.errors`; and :class:`Tally`, publish_many's count.

**Why aiormq, beside the worker's own AMQP code.** The code base speaks AMQP two ways. The
worker consumes, and publishes its dead-letter copies, with its own protocol code
(:mod:`worker.amqp.protocol`): the least CPU per delivery, properties kept as raw bytes;
the ``dead-letters`` commands use it too, to read any message whatever it holds. The rest
uses aiormq (the AMQP layer under aio-pika): declaring the topology, ``status``, ``trace``'s
queue depths, and this library, which reuses :func:`worker.amqp.broker.connect` (cluster URL
lists, masked passwords) and :func:`worker.amqp.broker.open_topology` unchanged. aiormq
gives the confirm of each publish as a future, which is all a window of outstanding
confirms needs, with no per-message ``Message`` object or robust-connection machinery on
the hot path: the publisher's CPU per message is what bounds its rate on a small machine.
Its publishing failures are mapped onto :mod:`worker.errors` in one place,
:func:`worker.amqp.confirms.publish_confirmed`, which also makes aiormq's matching of a
returned message to its publish (by ``message_id``) safe for any ids;
:func:`worker.logs.guard_amqp_loggers` (called on importing :mod:`worker.publisher`) keeps
aiormq from logging bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aiormq.abc
from pamqp import commands as spec

from worker import tracing
from worker.amqp.confirms import publish_confirmed
from worker.errors import BrokerUnavailable, PublishError, WorkerError
from worker.publisher.prepare import Prepared

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

CONTENT_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class InFlight:
    """A message in flight: its id, and the future its sender awaits."""

    event_id: str
    done: asyncio.Future[None]
    size: int

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: a sender may drop its future


async def publish_one(
    channel: aiormq.abc.AbstractChannel,
    prepared: Prepared,
    flight: InFlight,
    *,
    exchange: str,
    routing_key: str,
    app_id: str,
    deadline: float,
    timeout: float,
    headers: dict[str, Any] | None,
    retire: Callable[[aiormq.abc.AbstractChannel], None],
) -> None:
    """Publish ``prepared`` (persistent, mandatory, ``message_id`` = its event id) and
    settle ``flight`` with the outcome; a channel that nacked or did not confirm by the
    deadline is handed to ``retire``. Never raises (cancellation aside)."""
    props = spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        message_id=prepared.event_id,
        app_id=app_id,
        timestamp=datetime.now(UTC),
        headers=headers,
    )
    try:
        async with asyncio.timeout_at(deadline):
            await publish_confirmed(
                channel,
                prepared.body,
                exchange=exchange,
                routing_key=routing_key,
                props=props,
                confirm_timeout=timeout,
            )
    except TimeoutError:
        retire(channel)
        flight.fail(PublishError(f"no confirm for message {prepared.event_id} within {timeout:g}s"))
    except WorkerError as exc:
        if isinstance(exc, PublishError):
            retire(channel)
        flight.fail(exc)
    except Exception as exc:  # publish_confirmed maps everything; never leak another
        flight.fail(BrokerUnavailable(f"publishing failed: {type(exc).__name__}: {exc}"))
    else:
        if not flight.done.done():
            flight.done.set_result(None)


def traced(
    tracer: Tracer, prepared: Prepared, flight: InFlight, *, exchange: str, routing_key: str
) -> dict[str, Any]:
    """Start the message's PRODUCER span (a child of the caller's current span), ended
    when the message is confirmed or fails; the headers that carry its context (W3C
    ``traceparent``/``tracestate``)."""
    from opentelemetry.trace import SpanKind  # noqa: PLC0415 - tracing is on

    span = tracer.start_span(
        f"publish {exchange}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "messaging.message.id": prepared.event_id,
            "messaging.message.body.size": len(prepared.body),
        },
    )
    headers: dict[str, Any] = {}
    tracing.inject(span, headers)
    flight.done.add_done_callback(lambda done: tracing.end(span, done))
    return headers


class Tally:
    """Counts the confirms of publish_many without keeping its futures."""

    def __init__(self) -> None:
        self.confirmed = 0
        self.failures: list[BaseException] = []
        self._open = 0
        self._all_settled = asyncio.Event()
        self._all_settled.set()

    def follow(self, future: asyncio.Future[None]) -> None:
        self._open += 1
        self._all_settled.clear()
        future.add_done_callback(self._note)

    def _note(self, future: asyncio.Future[None]) -> None:
        self._open -= 1
        if future.cancelled():
            self.failures.append(BrokerUnavailable("the publish was cancelled"))
        elif (exc := future.exception()) is not None:
            self.failures.append(exc)
        else:
            self.confirmed += 1
        if not self._open:
            self._all_settled.set()

    async def settled(self) -> None:
        await self._all_settled.wait()
