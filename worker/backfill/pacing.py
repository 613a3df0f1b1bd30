"""What paces, shows and stops a backfill run: :class:`Pacer` (a rate as a schedule),
:class:`Progress` (a bar on a terminal), :class:`Stop` (SIGINT/SIGTERM: stop reading, then
stop waiting)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

from worker.signals import handle_signals


class Pacer:
    """At most ``rate`` events per second in the long run, bursts of at most ``burst``.

    A generic cell rate algorithm: each event is due ``1/rate`` after the previous one's
    due time, and may go up to ``(burst - 1) / rate`` early. Sleeping is done against that
    schedule, so oversleeping once is made up, never accumulated. ``rate=None`` means no
    limit. The default burst is 1/20 s worth of events: one short sleep per burst.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._interval = 1.0 / rate if rate else 0.0
        size = max(1.0, burst if burst is not None else (rate or 0) / 20)
        self._tolerance = (size - 1) * self._interval
        self._due = clock()

    async def wait(self) -> None:
        if self.rate is None:
            return
        now = self._clock()
        due = max(self._due, now)
        self._due = due + self._interval
        if due - now > self._tolerance:
            # Too early: sleep until this event's own due time, so that the next burst's
            # worth of events can go without sleeping (one sleep per burst, not per event).
            await self._sleep(due - now)


class Progress:
    """A progress bar on stderr (bytes read, with rate and ETA, and events per second),
    only when ``enabled`` (the CLI enables it when stderr is a terminal)."""

    def __init__(self, total: int | None, *, enabled: bool, stream: TextIO | None = None) -> None:
        self._bar: Any = None
        self._start = time.monotonic()
        self._shown = 0
        if enabled:
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=stream or sys.stderr,
                dynamic_ncols=True,
                mininterval=0.25,
                smoothing=0.1,
            )

    def update(self, position: int, settled: int) -> None:
        if self._bar is None:
            return
        if position > self._shown:
            self._bar.update(position - self._shown)
            self._shown = position
        elapsed = time.monotonic() - self._start
        rate = settled / elapsed if elapsed > 0 else 0.0
        self._bar.set_postfix_str(f"{settled:,} events, {rate:,.0f} ev/s", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Stop:
    """A request to stop a run: the first :meth:`request` stops reading (what is in flight
    is finished, then the checkpoint saved and the report made); the second stops waiting
    for what is in flight too."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.now = asyncio.Event()

    def request(self) -> None:
        if self.requested.is_set():
            self.now.set()
        self.requested.set()

    def is_set(self) -> bool:
        return self.requested.is_set()


@contextlib.contextmanager
def stop_on_signals(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM call ``stop.request()`` for the duration; the previous handlers
    come back afterwards."""
    with handle_signals(lambda _signum: stop.request()):
        yield
