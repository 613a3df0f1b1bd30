"""RabbitMQ: connections, the topology, and publishing with confirms.

The topology (names from :class:`~worker.config.Settings`; these are the defaults)::

    exchange prompter.events (topic, durable)
      ├─ prompt_run.*         ──► queue prompter.ingest         (quorum)
      └─ prompt_run.*.replay  ──► queue prompter.ingest.replay  (quorum)
    both queues dead-letter (at-least-once where supported) to
    exchange prompter.dlx (topic, durable) ─ # ──► queue prompter.ingest.dead (quorum)

Both ingest queues carry an explicit delivery limit, so a message that keeps killing its
consumers ends in the dead-letter queue instead of looping. Declaration is idempotent and
done by both the worker and the publishers, so either may start first; with
``PROMPTER_DECLARE=false`` everything is declared passively (checked, never created) for
brokers whose topology an administrator owns.

The worker talks to aiormq directly (the AMQP layer under aio-pika): it needs per-channel
control of acknowledgements and the least CPU per message.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiormq
import aiormq.exceptions
from pamqp import commands as spec

from worker import __version__
from worker.config import Settings, mask_url
from worker.errors import BrokerUnavailable, ConfigError, PublishError, UnroutableError

log = logging.getLogger(__name__)

LIVE_ROUTING_KEY: Final = "prompt_run.v1"
REPLAY_ROUTING_KEY: Final = "prompt_run.v1.replay"
LIVE_BINDING: Final = "prompt_run.*"
REPLAY_BINDING: Final = "prompt_run.*.replay"
DEFAULT_HEARTBEAT_SECONDS: Final = 15
CONNECT_TIMEOUT_SECONDS: Final = 10

# RabbitMQ 3.10 introduced at-least-once dead-lettering for quorum queues.
AT_LEAST_ONCE_SINCE: Final = (3, 10)


@dataclass(frozen=True, kw_only=True)
class Topology:
    exchange: str
    queue: str
    replay_queue: str
    dead_letter_exchange: str
    dead_letter_queue: str
    delivery_limit: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            exchange=settings.exchange,
            queue=settings.queue,
            replay_queue=settings.replay_queue,
            dead_letter_exchange=settings.dead_letter_exchange,
            dead_letter_queue=settings.dead_letter_queue,
            delivery_limit=settings.delivery_limit,
        )

    def ingest_arguments(self, *, at_least_once: bool) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-delivery-limit": self.delivery_limit,
        }
        if at_least_once:
            # At-least-once dead-lettering needs reject-publish overflow: a full queue
            # refuses new publishes (the publisher sees a nack) instead of dropping the head.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args


def broker_version(connection: aiormq.Connection) -> tuple[int, ...]:
    raw = connection.server_properties.get("version", b"0")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _with_defaults(url: str, name: str) -> str:
    """Add a heartbeat (dead peers are noticed in ~2x this) and a connection name."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.setdefault("heartbeat", str(DEFAULT_HEARTBEAT_SECONDS))
    query.setdefault("name", name)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def check_tls(url: str) -> list[str]:
    """Warnings about a URL that weakens TLS. Empty when the URL is fine."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    warnings = []
    if parts.scheme == "amqps" and query.get("no_verify_ssl", "0") not in ("0", ""):
        warnings.append(
            f"{mask_url(url)}: no_verify_ssl disables certificate verification; "
            "anyone on the path can read and forge traffic"
        )
    return warnings


async def connect(amqp_url: str, *, name: str, start: int = 0) -> aiormq.Connection:
    """Connect to the first node that answers, trying the comma-separated URLs in turn
    starting at index ``start``. Raises :class:`BrokerUnavailable` naming every node tried
    (passwords masked)."""
    urls = [u for u in amqp_url.split(",") if u]
    failures = []
    for i in range(len(urls)):
        url = urls[(start + i) % len(urls)]
        try:
            connection = await asyncio.wait_for(
                aiormq.connect(
                    _with_defaults(url, name),
                    client_properties={
                        "connection_name": name,
                        "product": "prompter-worker",
                        "version": __version__,
                    },
                ),
                timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            failures.append(f"{mask_url(url)}: {type(exc).__name__}: {exc}")
            continue
        return connection
    raise BrokerUnavailable("cannot reach RabbitMQ: " + "; ".join(failures))


async def declare(
    channel: aiormq.abc.AbstractChannel,
    topology: Topology,
    *,
    passive: bool = False,
    at_least_once: bool = True,
) -> None:
    """Declare (or, passively, check) the whole topology. Idempotent.

    A queue that exists with other arguments is a :class:`ConfigError` naming it: the broker
    refuses to change a queue's arguments, and guessing would hide a misconfiguration.
    """
    t = topology
    try:
        await channel.exchange_declare(
            t.exchange, exchange_type="topic", durable=True, passive=passive
        )
        await channel.exchange_declare(
            t.dead_letter_exchange, exchange_type="topic", durable=True, passive=passive
        )
        ingest_args = t.ingest_arguments(at_least_once=at_least_once)
        for queue, binding in ((t.queue, LIVE_BINDING), (t.replay_queue, REPLAY_BINDING)):
            await channel.queue_declare(
                queue, durable=True, passive=passive, arguments=None if passive else ingest_args
            )
            if not passive:
                await channel.queue_bind(queue, t.exchange, routing_key=binding)
        await channel.queue_declare(
            t.dead_letter_queue,
            durable=True,
            passive=passive,
            arguments=None if passive else {"x-queue-type": "quorum"},
        )
        if not passive:
            await channel.queue_bind(t.dead_letter_queue, t.dead_letter_exchange, routing_key="#")
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigError(
            f"the broker refused the topology: {exc}. A queue or exchange exists with other "
            "arguments; delete it or align the settings (see README, Topology)."
        ) from None
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise ConfigError(
            f"passive declaration failed, the topology is missing: {exc} "
            "(an administrator must declare it, or set PROMPTER_DECLARE=true)"
        ) from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise ConfigError(
            f"the broker refused access: {exc} (see README, RabbitMQ permissions)"
        ) from None


async def open_topology(
    connection: aiormq.Connection, topology: Topology, *, passive: bool
) -> None:
    """Declare on a short-lived channel (a failed declaration closes its channel)."""
    channel = await connection.channel()
    try:
        await declare(
            channel,
            topology,
            passive=passive,
            at_least_once=broker_version(connection) >= AT_LEAST_ONCE_SINCE,
        )
    finally:
        if not channel.is_closed:
            await channel.close()


def properties(
    *,
    message_id: str | None,
    headers: Mapping[str, Any] | None = None,
    content_type: str | None = "application/json",
    persistent: bool = True,
    **extra: Any,
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=2 if persistent else 1,
        message_id=message_id,
        headers=dict(headers) if headers else None,
        **extra,
    )


async def publish(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    props: spec.Basic.Properties,
    mandatory: bool = True,
    confirm_timeout: float | None = 30,
) -> None:
    """Publish one message and wait for the broker's confirm.

    Raises :class:`UnroutableError` when a mandatory message is returned (no queue bound),
    :class:`PublishError` when nacked, :class:`BrokerUnavailable` when the channel is gone.
    The channel must have been opened with ``publisher_confirms=True`` and
    ``on_return_raises=True``.
    """
    try:
        confirmation = await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=props,
            mandatory=mandatory,
            timeout=confirm_timeout,
        )
    except aiormq.exceptions.PublishError as exc:
        raise UnroutableError(
            f"message {props.message_id} was returned by the broker: nothing is bound to "
            f"exchange {exchange!r} with routing key {routing_key!r}"
        ) from exc
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise UnroutableError(f"exchange {exchange!r} does not exist: {exc}") from exc
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
        raise BrokerUnavailable(f"publish failed: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise PublishError(
            f"no confirm for message {props.message_id} within {confirm_timeout}s"
        ) from exc
    if isinstance(confirmation, spec.Basic.Nack):
        raise PublishError(f"the broker nacked message {props.message_id}")


async def queue_depth(channel: aiormq.abc.AbstractChannel, queue: str) -> tuple[int, int] | None:
    """(messages ready, consumers) of a queue, or None if it does not exist."""
    try:
        ok = await channel.queue_declare(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    return int(ok.message_count or 0), int(ok.consumer_count or 0)
