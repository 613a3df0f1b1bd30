"""The one retry policy: backoff and the log lines of a fault (pure, no servers)."""

from __future__ import annotations

import logging

import pytest

from worker.retry import LOG_EVERY_SECONDS, Backoff, Retrying


def test_backoff_doubles_from_a_tenth_of_a_second_up_to_its_cap_with_jitter() -> None:
    """Attempt n waits 0.1 * 2**n seconds, times a jitter of 0.5-1, never past the cap."""
    policy = Backoff(cap=2.0)
    for attempt, full in enumerate((0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0)):
        for _ in range(50):
            assert full * 0.5 <= policy.delay(attempt) <= full
    assert policy.delay(10_000) <= 2.0  # no overflow for a fault that lasts for ever


def test_a_fault_is_logged_once_then_every_30_seconds_then_its_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first failure, then at most one line per LOG_EVERY_SECONDS while it lasts
    (however many attempts), then one line when it recovers; a success without a failure
    says nothing."""
    now = [0.0]
    retrying = Retrying(
        failing="database unavailable",
        recovered="database available again",
        logger=logging.getLogger("test.retry"),
        clock=lambda: now[0],
    )
    caplog.set_level(logging.INFO, logger="test.retry")
    assert retrying.succeeded() is False
    for second in range(95):
        now[0] = float(second)
        retrying.failed("connection refused")
    assert retrying.succeeded() is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "database unavailable, retrying: connection refused",
        "database unavailable, still after 31 attempts, retrying: connection refused",
        "database unavailable, still after 61 attempts, retrying: connection refused",
        "database unavailable, still after 91 attempts, retrying: connection refused",
        "database available again after 95 failed attempts",
    ]
    assert LOG_EVERY_SECONDS == 30


def test_what_is_retried_goes_into_the_line_as_fields(caplog: pytest.LogCaptureFixture) -> None:
    """A batch's retry says which batch (its size) and the attempt, as structured fields,
    on the first line and on the reminders; the failures so far on the reminders."""
    now = [0.0]
    retrying = Retrying(
        failing="database unavailable",
        recovered="database available again",
        logger=logging.getLogger("test.retry.fields"),
        clock=lambda: now[0],
    )
    caplog.set_level(logging.INFO, logger="test.retry.fields")
    retrying.failed("connection refused", batch=500, attempt=1)
    now[0] = 10.0
    retrying.failed("connection refused", batch=500, attempt=2)  # within 30 s: silent
    now[0] = 31.0
    retrying.failed("connection refused", batch=500, attempt=3)
    first, reminder = caplog.records
    assert (first.batch, first.attempt) == (500, 1)  # type: ignore[attr-defined]
    assert (reminder.batch, reminder.attempt) == (500, 3)  # type: ignore[attr-defined]
    assert reminder.failures == 3  # type: ignore[attr-defined]
