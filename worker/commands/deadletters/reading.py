"""Reading the dead-letter queue without consuming it: a consumer whose deliveries are
acknowledged only when the caller says so; the queue's depth.

Nothing here consumes what it does not mean to remove. What is only looked at, or not
selected, is handed back when the connection closes, body and headers untouched.
(RabbitMQ 4.0 to 4.2 count such a return as a delivery attempt against a quorum queue's
delivery limit, which defaults to 20 there; the worker declares the dead-letter queue with
``x-delivery-limit: -1`` on RabbitMQ 4.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Final

from worker.amqp import protocol as amqp
from worker.config import Settings
from worker.errors import BrokerUnavailable, ConfigError
from worker.security import mask_url

#: A read that brings nothing for this long means the queue has nothing more to give.
IDLE_SECONDS: Final = 5.0
READ_CHANNEL: Final = 1
QUERY_CHANNEL: Final = 2


class Reader:
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
async def reading(settings: Settings, name: str, prefetch: int) -> AsyncIterator[Reader]:
    """Connect, learn the queue's depth, consume it unacknowledged; closing the connection
    afterwards hands back everything not acknowledged."""
    queue = settings.dead_letter_queue
    reader: Reader | None = None

    def on_delivery(delivery: amqp.Delivery) -> None:
        if reader is not None:
            reader.arrived.put_nowait(delivery)

    connection = await connect(settings, name, on_delivery)
    try:
        try:
            await connection.open_plain(QUERY_CHANNEL)
            depth, _ = await connection.queue_depth(QUERY_CHANNEL, queue)
        except amqp.AMQPError as exc:
            if "404" in str(exc):
                raise ConfigError(
                    f"the dead-letter queue {queue!r} does not exist (has a worker or "
                    "publisher with these settings ever run?)"
                ) from None
            raise BrokerUnavailable(f"cannot inspect queue {queue!r}: {exc}") from None
        reader = Reader(connection, depth)
        if depth and prefetch > 0:
            try:
                await connection.open_channel(READ_CHANNEL, max(1, min(prefetch, 65_535)))
                await connection.consume(READ_CHANNEL, queue)
            except amqp.AMQPError as exc:
                raise BrokerUnavailable(f"reading {queue!r} failed: {exc}") from None
        yield reader
    finally:
        await connection.close()


async def connect(
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
    async with reading(settings, "prompter-worker dead-letters", prefetch=0) as reader:
        return reader.depth
