"""The publisher library other Python services import: events checked against the contract,
then published to the topic exchange with pipelined publisher confirms.

``client`` is the public :class:`Publisher` and its contract (read it first); ``prepare``
makes event ids and checks events; ``connection`` connects, reconnects and declares the
topology; ``inflight`` sends one message and settles its confirm. Every name below is
imported from ``worker.publisher`` itself.
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
