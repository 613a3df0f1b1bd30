"""Where the backfill loop (:mod:`worker.backfill.run`) hands valid events: a
:class:`Sink`. Two of them:

- :class:`BrokerSink` (``publish``, ``replay``): each event published with the routing key,
  confirms pipelined by the :class:`~worker.publisher.Publisher`; a line settles at its
  confirm.
- :class:`DirectSink` (``replay --direct``): events in batches to
  :meth:`Store.ingest <worker.store.ingest.Store.ingest>`, ``concurrency`` transactions at
  a time; a line settles when its batch commits (stored, a duplicate, or refused by the
  store). A transient database fault is retried with the one policy (:mod:`worker.retry`),
  up to :data:`DIRECT_ATTEMPTS` tries of the batch, then stops the run.

A sink reports a failure that must stop the run by raising a
:class:`~worker.errors.WorkerError` from :meth:`Sink.send`, or with ``run.fail``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, Protocol

from worker import tracing
from worker.errors import Rejection, TransientError
from worker.events import Event
from worker.publisher import Prepared, Publisher
from worker.retry import Backoff, Retrying
from worker.store.ingest import Outcome, Store

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from worker.backfill.run import OpenFile, Run

DIRECT_ATTEMPTS: Final = 6  # tries of one batch on transient database faults

log = logging.getLogger(__name__)

_Batch = list[tuple[int, Event]]  # (line number, event)


class Sink(Protocol):
    """What the backfill loop sends through (see the module docstring)."""

    #: Whether events are decoded with the store's columns (:func:`worker.events.decode`).
    columns: bool

    async def send(self, run: Run, file: OpenFile, line: int, event: Event) -> None:
        """Take ``event`` (line ``line`` of ``file``); ``file.mark.sent(line)`` once it is
        on its way, ``file.mark.confirmed(line)`` when it is settled."""

    async def end_file(self, run: Run, file: OpenFile) -> None:
        """Send what is held of ``file`` and wait until its lines settle (or a stop now)."""

    async def end_run(self, run: Run) -> None:
        """Wait for what is in flight (or not, on a stop now); nothing is sent after."""


async def until(awaitable: Awaitable[Any], abort: asyncio.Event) -> bool:
    """Await ``awaitable`` unless ``abort`` is set first (then cancel it); True if done."""
    work = asyncio.ensure_future(awaitable)
    if abort.is_set():
        work.cancel()
        return False
    waiter = asyncio.ensure_future(abort.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work.done():
        return True
    work.cancel()
    return False


class BrokerSink:
    """Publish with ``routing_key``, confirms pipelined (up to the publisher's window)."""

    columns = False

    def __init__(self, publisher: Publisher, *, routing_key: str) -> None:
        self.publisher = publisher
        self.routing_key = routing_key

    async def send(self, run: Run, file: OpenFile, line: int, event: Event) -> None:
        future = await self.publisher.send(Prepared.from_event(event), routing_key=self.routing_key)
        file.mark.sent(line)
        future.add_done_callback(functools.partial(self._settled, run, file, line))

    @staticmethod
    def _settled(run: Run, file: OpenFile, line: int, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            file.report.unconfirmed += 1
            return
        exc = future.exception()
        if exc is None:
            file.report.confirmed += 1
            file.mark.confirmed(line)
        else:
            file.report.unconfirmed += 1
            run.fail(exc)

    async def end_file(self, run: Run, file: OpenFile) -> None:
        await until(self.publisher.flush(), run.stop.now)

    async def end_run(self, run: Run) -> None:
        await until(self.publisher.flush(), run.stop.now)


class DirectSink:
    """Batches of at most ``batch_size`` events and ``batch_bytes`` bytes (a larger single
    event alone) to ``store``, ``concurrency`` at a time (give the store's pool as many
    connections): what a run holds is bounded by ``concurrency + 1`` batches."""

    columns = True

    def __init__(
        self,
        store: Store,
        *,
        batch_size: int,
        batch_bytes: int,
        concurrency: int,
        backoff: Backoff,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.backoff = backoff
        self.retrying = Retrying(
            failing="a batch could not be stored",
            recovered="batches are stored again",
            logger=log,
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: _Batch = []
        self._held = 0  # bytes of the events in _batch

    async def send(self, run: Run, file: OpenFile, line: int, event: Event) -> None:
        if self._batch and self._held + len(event.body) > self.batch_bytes:
            await self._submit(run, file)
        self._batch.append((line, event))
        self._held += len(event.body)
        file.mark.sent(line)
        if len(self._batch) >= self.batch_size:
            await self._submit(run, file)

    async def end_file(self, run: Run, file: OpenFile) -> None:
        if self._batch and not run.failure and not run.stop.now.is_set():
            await self._submit(run, file)
        self._batch, self._held = [], 0  # a batch left over is never sent: unsettled
        if self._tasks:
            await until(asyncio.wait(set(self._tasks)), run.stop.now)

    async def end_run(self, run: Run) -> None:
        if self._tasks:
            await until(asyncio.wait(set(self._tasks)), run.stop.now)
            for task in set(self._tasks):
                task.cancel()  # stopped at once: their lines stay unsettled

    async def _submit(self, run: Run, file: OpenFile) -> None:
        batch, self._batch, self._held = self._batch, [], 0
        await self._slots.acquire()
        task = asyncio.create_task(self._write(run, file, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, run: Run, file: OpenFile, batch: _Batch) -> None:
        attributes = {"prompter.events": len(batch), "prompter.replay.file": file.name}
        try:
            with tracing.span(self.store.tracer, tracing.REPLAY_BATCH, attributes) as span:
                await self._write_batch(run, file, batch, span)
        finally:
            self._slots.release()

    async def _write_batch(
        self, run: Run, file: OpenFile, batch: _Batch, span: Span | None
    ) -> None:
        events = [e for _, e in batch]
        attempt = 0
        while True:
            try:
                result = await self.store.ingest(events)
                self.retrying.succeeded()
                break
            except TransientError as exc:  # retried, as everywhere (worker.retry)
                attempt += 1
                self.retrying.failed(exc, events=len(batch), attempt=attempt)
                if attempt >= DIRECT_ATTEMPTS or run.stop.is_set() or run.failure:
                    file.report.unconfirmed += len(batch)
                    run.fail(exc)
                    return
                await asyncio.sleep(self.backoff.delay(attempt + 1))
            except Exception as exc:  # permanent: a bug, or what no retry would change
                file.report.unconfirmed += len(batch)
                run.fail(exc)
                return
        if span is not None:
            span.set_attributes(
                {
                    "prompter.stored": result.stored,
                    "prompter.duplicates": result.duplicates,
                    "prompter.rejected": len(result.rejected),
                    "prompter.retries": attempt,
                }
            )
        report = file.report
        for (line, event), outcome in zip(batch, result.outcomes, strict=True):
            if isinstance(outcome, Rejection):
                report.refused += 1
                run.invalid(file, line, outcome, event)
            else:
                report.confirmed += 1
                if outcome is Outcome.STORED:
                    report.stored += 1
                else:
                    report.duplicates += 1
            file.mark.confirmed(line)
