"""One message published on an aiormq channel in confirm mode, its outcome its own:
confirmed, returned (unroutable), nacked, or not confirmed in time, each a distinct
error of :mod:`worker.errors`; two messages in flight with one message id never swap
outcomes. The publisher library sends every message through it."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Final

import aiormq
import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec

from worker.errors import BrokerUnavailable, PublishError, UnroutableError

#: The deadline of one publish's confirm when the caller gives none.
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0

# Per channel, the message id of each publish in flight, with a future resolved when it
# settles. aiormq matches a Basic.Return to its publish by ``message_id`` (the last publish
# with that id wins, and one without an id gets a random one), so two messages in flight
# with one id could swap their outcomes: a returned message reported confirmed, lost.
_IN_FLIGHT: weakref.WeakKeyDictionary[
    aiormq.abc.AbstractChannel, dict[str | None, asyncio.Future[None]]
] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _alone(
    channel: aiormq.abc.AbstractChannel, message_id: str | None
) -> AsyncIterator[None]:
    """Hold the only place in flight on ``channel`` for ``message_id`` (None for none)."""
    in_flight = _IN_FLIGHT.get(channel)
    if in_flight is None:
        in_flight = _IN_FLIGHT[channel] = {}
    while (earlier := in_flight.get(message_id)) is not None:
        await asyncio.wait([earlier])
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    in_flight[message_id] = mine
    try:
        yield
    finally:
        del in_flight[message_id]
        mine.set_result(None)


async def publish_confirmed(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    props: spec.Basic.Properties,
    confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
) -> None:
    """Publish one mandatory message on a channel opened with ``publisher_confirms=True``
    and ``on_return_raises=True``, and wait for its confirm, within ``confirm_timeout``;
    every failure is raised as one of :mod:`worker.errors` (see the module docstring),
    whatever aiormq raises; only the caller's own cancellation propagates as itself.

    Correct for any ``message_id``, repeated or absent: messages that share one (all those
    without one count as sharing) are never in flight together on one channel; a later one
    waits, within its ``confirm_timeout``, until the earlier one is confirmed or returned.
    So each copy is confirmed or returned on its own, and callers need not keep ids unique.
    """
    message_id = props.message_id or None
    what = f"message {message_id}" if message_id else "a message without id"
    try:
        async with asyncio.timeout(confirm_timeout), _alone(channel, message_id):
            confirmation = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=props,
                mandatory=True,
            )
    except aiormq.exceptions.PublishError:  # a Basic.Return: before DeliveryError, its base
        raise UnroutableError(
            f"{what} was returned by the broker: no queue is bound to exchange "
            f"{exchange!r} for routing key {routing_key!r}"
        ) from None
    except aiormq.exceptions.DeliveryError:  # a Basic.Nack
        raise PublishError(f"the broker nacked {what} (is the queue full?)") from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise UnroutableError(f"exchange {exchange!r} does not exist") from None
    except TimeoutError:
        raise PublishError(f"no confirm for {what} within {confirm_timeout:g}s") from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the caller was cancelled (or its deadline passed)
        # aiormq cancelled the confirmation under us: its channel or connection closed.
        raise BrokerUnavailable(
            f"the connection to RabbitMQ was lost before {what} was confirmed"
        ) from None
    except Exception as exc:
        # Messages queued behind the one that closed the channel fail with "channel
        # closed": the channel's own close reason says what really happened.
        if isinstance(_close_reason(channel), aiormq.exceptions.ChannelNotFoundEntity):
            raise UnroutableError(f"exchange {exchange!r} does not exist") from None
        raise BrokerUnavailable(
            f"the connection to RabbitMQ was lost before {what} was confirmed "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(confirmation, spec.Basic.Nack):
        raise PublishError(f"the broker nacked {what} (is the queue full?)")


def _close_reason(channel: aiormq.abc.AbstractChannel) -> BaseException | None:
    """Why a closed channel closed, if it closed with an error."""
    if not channel.is_closed:
        return None
    closing = channel.closing
    if not closing.done() or closing.cancelled():
        closing.cancel()  # only an observer of the close
        return None
    return closing.exception()
