"""The publisher's connection: one node of a cluster URL list at a time, the topology
declared (or checked) on connect, one publishing channel, reconnected on demand.

**One connection attempt at a time.** Concurrent callers that find no channel wait for the
same attempt (each until its own deadline) and share its outcome: against a dead broker
they all fail together when it fails, and the next call after that makes a new attempt,
on the next node. Each attempt is bounded by ``connect_timeout`` per node, and the
topology declaration and channel after it by ``connect_timeout`` again.

A channel that nacked or never confirmed is *retired* (:meth:`Connector.retire`): nothing
more is sent on it, the next send opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import aiormq
import aiormq.abc

from worker.amqp import broker
from worker.errors import BrokerUnavailable, ConfigError, WorkerError

#: How long close() waits for the broker to close the connection, and for cancelled work.
CLOSE_TIMEOUT: Final = 10.0


def closed_error(when: str) -> BrokerUnavailable:
    """What every call on a closed publisher raises (``when``: before what, if anything)."""
    return BrokerUnavailable(" ".join(filter(None, ["the publisher was closed", when])))


class Connector:
    """The connection and the publishing channel of one publisher. ``timeout`` is only
    named in the error of a caller whose deadline passed while connecting."""

    def __init__(
        self,
        amqp_url: str,
        topology: broker.Topology,
        *,
        declare: bool,
        timeout: float,
        connect_timeout: float,
        name: str,
    ) -> None:
        self.amqp_url = amqp_url
        self.topology = topology
        self.declare = declare
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.connection: aiormq.Connection | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None  # the one sent on now
        self.closed = False
        self._opening: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # closing a channel that nacked
        self._next_node = 0

    def refuse_if_closed(self) -> None:
        if self.closed:
            raise closed_error("")

    def shut(self) -> None:
        """Refuse every later call (:func:`closed_error`); nothing reconnects after."""
        self.closed = True

    async def channel_by(self, deadline: float) -> aiormq.abc.AbstractChannel:
        """The open channel, connecting first if needed. Concurrent callers wait for one
        shared attempt (each until its own deadline) and share its outcome."""
        loop = asyncio.get_running_loop()
        while True:
            self.refuse_if_closed()
            channel = self.channel
            if channel is not None and not channel.is_closed:
                return channel
            opening = self._opening
            if opening is None or opening.done():
                opening = self._opening = loop.create_task(self._open())
                opening.add_done_callback(_observed)
            await asyncio.wait([opening], timeout=max(0.0, deadline - loop.time()))
            self.refuse_if_closed()
            if not opening.done():
                raise BrokerUnavailable(
                    f"not connected to RabbitMQ within {self.timeout:g}s (the publish deadline)"
                )
            if opening.cancelled():
                raise BrokerUnavailable("connecting to RabbitMQ was cancelled")
            failure = opening.exception()
            if failure is not None:
                raise _again(failure)

    async def _open(self) -> None:
        """One connection attempt: connect (unless the connection is still up), declare the
        topology, open the publishing channel. Everything it opened is closed on failure."""
        connection = self.connection
        fresh = connection is None or connection.is_closed
        if connection is None or connection.is_closed:
            self.connection = None
            connection = await broker.connect(
                self.amqp_url,
                name=self.name,
                start=self._next_node,
                timeout=self.connect_timeout,
            )
            self._next_node += 1
            self.connection = connection
        step = "declaring the topology" if fresh else "opening a channel"
        try:
            async with asyncio.timeout(self.connect_timeout):
                if fresh:
                    await broker.open_topology(connection, self.topology, passive=not self.declare)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException as exc:
            if self.connection is connection:
                self.connection = None
            await close_quietly(connection)
            if isinstance(exc, WorkerError):
                raise
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable(
                    f"RabbitMQ did not answer within {self.connect_timeout:g}s while {step}"
                ) from None
            if isinstance(exc, Exception):
                raise BrokerUnavailable(f"{step} failed: {type(exc).__name__}: {exc}") from None
            raise
        self.channel = channel

    def retire(
        self, channel: aiormq.abc.AbstractChannel, inflight: set[asyncio.Task[None]]
    ) -> None:
        """Send nothing more on a channel that nacked or never confirmed: the next send
        opens a new one. RabbitMQ 3.10 nacks every publish to a quorum queue, for the life of
        the channel, once the channel's first publish to it met a leader that had just died
        (the queue record still named it); a new channel looks the leader up again. The old
        channel is closed once the publishes still in flight on it (``inflight``) have
        settled."""
        if self.channel is not channel:
            return
        self.channel = None

        async def close_when_settled() -> None:
            if inflight:
                await asyncio.wait(inflight, timeout=self.timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), timeout=CLOSE_TIMEOUT)

        task = asyncio.get_running_loop().create_task(close_when_settled())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def stop_opening(self) -> None:
        """Cancel the connection attempt in progress, if any (it closes what it opened)."""
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            await asyncio.wait([opening], timeout=CLOSE_TIMEOUT)

    async def close(self) -> None:
        """Close the connection; the channels being retired close with it."""
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            await close_quietly(connection)
        for task in set(self._retiring):  # their channels closed with the connection
            task.cancel()


def _observed(task: asyncio.Task[None]) -> None:
    """Retrieve a task's exception: its waiters may all have given up on it."""
    if not task.cancelled():
        task.exception()


def _again(exc: BaseException) -> WorkerError:
    """A shared attempt's failure, as a fresh exception for one more waiter."""
    if isinstance(exc, (BrokerUnavailable, ConfigError)):
        return type(exc)(str(exc))
    return BrokerUnavailable(f"connecting failed: {type(exc).__name__}: {exc}")


async def close_quietly(connection: aiormq.Connection) -> None:
    if connection.is_closed:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT)
