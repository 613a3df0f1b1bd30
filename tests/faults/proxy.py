"""A small fault-injecting TCP proxy, 127.0.0.1 to 127.0.0.1, for the fault suite.

Put between a worker and a server, it injects network faults on command:

- ``latency``: every chunk is delivered that many seconds after it was read (both ways);
- ``blackhole()`` / ``restore()``: nothing is delivered, in either direction, and new
  connections are accepted but not connected upstream, until restored; then what was held
  flows again (a stall, as a path that silently drops packets and recovers);
- ``reset()``: every open connection is closed with a TCP RST on both sides.

With ``amqp=True`` it reads the AMQP 0-9-1 frames that pass: it counts ``basic.deliver``
frames and those flagged ``redelivered`` (server to client), and with ``drop_acks`` it
swallows the client's ``basic.ack`` frames, so the broker never learns of an
acknowledgement: what a worker committed stays unacked, as if it had died just after its
commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_END = 0xCE
BASIC = 60
BASIC_DELIVER = 60
BASIC_ACK = 80
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


@dataclass
class AmqpStats:
    deliveries: int = 0
    redelivered: int = 0  # deliveries the broker flagged redelivered
    acks_dropped: int = 0
    by_message_id: Counter[str] = field(default_factory=Counter)  # deliveries per message id

    @property
    def delivered_again(self) -> int:
        """Deliveries of a message id beyond its first (as seen through this proxy)."""
        return sum(n - 1 for n in self.by_message_id.values())


class _FrameFilter:
    """Splits one direction of an AMQP stream into frames; returns the bytes to forward."""

    def __init__(self, *, client_side: bool, decide: Callable[[bytes], bool]) -> None:
        self.buffer = bytearray()
        self.header_pending = client_side  # the client opens with the protocol header
        self.decide = decide

    def feed(self, data: bytes) -> bytes:
        buf = self.buffer
        buf += data
        out = bytearray()
        pos = 0
        if self.header_pending:
            if len(buf) < len(PROTOCOL_HEADER):
                return b""
            out += buf[: len(PROTOCOL_HEADER)]
            pos = len(PROTOCOL_HEADER)
            self.header_pending = False
        while len(buf) - pos >= 7:
            size = struct.unpack_from(">I", buf, pos + 3)[0]
            end = pos + 7 + size + 1
            if len(buf) < end:
                break
            frame = bytes(buf[pos:end])
            if frame[-1] != FRAME_END:
                raise ValueError("not an AMQP frame stream")
            if self.decide(frame):
                out += frame
            pos = end
        del buf[:pos]
        return bytes(out)


def _message_id(frame: bytes) -> str | None:
    """The message-id property of a content header frame, if it has one."""
    flags = struct.unpack_from(">H", frame, 7 + 12)[0]
    pos = 7 + 14
    for bit in range(15, 6, -1):  # content-type ... message-id, in the order of the spec
        if not flags & (1 << bit):
            continue
        if bit == 13:  # headers: a table, skipped by its length
            pos += 4 + struct.unpack_from(">I", frame, pos)[0]
        elif bit in (12, 11):  # delivery-mode, priority: one octet
            pos += 1
        elif bit == 7:
            return frame[pos + 1 : pos + 1 + frame[pos]].decode()
        else:  # a short string
            pos += 1 + frame[pos]
    return None


def _method(frame: bytes) -> tuple[int, int] | None:
    if frame[0] != FRAME_METHOD or len(frame) < 12:
        return None
    class_id, method_id = struct.unpack_from(">HH", frame, 7)
    return class_id, method_id


class FaultProxy:
    """Listens on 127.0.0.1 (a free port); forwards to 127.0.0.1:``upstream_port``."""

    def __init__(self, upstream_port: int, *, amqp: bool = False) -> None:
        self.upstream_port = upstream_port
        self.amqp = amqp
        self.latency = 0.0
        self.drop_acks = False
        self.stats = AmqpStats()
        self.port = 0
        self.connections = 0
        self._delivering: set[int] = set()  # channels whose next header is a delivery's
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # -- faults --------------------------------------------------------------------------

    def blackhole(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def reset(self) -> int:
        """RST every open connection (client and upstream sides); how many sockets."""
        writers = list(self._writers)
        for writer in writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()
        return len(writers)

    # -- plumbing --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        self.connections += 1
        to_server = _FrameFilter(client_side=True, decide=self._client_frame) if self.amqp else None
        to_client = (
            _FrameFilter(client_side=False, decide=self._server_frame) if self.amqp else None
        )
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, to_server)),
            asyncio.create_task(self._pipe(up_reader, writer, to_client)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _client_frame(self, frame: bytes) -> bool:
        if self.drop_acks and _method(frame) == (BASIC, BASIC_ACK):
            self.stats.acks_dropped += 1
            return False
        return True

    def _server_frame(self, frame: bytes) -> bool:
        channel = struct.unpack_from(">H", frame, 1)[0]
        if _method(frame) == (BASIC, BASIC_DELIVER):
            self.stats.deliveries += 1
            tag_length = frame[11]
            flags = frame[12 + tag_length + 8]
            if flags & 1:
                self.stats.redelivered += 1
            self._delivering.add(channel)
        elif frame[0] == FRAME_HEADER and channel in self._delivering:
            self._delivering.discard(channel)
            self.stats.by_message_id[_message_id(frame) or ""] += 1
        return True

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: _FrameFilter | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._open.wait()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                if frames is not None:
                    data = frames.feed(data)
                if data:
                    queue.put_nowait((loop.time() + self.latency, data))
                if sender.done():
                    break
            queue.put_nowait(None)
            await sender
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            self._writers.discard(writer)
            writer.transport.abort()
