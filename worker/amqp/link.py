"""One AMQP connection's link to the broker, as an :class:`asyncio.Protocol`: the transport,
replies awaited, liveness (heartbeats, close) and flow control.

Bytes read go to the sans-I/O :class:`~worker.amqp.reader.FrameReader`; what it hands
back that is not a delivery, a confirm or a return is decoded with pamqp (the codec
aiormq uses) and either handled here (the broker closing, blocking, flow) or given to
whoever awaits it (:meth:`Link.rpc`). Nothing raised while reading escapes
:meth:`Link.data_received`: it closes the connection with the reason logged
(:class:`~worker.amqp.publishing.AMQPError`). Logging in is
:mod:`worker.amqp.handshake`'s; the commands are :class:`worker.amqp.protocol.Connection`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final, cast

from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import heartbeat as amqp_heartbeat

from worker.amqp.delivery import Delivery
from worker.amqp.publishing import AMQPError, ConfirmChannels
from worker.amqp.reader import FrameReader, ProtocolViolation

log = logging.getLogger(__name__)

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
_HEARTBEAT = amqp_frame.marshal(amqp_heartbeat.Heartbeat(), 0)


class Link(asyncio.Protocol):
    """The transport, replies, heartbeats, flow control and closing."""

    def __init__(
        self,
        on_delivery: Callable[[Delivery], None],
        heartbeat: int,
        *,
        max_body: int = 1 << 62,
    ) -> None:
        self.heartbeat = heartbeat
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.server_version: tuple[int, ...] = (0,)
        self.blocked: str | None = None  # why the broker blocks publishing, while it does
        self.consumers: dict[str, int] = {}  # consumer tag: channel, kept by the commands
        self.confirms = ConfirmChannels()
        self.reader = FrameReader(
            on_delivery=on_delivery,
            on_confirm=self.confirms.confirm,
            on_return=self.confirms.returned,
            on_frame=self._on_frame,
            max_body=max_body,
        )
        self._pending: dict[int, tuple[tuple[type, ...], asyncio.Future[Any]]] = {}
        self._unclaimed: list[tuple[int, Any]] = []
        self._received = False
        self._sent = False
        self._paused = False
        self._heartbeat_task: asyncio.Task[None] | None = None

    @property
    def frame_max(self) -> int:
        """The largest frame either side sends (negotiated in the handshake)."""
        return self.reader.frame_max

    @frame_max.setter
    def frame_max(self, value: int) -> None:
        self.reader.frame_max = value

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(PROTOCOL_HEADER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(AMQPError(f"connection lost: {exc}" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:  # the hot path: every delivery passes here
        self._received = True
        if self.closed.done():
            return
        try:
            self.reader.feed(data)
        except ProtocolViolation as exc:
            self._protocol_error(str(exc))
        except Exception as exc:  # whatever the peer sent, it never escapes the protocol
            self._protocol_error(f"{type(exc).__name__}: {exc}")

    # -- every frame but deliveries, confirms and returns, through pamqp ---------------

    def _on_frame(self, raw: bytes) -> None:
        try:
            _, channel, value = amqp_frame.unmarshal(raw)
        except Exception as exc:
            self._protocol_error(f"undecodable frame: {exc}")
            return
        if isinstance(value, spec.Connection.Close):
            self.send(spec.Connection.CloseOk(), 0)
            self._fail(
                AMQPError(f"broker closed the connection: {value.reply_code} {value.reply_text}")
            )
            self._close_transport()
        elif isinstance(value, spec.Channel.Close):
            self.send(spec.Channel.CloseOk(), channel)
            self._fail(
                AMQPError(f"broker closed channel {channel}: {value.reply_code} {value.reply_text}")
            )
            self._close_transport()
        elif isinstance(value, spec.Basic.Cancel):  # the queue went away under the consumer
            self._fail(AMQPError(f"broker cancelled consumer {value.consumer_tag}"))
            self._close_transport()
        elif isinstance(value, spec.Channel.Flow):
            self.send(spec.Channel.FlowOk(active=value.active), channel)
        elif isinstance(value, spec.Connection.Blocked):
            self.blocked = str(value.reason or "blocked")
        elif isinstance(value, spec.Connection.Unblocked):
            self.blocked = None
        else:
            waiter = self._pending.get(channel)
            if waiter is not None and isinstance(value, waiter[0]) and not waiter[1].done():
                del self._pending[channel]
                waiter[1].set_result(value)
            elif len(self._unclaimed) < 16:
                self._unclaimed.append((channel, value))  # a reply nobody waits for yet

    # -- sending and awaiting replies --------------------------------------------------

    def send(self, value: Any, channel: int) -> None:
        """Send a method encoded by pamqp (nothing if the transport is closing)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(amqp_frame.marshal(value, channel))
            self._sent = True

    def writable(self) -> asyncio.Transport:
        """The transport; raises :class:`AMQPError` if the connection is gone."""
        transport = self.transport
        if self.closed.done() or transport is None or transport.is_closing():
            raise AMQPError("connection closed")
        return transport

    def write(self, data: bytes) -> None:
        """Write frames already encoded; raises :class:`AMQPError` if the connection is
        gone (never sent on another connection)."""
        self.writable().write(data)
        self._sent = True

    async def rpc(self, value: Any, channel: int, reply: tuple[type, ...], timeout: float) -> Any:
        """Send a method and await its reply on ``channel`` (one of the ``reply`` types)."""
        if self.closed.done():
            raise AMQPError("connection closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[channel] = (reply, future)
        self.send(value, channel)
        return await self._reply(future, timeout)

    async def _reply(self, future: asyncio.Future[Any], timeout: float) -> Any:
        """The awaited reply, or AMQPError if the connection closes first."""
        async with asyncio.timeout(timeout):
            done, _ = await asyncio.wait({future, self.closed}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        future.cancel()
        raise AMQPError(str(self.closed.exception() or "connection closed"))

    async def wait_first(self, kind: type, timeout: float) -> Any:
        """The first method of type ``kind`` on channel 0 (it may have arrived already)."""
        for item in self._unclaimed:
            if item[0] == 0 and isinstance(item[1], kind):
                self._unclaimed.remove(item)
                return item[1]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[0] = ((kind,), future)
        return await self._reply(future, timeout)

    # -- failing and closing -----------------------------------------------------------

    def _fail(self, exc: AMQPError) -> None:
        if not self.closed.done():
            self.closed.set_exception(exc)
            self.closed.exception()  # retrieved: a consumer may never await it
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self._pending.clear()
        self.confirms.fail(exc)
        self.reader.contents.clear()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()

    def _protocol_error(self, why: str) -> None:
        if not self.closed.done():
            log.error("closing the broker connection: protocol error: %s", why)
        self._fail(AMQPError(f"protocol error: {why}"))
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def close(self, timeout: float = 5) -> None:
        if self.closed.done():
            self._close_transport()
            return
        self.resume()  # the CloseOk must be read
        with contextlib.suppress(AMQPError, TimeoutError):
            await self.rpc(
                spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0),
                0,
                (spec.Connection.CloseOk,),
                timeout,
            )
        self._fail(AMQPError("closed by the worker"))
        self._close_transport()

    # -- flow control ------------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading from the socket (the broker's frames wait in the kernel and the
        broker): what the worker holds stops growing. Heartbeat silence is not counted."""
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    # -- heartbeats ----------------------------------------------------------------------

    def start_heartbeats(self) -> None:
        """Once the connection is open: heartbeats every half of the negotiated interval."""
        if self.heartbeat:
            self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="amqp-heartbeat")

    async def _heartbeats(self) -> None:
        """Send a heartbeat when idle; give up on a peer silent for two intervals (silence
        while reading is paused is ours, not the peer's)."""
        interval = max(self.heartbeat / 2, 0.5)
        silent = 0.0
        while not self.closed.done():
            await asyncio.sleep(interval)
            if not self._sent and self.transport is not None:
                self.transport.write(_HEARTBEAT)
            self._sent = False
            silent = 0.0 if self._received or self._paused else silent + interval
            self._received = False
            if silent >= self.heartbeat * 2:
                self._fail(AMQPError(f"no data from the broker for {silent:.0f}s"))
                self._close_transport()
                return
