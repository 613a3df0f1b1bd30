"""Publishing with confirms on the worker's own connection, sans I/O: the frames of a
publish, and each message in flight per confirm channel until the broker settles it.

A message goes out with its original property bytes, so nothing a publisher sent is
decoded and re-encoded. Confirms are matched to publishes by delivery tag; a return by
content (exchange, routing key, body), never by message id (:meth:`ConfirmChannels.track`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import OrderedDict
from typing import Final

from worker.amqp.delivery import ReturnedMethod
from worker.amqp.reader import FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD, FRAME_OVERHEAD

log = logging.getLogger(__name__)

_METHOD_HEAD: Final = struct.Struct(">BHIHH")  # frame head, class id, method id
_CONTENT_HEAD: Final = struct.Struct(">BHI")
_END: Final = bytes((FRAME_END,))


class AMQPError(Exception):
    """The broker closed the connection or a channel, or the peer stopped answering or
    broke the protocol."""


class Returned(AMQPError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class Nacked(AMQPError):
    """The broker refused a published message (basic.nack)."""


class InFlight:
    """A message published on a confirm channel, until the broker confirms it."""

    __slots__ = ("body", "exchange", "future", "returned", "routing_key")

    def __init__(
        self, exchange: bytes, routing_key: bytes, body: bytes, future: asyncio.Future[None]
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.future = future
        self.returned: str | None = None


def publish_frames(
    channel: int,
    *,
    exchange: bytes,
    routing_key: bytes,
    header: bytes,
    body: bytes,
    mandatory: bool,
    frame_max: int,
) -> list[bytes | memoryview]:
    """basic.publish, the content header ``header`` as is, and ``body`` in frames of at
    most ``frame_max`` bytes."""
    if len(exchange) > 255 or len(routing_key) > 255:
        raise ValueError("an exchange name or routing key is at most 255 bytes")
    payload = (
        b"\x00\x00"  # reserved
        + bytes((len(exchange),))
        + exchange
        + bytes((len(routing_key),))
        + routing_key
        + (b"\x01" if mandatory else b"\x00")
    )
    frames: list[bytes | memoryview] = [
        _METHOD_HEAD.pack(FRAME_METHOD, channel, len(payload) + 4, 60, 40),
        payload,
        _END,
        _CONTENT_HEAD.pack(FRAME_HEADER, channel, len(header)),
        header,
        _END,
    ]
    step = frame_max - FRAME_OVERHEAD
    view = memoryview(body)
    for at in range(0, len(body), step):
        chunk = view[at : at + step]
        frames += (_CONTENT_HEAD.pack(FRAME_BODY, channel, len(chunk)), chunk, _END)
    return frames


class ConfirmChannels:
    """The confirm channels of one connection and the publishes in flight on each."""

    def __init__(self) -> None:
        self.channels: dict[int, OrderedDict[int, InFlight]] = {}
        self._next_tag: dict[int, int] = {}

    def open(self, channel: int) -> None:
        self.channels[channel] = OrderedDict()
        self._next_tag[channel] = 1

    def track(self, channel: int, exchange: bytes, routing_key: bytes, body: bytes) -> InFlight:
        """The next publish on ``channel``, in flight until :meth:`confirm` settles it.

        A return is matched to the earliest unconfirmed publish with the same exchange,
        routing key and body: two publishes that equal in all of these are
        interchangeable, so whichever is marked returned, nothing is lost (the other
        one's copy is in the queue)."""
        published = self.channels.get(channel)
        if published is None:
            raise AMQPError(f"channel {channel} is not a publishing channel")
        tag = self._next_tag[channel]
        self._next_tag[channel] = tag + 1
        item = InFlight(exchange, routing_key, body, asyncio.get_running_loop().create_future())
        published[tag] = item
        return item

    def confirm(self, channel: int, tag: int, multiple: bool, nack: bool) -> None:
        published = self.channels.get(channel)
        if published is None:
            return
        settled = [t for t in published if t <= tag] if multiple else [tag]
        for t in settled:
            item = published.pop(t, None)
            if item is None or item.future.done():
                continue
            if nack:
                item.future.set_exception(Nacked("the broker nacked the message"))
            elif item.returned is not None:
                item.future.set_exception(Returned(item.returned))
            else:
                item.future.set_result(None)

    def returned(self, channel: int, method: ReturnedMethod, body: bytes) -> None:
        published = self.channels.get(channel)
        why = method.reply
        for item in () if published is None else published.values():
            if (
                item.returned is None
                and item.exchange == method.exchange
                and item.routing_key == method.routing_key
                and len(item.body) == len(body)
                and item.body == body
            ):
                item.returned = why
                return
        log.warning("the broker returned a message that matches no publish in flight (%s)", why)

    async def retire(self, channel: int, timeout: float) -> bool:
        """Forget ``channel`` once its publishes in flight settled (or ``timeout`` passed:
        those still open fail with :class:`AMQPError`); False if it was not open."""
        published = self.channels.get(channel)
        if published is None:
            return False
        waits = [p.future for p in published.values() if not p.future.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        self.channels.pop(channel, None)
        self._next_tag.pop(channel, None)
        _fail_all(published, AMQPError(f"channel {channel} retired unconfirmed"))
        return True

    def fail(self, exc: AMQPError) -> None:
        """The connection is gone: every publish in flight fails with ``exc``."""
        for published in self.channels.values():
            _fail_all(published, exc)
            published.clear()


def _fail_all(published: OrderedDict[int, InFlight], exc: AMQPError) -> None:
    for item in published.values():
        if not item.future.done():
            item.future.set_exception(exc)
            item.future.exception()  # retrieved: the publisher may never await it
