"""Opening a worker's two connections to one broker node: the topology declared through
aiormq, then the consumer connection (its channels, deliveries to the dispatcher) and the
publishing connection (a confirm channel), both :mod:`worker.amqp.protocol`'s."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

from worker.amqp import broker
from worker.amqp import protocol as amqp
from worker.config import Settings
from worker.errors import BrokerUnavailable, ConfigError
from worker.ingest.acks import Source
from worker.ingest.batching import Dispatcher
from worker.ingest.prefetch import Prefetch
from worker.security import mask_url

PUBLISH_CHANNEL: Final = 1


@dataclass(frozen=True)
class Connections:
    """A node's URL and the two connections open to it; ``sources`` are the consumer
    connection's channels (live queue, replay queue)."""

    url: str
    consumer: amqp.Connection
    publisher: amqp.Connection
    sources: list[Source]


async def open_connections(
    settings: Settings,
    topology: broker.Topology,
    dispatcher: Dispatcher,
    prefetch: Prefetch,
    *,
    name: str,
    node: int,
) -> Connections:
    """Topology through aiormq on the first node that answers (from ``node`` on), then the
    two connections to the same node. Raises :class:`ConfigError` for a topology the
    broker refuses, :class:`BrokerUnavailable` for anything else."""
    declaring = await broker.connect(settings.amqp_url, name=name, start=node)
    url = str(declaring.url)
    consumer: amqp.Connection | None = None
    publisher: amqp.Connection | None = None
    try:
        await broker.open_topology(declaring, topology, passive=not settings.declare)
        sources = [
            Source(1, settings.queue, replay=False),
            Source(2, settings.replay_queue, replay=True),
        ]
        by_channel = {s.channel: s for s in sources}
        add = dispatcher.add
        clock = asyncio.get_running_loop().time

        def on_delivery(delivery: amqp.Delivery) -> None:
            source = by_channel.get(delivery.channel)
            if source is not None and source.open:
                add(source, delivery, clock())

        consumer = await amqp.connect(
            url, on_delivery, name=f"{name}-consumer", max_body=unread_above(settings)
        )
        for source, configured in zip(sources, prefetch.configured(), strict=True):
            source.connection = consumer
            await consumer.open_channel(source.channel, prefetch.opened(source.channel, configured))
        publisher = await amqp.connect(url, name=f"{name}-publisher")
        await publisher.open_publisher(PUBLISH_CHANNEL)
    except ConfigError:
        await close(consumer, publisher)
        raise
    except Exception as exc:  # whatever a misbehaving node (or proxy) does at connect
        await close(consumer, publisher)
        raise BrokerUnavailable(
            f"setting up the connections to {mask_url(url)} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(declaring.close(), timeout=5)
    return Connections(url, consumer, publisher, sources)


def unread_above(settings: Settings) -> int:
    """Bodies larger than this are refused unread (the queue dead-letters them): half the
    byte budget. Between PROMPTER_MAX_EVENT_BYTES and this, a body is read and refused
    as payload_too_large with a dead-letter copy of its own, like any bad event."""
    return settings.max_held_bytes // 2


async def close(*connections: amqp.Connection | None) -> None:
    """Close each connection given (within 5 s), whatever happens."""
    for connection in connections:
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close(timeout=5)
