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

The connections made here are aiormq's (the AMQP layer under aio-pika): the worker
declares (or checks) the topology on one and closes it; the publisher library (publishing
with :mod:`worker.amqp.confirms`) and the ``status`` and ``trace`` commands keep theirs. The
worker consumes, and publishes its dead-letter copies, with its own protocol
(:mod:`worker.amqp.protocol`): it needs per-channel control of acknowledgements and the
least CPU per message. Both read a URL the same way (:class:`worker.amqp.endpoint.Endpoint`).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

import aiormq
import aiormq.exceptions

from worker import __version__
from worker.amqp.endpoint import verification_disabled
from worker.amqp.handshake import parse_version
from worker.config import Settings
from worker.errors import BrokerUnavailable, ConfigError
from worker.logs import redact
from worker.security import mask_url

log = logging.getLogger(__name__)

LIVE_ROUTING_KEY: Final = "prompt_run.v1"
REPLAY_ROUTING_KEY: Final = "prompt_run.v1.replay"
LIVE_BINDING: Final = "prompt_run.*"
REPLAY_BINDING: Final = "prompt_run.*.replay"
DEFAULT_HEARTBEAT_SECONDS: Final = 15
CONNECT_TIMEOUT_SECONDS: Final = 10

# RabbitMQ 3.10 introduced at-least-once dead-lettering for quorum queues; 4.0 gave every
# quorum queue a default delivery limit of 20.
AT_LEAST_ONCE_SINCE: Final = (3, 10)
DEFAULT_DELIVERY_LIMIT_SINCE: Final = (4, 0)


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
    return parse_version(connection.server_properties.get("version", b"0"))


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
    if parts.scheme == "amqps" and verification_disabled(query):
        warnings.append(
            f"{mask_url(url)}: no_verify_ssl disables certificate verification; "
            "anyone on the path can read and forge traffic"
        )
    return warnings


async def connect(
    amqp_url: str, *, name: str, start: int = 0, timeout: float = CONNECT_TIMEOUT_SECONDS
) -> aiormq.Connection:
    """Connect to the first node that answers, trying the comma-separated URLs in turn
    starting at index ``start``, each for at most ``timeout`` seconds.

    Every failure is :class:`BrokerUnavailable` naming every node tried (passwords masked),
    whatever the event loop and whatever aiormq raises: a node that accepts TCP and closes
    at once (a proxy with no healthy backend; aiormq raises ``StopAsyncIteration`` there
    under uvloop), one that never answers, one that speaks another protocol. Only
    cancellation (and ``KeyboardInterrupt``/``SystemExit``) propagates as itself.
    """
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
                timeout=timeout,
            )
        except TimeoutError:
            failures.append(f"{mask_url(url)}: no answer within {timeout:g}s")
            continue
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this task was cancelled: not the node's doing
            # A future inside aiormq was cancelled under it (its connection closing).
            failures.append(f"{mask_url(url)}: the connection was closed while opening")
            continue
        except Exception as exc:  # any other way a connect can fail is the node's fault
            failures.append(f"{mask_url(url)}: {type(exc).__name__}: {redact(str(exc))}")
            continue
        return connection
    if not urls:
        failures.append("no URL given")
    raise BrokerUnavailable("cannot reach RabbitMQ: " + "; ".join(failures))


async def declare(
    channel: aiormq.abc.AbstractChannel,
    topology: Topology,
    *,
    passive: bool = False,
    at_least_once: bool = True,
    unlimited_dead_letters: bool = False,
) -> None:
    """Declare (or, passively, check) the whole topology. Idempotent.

    ``unlimited_dead_letters`` lifts the dead-letter queue's delivery limit (RabbitMQ 4
    would otherwise drop a dead letter that was looked at, and returned, 20 times: it has
    nowhere further to dead-letter to).

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
        dead_args: dict[str, Any] = {"x-queue-type": "quorum"}
        if unlimited_dead_letters:
            dead_args["x-delivery-limit"] = -1
        await channel.queue_declare(
            t.dead_letter_queue,
            durable=True,
            passive=passive,
            arguments=None if passive else dead_args,
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
        version = broker_version(connection)
        await declare(
            channel,
            topology,
            passive=passive,
            at_least_once=version >= AT_LEAST_ONCE_SINCE,
            unlimited_dead_letters=version >= DEFAULT_DELIVERY_LIMIT_SINCE,
        )
    finally:
        if not channel.is_closed:
            await channel.close()
