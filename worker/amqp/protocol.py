"""The worker's own AMQP 0-9-1 connection, built for the least CPU per delivery and for
hostile bytes.

With aiormq, receiving a message cost more CPU than decoding, validating and storing it
(three frame objects, two asyncio queues, a future and a task per delivery); and a
general codec decodes every property as text, so one header key that is not UTF-8 broke
the whole connection. This connection does only what the worker needs:

- **consuming**: deliveries are parsed straight from the socket buffer by a sans-I/O
  reader (:mod:`worker.amqp.reader`) and handed to a plain callback, synchronously, in
  order, as :class:`~worker.amqp.delivery.Delivery` values whose properties stay raw
  bytes (:mod:`worker.amqp.frames`);
- **publishing with confirms** (dead-letter copies, redrive): the message goes out with
  its original property bytes; confirms and returns are matched to publishes by delivery
  tag and content, never by message id (:mod:`worker.amqp.publishing`);
- the link (:mod:`worker.amqp.link`, :mod:`worker.amqp.handshake`): handshake (PLAIN or
  EXTERNAL, TLS), heartbeats, flow control, close; the URL is read as aiormq reads it
  (:mod:`worker.amqp.endpoint`). Methods off the hot path are decoded and encoded with
  pamqp, the codec aiormq uses; declaring the topology stays with aiormq
  (:mod:`worker.amqp.broker`).

This module holds the commands on channels (:class:`Connection`) and :func:`connect`;
the names above are re-exported from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from typing import Final

from pamqp import commands as spec
from pamqp import frame as amqp_frame

from worker.amqp.delivery import Delivery
from worker.amqp.endpoint import DEFAULT_PORTS, Endpoint, verification_disabled
from worker.amqp.handshake import ACQUIRED_COUNT_SINCE, handshake, parse_version
from worker.amqp.link import PROTOCOL_HEADER, Link
from worker.amqp.publishing import AMQPError, Nacked, Returned, publish_frames
from worker.amqp.reader import FRAME_END, FRAME_OVERHEAD, MAX_FRAME, ProtocolViolation

__all__ = [
    "ACQUIRED_COUNT_SINCE",
    "DEFAULT_PORTS",
    "FRAME_OVERHEAD",
    "MAX_FRAME",
    "PROTOCOL_HEADER",
    "AMQPError",
    "Connection",
    "Delivery",
    "Endpoint",
    "Nacked",
    "ProtocolViolation",
    "Returned",
    "connect",
    "parse_version",
    "verification_disabled",
]

_ACK: Final = struct.Struct(">BHIHHQBB")


class Connection(Link):
    """The commands the worker sends on channels: consuming (channels, prefetch, consume,
    cancel, ack, reject), queue commands, and publishing on confirm channels. Create with
    :func:`connect`; deliveries go to ``on_delivery``."""

    async def open_channel(self, channel: int, prefetch: int, timeout: float = 10) -> None:
        await self.rpc(spec.Channel.Open(), channel, (spec.Channel.OpenOk,), timeout)
        await self.rpc(
            spec.Basic.Qos(prefetch_count=prefetch), channel, (spec.Basic.QosOk,), timeout
        )

    def set_prefetch(self, channel: int, prefetch: int) -> None:
        """Change a consuming channel's prefetch count, without waiting for the reply (it
        applies to the deliveries the broker sends from then on)."""
        self.send(spec.Basic.Qos(prefetch_count=prefetch), channel)

    async def open_plain(self, channel: int, timeout: float = 10) -> None:
        """Open ``channel`` for queue commands (:meth:`queue_depth`, :meth:`purge`)."""
        await self.rpc(spec.Channel.Open(), channel, (spec.Channel.OpenOk,), timeout)

    async def queue_depth(self, channel: int, queue: str, timeout: float = 10) -> tuple[int, int]:
        """(ready messages, consumers) of ``queue``, by a passive declare. A missing queue
        closes the connection (the broker closes the channel): :class:`AMQPError` 404."""
        ok = await self.rpc(
            spec.Queue.Declare(queue=queue, passive=True),
            channel,
            (spec.Queue.DeclareOk,),
            timeout,
        )
        return int(ok.message_count or 0), int(ok.consumer_count or 0)

    async def purge(self, channel: int, queue: str, timeout: float = 30) -> int:
        """Delete every ready message of ``queue``; how many."""
        ok = await self.rpc(spec.Queue.Purge(queue=queue), channel, (spec.Queue.PurgeOk,), timeout)
        return int(ok.message_count or 0)

    # -- consuming ---------------------------------------------------------------------

    async def consume(self, channel: int, queue: str, timeout: float = 10) -> str:
        ok = await self.rpc(
            spec.Basic.Consume(queue=queue, no_ack=False), channel, (spec.Basic.ConsumeOk,), timeout
        )
        tag = str(ok.consumer_tag)
        self.consumers[tag] = channel
        return tag

    async def cancel(self, consumer_tag: str, timeout: float = 10) -> None:
        channel = self.consumers.pop(consumer_tag, None)
        if channel is not None:
            await self.rpc(
                spec.Basic.Cancel(consumer_tag=consumer_tag),
                channel,
                (spec.Basic.CancelOk,),
                timeout,
            )

    def consume_nowait(self, channel: int, queue: str, consumer_tag: str) -> None:
        """Start consuming without waiting for the broker's reply (none is sent; a missing
        queue closes the channel, and with it this connection): usable while reading is
        paused, when a reply could not be read."""
        self.writable()
        self.send(
            spec.Basic.Consume(queue=queue, consumer_tag=consumer_tag, no_ack=False, nowait=True),
            channel,
        )
        self.consumers[consumer_tag] = channel

    def cancel_nowait(self, consumer_tag: str) -> None:
        """Cancel a consumer without waiting for the broker's reply (it could sit behind
        deliveries while reading is paused); deliveries sent before it still arrive."""
        channel = self.consumers.pop(consumer_tag, None)
        if channel is not None:
            self.send(spec.Basic.Cancel(consumer_tag=consumer_tag, nowait=True), channel)

    def ack(self, channel: int, delivery_tag: int, *, multiple: bool = True) -> None:
        """Acknowledge; raises :class:`AMQPError` if the connection is gone (never sent on
        another connection)."""
        self.write(_ACK.pack(1, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, FRAME_END))

    def reject(self, channel: int, delivery_tag: int, *, requeue: bool) -> None:
        """Reject one delivery (``requeue=False``: the queue dead-letters it)."""
        self.write(
            amqp_frame.marshal(
                spec.Basic.Reject(delivery_tag=delivery_tag, requeue=requeue), channel
            )
        )

    # -- publishing --------------------------------------------------------------------

    async def open_publisher(self, channel: int, timeout: float = 10) -> None:
        """Open ``channel`` in confirm mode, for :meth:`publish`."""
        await self.rpc(spec.Channel.Open(), channel, (spec.Channel.OpenOk,), timeout)
        await self.rpc(spec.Confirm.Select(), channel, (spec.Confirm.SelectOk,), timeout)
        self.confirms.open(channel)

    async def retire_publisher(self, channel: int, timeout: float = 30) -> None:
        """Close a confirm channel once the publishes in flight on it are settled (or
        ``timeout`` passed: those still open fail with :class:`AMQPError`)."""
        if not await self.confirms.retire(channel, timeout):
            return
        with contextlib.suppress(AMQPError, TimeoutError):
            await self.rpc(
                spec.Channel.Close(reply_code=200, reply_text="retired", class_id=0, method_id=0),
                channel,
                (spec.Channel.CloseOk,),
                10,
            )

    def publish(
        self,
        channel: int,
        *,
        exchange: bytes,
        routing_key: bytes,
        header: bytes,
        body: bytes,
        mandatory: bool = True,
    ) -> asyncio.Future[None]:
        """Publish on a confirm channel (:meth:`open_publisher`): ``header`` is a content
        header payload (:meth:`~worker.amqp.frames.RawProperties.build`), sent as is. The
        future resolves when the broker confirms the message, or fails with
        :class:`Returned` (no queue took it; see
        :meth:`~worker.amqp.publishing.ConfirmChannels.track`), :class:`Nacked`, or
        :class:`AMQPError` (the connection closed first: it may or may not have arrived)."""
        transport = self.writable()
        if channel not in self.confirms.channels:
            raise AMQPError(f"channel {channel} is not a publishing channel")
        frames = publish_frames(
            channel,
            exchange=exchange,
            routing_key=routing_key,
            header=header,
            body=body,
            mandatory=mandatory,
            frame_max=self.frame_max,
        )
        in_flight = self.confirms.track(channel, exchange, routing_key, body)
        transport.writelines(frames)
        self._sent = True
        return in_flight.future


async def connect(
    url: str,
    on_delivery: Callable[[Delivery], None] = lambda _: None,
    *,
    name: str,
    heartbeat: int = 15,
    timeout: float = 10,
    max_body: int = 1 << 62,
) -> Connection:
    """Open a connection to the broker named by an ``amqp://`` or ``amqps://`` URL
    (:class:`Endpoint`): PLAIN with the URL's credentials, or EXTERNAL with
    ``auth=external`` and a client certificate. Raises :class:`AMQPError`, ``OSError`` or
    ``TimeoutError``."""
    endpoint = Endpoint.parse(url)
    context = endpoint.ssl_context()
    loop = asyncio.get_running_loop()
    beat = heartbeat if endpoint.heartbeat is None else endpoint.heartbeat
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            lambda: Connection(on_delivery, beat, max_body=max_body),
            endpoint.host,
            endpoint.port,
            ssl=context,
            server_hostname=endpoint.host if context else None,
        )
    try:
        credentials = None if endpoint.external else (endpoint.user, endpoint.password)
        await handshake(protocol, credentials, endpoint.vhost, name, timeout)
    except BaseException:
        protocol._close_transport()
        raise
    return protocol
