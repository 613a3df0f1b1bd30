"""One retry policy for everything that retries a transient fault (:mod:`worker.errors`):
the worker's database and broker sessions, each batch, dead-lettering and ``replay --direct``.
The publisher library raises the same transient errors and leaves the decision to its
caller (it reconnects on the next call); ``publish`` and ``replay`` stop on one and resume
from their checkpoint, which is what an operator running a backfill wants to see.

- **What is retried**: :class:`~worker.errors.TransientError` only (a lost or refused
  connection, a restart, a deadlock, a missing table while a migration runs). Permanent
  errors (:class:`~worker.errors.PermanentError`: rejections, unroutable or nacked
  publishes, bad input) are never retried by this policy: they are the data's fault, or
  a configuration to fix, and retrying would only repeat them.
- **How long to wait**: exponential from :data:`BASE_SECONDS` (0.1, 0.2, 0.4, ...),
  capped at ``PROMPTER_RETRY_MAX_SECONDS``, times a jitter of 0.5-1 so that replicas do
  not retry in step (:meth:`Backoff.delay`).
- **For how long**: the worker retries for as long as it runs (it holds the messages,
  unacked, and readiness says why); a command with an end (``replay --direct``) gives up
  after ``attempts`` and reports what is unsettled.
- **What is said meanwhile**: one warning at the first failure, then at most one every
  :data:`LOG_EVERY_SECONDS` while it keeps failing, and one line when it recovers
  (:class:`Retrying`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: The first retry waits about this long; each next one twice as long.
BASE_SECONDS: Final = 0.1
#: While a fault lasts, it is logged at most this often.
LOG_EVERY_SECONDS: Final = 30.0


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential backoff with jitter, capped (see the module docstring)."""

    cap: float = 30.0
    base: float = BASE_SECONDS

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0, 1, 2, ...)."""
        raw: float = min(self.cap, self.base * 2.0 ** min(attempt, 30))
        return raw * random.uniform(0.5, 1.0)


@dataclass(kw_only=True)
class Retrying:
    """The log lines of one kind of fault: the first failure (``"<failing>, retrying:
    <reason>"``), then at most one every :data:`LOG_EVERY_SECONDS` while it lasts, then
    the recovery (``"<recovered> after N failed attempts"``). ``failures`` counts the
    attempts since the last success."""

    failing: str  # "database unavailable"
    recovered: str  # "database available again"
    logger: logging.Logger
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    _last_log: float = field(default=0.0, repr=False)

    def failed(self, reason: object, **fields: object) -> None:
        """Record a failure; ``fields`` (what is retried: a batch's size, its attempt)
        go into the log line as structured fields, when one is written."""
        now = self.clock()
        self.failures += 1
        extra = dict(fields)
        if self.failures == 1:
            self.logger.warning("%s, retrying: %s", self.failing, reason, extra=extra)
            self._last_log = now
        elif now - self._last_log >= LOG_EVERY_SECONDS:
            self.logger.warning(
                "%s, still after %d attempts, retrying: %s",
                self.failing,
                self.failures,
                reason,
                extra={**extra, "failures": self.failures},
            )
            self._last_log = now

    def succeeded(self) -> bool:
        """Record a success; True if it ends a run of failures (the recovery was logged)."""
        if self.failures == 0:
            return False
        self.logger.info("%s after %d failed attempts", self.recovered, self.failures)
        self.failures = 0
        return True
