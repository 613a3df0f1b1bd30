"""The publisher library other Python services import: events checked against the contract,
then published to the topic exchange with pipelined publisher confirms.

::

    from worker.publisher import Publisher, new_event_id

    async with Publisher("amqp://user:pass@rabbitmq/") as publisher:
        await publisher.publish(event)               # one event: a dict, or JSON bytes
        await publisher.publish_many(more_events)    # many, confirms pipelined

Every event is checked against the v1 contract (:func:`worker.events.decode`, the worker's
own decoder) before anything is sent: an invalid event raises
:class:`~worker.errors.Rejection` with its machine ``reason`` and a ``detail`` naming the
field, and nothing invalid ever reaches the broker. Each message is persistent,
``application/json``, ``mandatory``, with ``message_id`` = ``event_id``, and counts as
published only once the broker has confirmed it. Failures raise, from the tree in
:mod:`worker.errors`, and nothing else does (cancelling the caller aside):

- :class:`~worker.errors.UnroutableError`: the broker returned the message (no queue is
  bound for the routing key) or the exchange does not exist;
- :class:`~worker.errors.PublishError`: the broker nacked it (a full queue refuses
  publishes), or no confirm came before the publish's deadline (``timeout``); the next
  send goes out on a new channel (RabbitMQ 3.10 keeps nacking on a channel that first met a
  quorum queue's dead leader);
- :class:`~worker.errors.BrokerUnavailable`: no node could be reached (or none answered
  before the deadline), the connection was lost before the confirm (the next call
  reconnects), or the publisher is closed;
- :class:`~worker.errors.ConfigError`: the topology exists with other arguments, or (with
  ``declare=False``) does not exist.

A failed publish may still have reached the queue (the confirm was lost with the
connection): publish it again. Ingestion is idempotent by ``event_id``, so a repeat stores
nothing twice.

**One deadline per message.** ``timeout`` (default 30 s) bounds everything a publish
waits for: a window slot, the connection (shared, see
:mod:`worker.publisher.connection`), the broker's confirm. A broker that accepts TCP and
never answers fails a publish after ``timeout`` at most, and each connection attempt after
``connect_timeout`` per node.

**close() is final.** It waits (``grace``) for the confirms in flight, fails those still
unconfirmed and every caller still waiting (for a slot or the connection) with
BrokerUnavailable saying the publisher is closed, and closes the connection; every later
call raises the same way and nothing reconnects.

**Event ids.** :func:`new_event_id` makes time-ordered ids (UUIDv7): new rows then land at
the end of the results table's primary-key index instead of all over it. The contract
accepts any UUID.

The topology (:class:`worker.amqp.broker.Topology`) is declared on connect, idempotently, so
publishers and workers may start in any order; with ``declare=False`` it is only checked.

**Pipelining.** :meth:`Publisher.publish_many` (and the lower-level :meth:`Publisher.send`)
keep up to ``window`` messages awaiting their confirm instead of one round trip per
message; ``bench/publish.py`` measures both and chose :data:`DEFAULT_WINDOW`.

**Modules.** ``client`` is :class:`Publisher`; ``prepare`` makes event ids and checks
events; ``connection`` connects, reconnects and declares the topology; ``inflight`` sends
one message and settles its confirm (and says why the publisher uses aiormq). Every name
below is imported from ``worker.publisher`` itself.
"""

from worker import logs
from worker.errors import (
    BrokerUnavailable,
    ConfigError,
    PublishError,
    Rejection,
    UnroutableError,
    WorkerError,
)
from worker.publisher.client import (
    DEFAULT_BYTES_IN_FLIGHT,
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    Publisher,
)
from worker.publisher.connection import CLOSE_TIMEOUT
from worker.publisher.inflight import CONTENT_TYPE
from worker.publisher.prepare import EventInput, Prepared, new_event_id, prepare

logs.guard_amqp_loggers()  # no message body in aiormq's log records, whoever set up logging

__all__ = [
    "CLOSE_TIMEOUT",
    "CONTENT_TYPE",
    "DEFAULT_BYTES_IN_FLIGHT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "BrokerUnavailable",
    "ConfigError",
    "EventInput",
    "Prepared",
    "PublishError",
    "Publisher",
    "Rejection",
    "UnroutableError",
    "WorkerError",
    "new_event_id",
    "prepare",
]
