"""One exception tree for the whole worker.

::

    WorkerError
    ├── ConfigError              invalid settings; the process exits with a message, never a trace
    │   └── SchemaError          the database schema is missing, behind, or newer and incompatible,
    │                            or a migration failed: one line, naming the fix (exit 2)
    ├── PermanentError           the same input will fail the same way again: never retried
    │   ├── Rejection (value)    one event refused, with a machine ``reason`` and a human ``detail``
    │   │                        (raised by the publisher library; returned, not raised, by
    │   │                        the decoder and the store, which handle batches)
    │   ├── UnroutableError      the broker returned a mandatory message: no queue is bound
    │   ├── PublishError         the broker refused (nacked) or never confirmed a message
    │   └── InputError           a backfill input cannot be used: unreadable or truncated file,
    │                            or a file that changed since its checkpoint
    └── TransientError           the infrastructure failed; retry with backoff, dead-letter nothing
        ├── DatabaseUnavailable  connection lost or refused, server starting or shutting down,
        │                        too many connections, cached plan invalidated by a migration
        ├── DatabaseConflict     deadlock or serialization failure: retry the transaction
        ├── DatabaseError        any other database failure that is not the data's fault
        │                        (missing table, missing privilege): retried, logged as an error
        └── BrokerUnavailable    the broker connection or channel is gone

Rejections are permanent and belong to one event; transient errors belong to the batch and
never turn into rejections. :func:`worker.store.classify.classify` maps asyncpg exceptions onto
this tree by SQLSTATE and exception type; :mod:`worker.retry` is the one policy that retries
what is transient.

``UnroutableError`` and ``PublishError`` are permanent for a *publisher*: the same message to
the same topology fails the same way, and the caller decides. The worker's own dead-letter
copy is the exception it cannot hand to anyone: a copy returned or nacked means the
dead-letter queue is missing or full, which is the operator's to fix, so the worker retries
it with the same policy (and says so in readiness) rather than lose the rejected event.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """Settings are invalid. The message names each variable and flag, and says why."""


class SchemaError(ConfigError):
    """The schema is not one this worker can run on, or ``migrate`` failed.

    The message is one line: what is missing or what failed, and the command that fixes it.
    """


class PermanentError(WorkerError):
    """The same input will fail the same way again."""


class Rejection(PermanentError):
    """One event refused: ``reason`` is a machine code, ``detail`` a human sentence.

    ``detail`` names the field or JSON path at fault; it never quotes the payload beyond
    the offending field name, so it is safe to log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejection) and (self.reason, self.detail) == (
            other.reason,
            other.detail,
        )

    def __hash__(self) -> int:
        return hash((self.reason, self.detail))

    def __repr__(self) -> str:
        return f"Rejection({self.reason!r}, {self.detail!r})"


class UnroutableError(PermanentError):
    """A mandatory message was returned by the broker: nothing is bound to take it."""


class PublishError(PermanentError):
    """The broker nacked a message, or the confirm never came."""


class InputError(PermanentError):
    """An input file of ``publish`` or ``replay`` (or its checkpoint) cannot be used.

    The message names the file (and the line, when reading failed part way) and says why.
    """


class TransientError(WorkerError):
    """A fault of the infrastructure, not of the data: retry later, keep the messages."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL cannot be reached or is not accepting work right now."""


class DatabaseConflict(TransientError):
    """Deadlock or serialization failure: the transaction can simply be run again."""


class DatabaseError(TransientError):
    """A database failure that is not the data's fault (schema, privileges, internal)."""


class BrokerUnavailable(TransientError):
    """RabbitMQ cannot be reached, or the channel closed under us."""
