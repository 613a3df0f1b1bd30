"""Bulk publishing and backfill from JSONL files: ``publish``, ``replay``, ``replay --direct``.

::

    files ─► jsonl.Reader (plain or gzip) ─► decode each line (the worker's own rules)
       │ invalid: reported with its line number, reason and detail; never sent
       ▼
    through the broker: Publisher (confirms pipelined) ─► prompter.events
                          routing key prompt_run.v1 (publish) or prompt_run.v1.replay (replay)
    --direct:           batches ─► Store.ingest (one transaction each, two at a time)

Both paths keep the original ``occurred_at``: history lands at its own time.

**Checkpoints** (``--checkpoint PATH``, :mod:`worker.backfill.checkpoint`) make a run resumable:
only settled lines count, and the checkpoint is saved about once a second, when a file is
finished, and when the run stops for any reason. What a run did is a
:class:`~worker.backfill.reports.Report` (:mod:`worker.backfill.reports`).

**Pacing** (``rate``) follows a schedule (GCRA, a token bucket's twin), not a sleep after
each event: the long-run rate is exact whatever the sleeps' jitter, and bursts are bounded.

**Stopping**: the first SIGINT or SIGTERM stops reading, waits for the confirms (or batches)
in flight, saves the checkpoint and reports; a second one stops at once (the checkpoint
still holds only settled lines).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from worker import tracing
from worker.amqp import broker
from worker.backfill import jsonl
from worker.backfill.checkpoint import Checkpoint, Watermark
from worker.backfill.pacing import Pacer, Progress, Stop, stop_on_signals
from worker.backfill.reports import FileReport, Invalid, Rejects, Report
from worker.config import Settings
from worker.errors import (
    DatabaseConflict,
    DatabaseUnavailable,
    InputError,
    Rejection,
    WorkerError,
)
from worker.events import Event
from worker.publisher import DEFAULT_WINDOW, Prepared, Publisher
from worker.retry import backoff
from worker.store import schema
from worker.store.ingest import Outcome, Store
from worker.store.pool import create_pool, unreachable

if TYPE_CHECKING:
    from opentelemetry.trace import Span

CHECKPOINT_EVERY_SECONDS: Final = 1.0
DEFAULT_BATCH_SIZE: Final = 1000
DEFAULT_CONCURRENCY: Final = 2
DEFAULT_REJECTS_PATH: Final = "prompter-rejects.jsonl"
DIRECT_ATTEMPTS: Final = 6  # tries of one batch on transient database faults
TICK_EVERY_LINES: Final = 64  # progress and the checkpoint clock are checked this often


@dataclass(kw_only=True)
class _Input:
    name: str
    identity: jsonl.FileIdentity | None
    after: int
    complete: bool


def _inputs(paths: Sequence[str], checkpoint: Checkpoint | None, *, force: bool) -> list[_Input]:
    """Check every input before anything is sent: readable, not stdin twice, and not
    changed since its checkpoint."""
    if not paths:
        raise InputError("no input file given")
    if paths.count(jsonl.STDIN) > 1:
        raise InputError("stdin (-) can be read only once")
    out = []
    for name in paths:
        if name == jsonl.STDIN:
            if checkpoint is not None:
                raise InputError("stdin (-) cannot be resumed: a checkpoint needs files")
            out.append(_Input(name=name, identity=None, after=0, complete=False))
            continue
        identity = jsonl.FileIdentity.of(name)
        after, complete = checkpoint.resume(identity, force=force) if checkpoint else (0, False)
        out.append(_Input(name=name, identity=identity, after=after, complete=complete))
    return out


class _Run:
    """State shared by both loops: the report, checkpoint, progress, rejects, stop."""

    def __init__(
        self,
        report: Report,
        inputs: list[_Input],
        *,
        checkpoint: Checkpoint | None,
        rejects: Rejects | None,
        progress: bool,
        stop: Stop | None,
    ) -> None:
        self.report = report
        self.inputs = inputs
        self.checkpoint = checkpoint
        self.rejects = rejects
        self.stop = stop or Stop()
        sizes = [i.identity.size if i.identity else None for i in inputs]
        total = None if None in sizes else sum(s or 0 for s in sizes)
        self.progress = Progress(total, enabled=progress)
        self.marks: list[tuple[_Input, FileReport, Watermark, bool]] = []  # bool: EOF reached
        self.failure: BaseException | None = None
        self.eof = False  # the current file was read to its end
        self.base = 0  # bytes of the files finished before the current one
        self._saved_at = time.monotonic()
        self._started = time.monotonic()

    @classmethod
    def start(
        cls,
        mode: str,
        paths: Sequence[str],
        *,
        dry_run: bool,
        checkpoint: Checkpoint | None,
        force: bool,
        rejects: Rejects | None,
        progress: bool,
        stop: Stop | None,
    ) -> _Run:
        """A run of ``mode`` over ``paths``, its inputs checked (:func:`_inputs`)."""
        report = Report(
            mode=mode,
            dry_run=dry_run,
            checkpoint=checkpoint.path if checkpoint else None,
            rejects_path=rejects.path if rejects else None,
        )
        inputs = _inputs(paths, checkpoint, force=force)
        return cls(
            report, inputs, checkpoint=checkpoint, rejects=rejects, progress=progress, stop=stop
        )

    def valid_events(
        self,
        inp: _Input,
        file: FileReport,
        mark: Watermark,
        reader: jsonl.Reader,
        *,
        columns: bool,
    ) -> Iterator[tuple[int, Event]]:
        """The valid events of one file after its checkpoint, with their line numbers
        (``columns``: whether the store will write them, see :func:`worker.events.decode`).
        Invalid lines are reported and settled here; it ends early on a failure or a stop.
        ``self.eof`` tells afterwards whether the file was read to its end (False too when
        the caller broke off)."""
        self.eof = False
        for line, item in reader.events(after=inp.after, columns=columns):
            if self.failure or self.stop.is_set():
                return
            if isinstance(item, Rejection):
                self.invalid(file, _invalid(inp.name, line, item))
                mark.skip(line)
                continue
            file.valid += 1
            yield line, item
            if line % TICK_EVERY_LINES == 0:
                self.tick(reader)
        self.eof = True

    def invalid(self, file: FileReport, invalid: Invalid) -> None:
        file.invalid.append(invalid)
        if self.rejects is not None:
            self.rejects.write(invalid)

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc

    def tick(self, reader: jsonl.Reader, force: bool = False) -> None:
        """Progress, and a checkpoint about once a second."""
        self.progress.update(self.base + reader.position, self.report.confirmed)
        if force or time.monotonic() - self._saved_at >= CHECKPOINT_EVERY_SECONDS:
            self.save()

    def save(self) -> None:
        self._saved_at = time.monotonic()
        if self.checkpoint is None or self.report.dry_run:
            return
        for inp, file, mark, eof in self.marks:
            if inp.identity is not None:
                complete = (
                    eof and mark.pending == 0 and not file.unconfirmed and file.held_back is None
                )
                self.checkpoint.record(inp.identity, mark.value, complete=complete)
        self.checkpoint.save()

    def finish(self) -> Report:
        report = self.report
        report.elapsed = time.monotonic() - self._started
        for inp in self.inputs[len(report.files) :]:  # never started: a failure or a stop
            report.files.append(FileReport(name=inp.name, resumed_after=inp.after, reached=False))
        if self.failure is not None and report.error is None:
            report.error = str(self.failure) or type(self.failure).__name__
        if self.stop.is_set():
            report.interrupted = True
        self.progress.close()
        if self.rejects is not None:
            self.rejects.close()
            report.rejects_written = self.rejects.written
        return report


def _start_file(run: _Run, inp: _Input) -> tuple[FileReport, Watermark] | None:
    file = FileReport(name=inp.name, resumed_after=inp.after)
    run.report.files.append(file)
    if inp.complete:
        file.already_complete = True
        return None
    mark = Watermark(inp.after)
    run.marks.append((inp, file, mark, False))
    return file, mark


def _end_file(run: _Run, reader: jsonl.Reader) -> None:
    eof = run.eof
    inp, file, mark, _ = run.marks[-1]
    if eof:
        file.held_back = reader.held_back
    run.marks[-1] = (inp, file, mark, eof)
    if not eof:
        file.stopped_after = mark.high
    run.tick(reader, force=True)  # the bar at the end of this file: base + its position
    run.base += reader.size or 0


async def _until(awaitable: Awaitable[Any], abort: asyncio.Event) -> bool:
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


# --- through the broker ---------------------------------------------------------------------


async def publish_files(
    paths: Sequence[str],
    publisher: Publisher | None,
    *,
    routing_key: str = broker.REPLAY_ROUTING_KEY,
    mode: str = "replay",
    max_bytes: int,
    rate: float | None = None,
    checkpoint: Checkpoint | None = None,
    force: bool = False,
    rejects: Rejects | None = None,
    progress: bool = False,
    stop: Stop | None = None,
) -> Report:
    """Publish every valid line of ``paths`` with ``routing_key``; ``publisher=None`` is a
    dry run (validate and report). Never raises for what happens to single events or the
    broker: the report says what was confirmed and the error that stopped the run."""
    run = _Run.start(
        mode,
        paths,
        dry_run=publisher is None,
        checkpoint=checkpoint,
        force=force,
        rejects=rejects,
        progress=progress,
        stop=stop,
    )
    pacer = Pacer(rate)

    def settled(file: FileReport, mark: Watermark, line: int, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            file.unconfirmed += 1
            return
        exc = future.exception()
        if exc is None:
            file.confirmed += 1
            mark.confirmed(line)
        else:
            file.unconfirmed += 1
            run.fail(exc)

    try:
        for inp in run.inputs:
            if run.failure or run.stop.is_set():
                break
            started = _start_file(run, inp)
            if started is None:
                continue
            file, mark = started
            with jsonl.Reader(inp.name, max_bytes=max_bytes) as reader:
                for line, event in run.valid_events(inp, file, mark, reader, columns=False):
                    if publisher is None:
                        mark.skip(line)
                        continue
                    await pacer.wait()
                    try:
                        future = await publisher.send(
                            Prepared.from_event(event), routing_key=routing_key
                        )
                    except WorkerError as exc:
                        run.fail(exc)
                        break
                    mark.sent(line)
                    future.add_done_callback(functools.partial(settled, file, mark, line))
                if publisher is not None:  # this file's confirms, before it is called done
                    await _until(publisher.flush(), run.stop.now)
                _end_file(run, reader)
    except InputError as exc:
        run.fail(exc)
    finally:
        if publisher is not None:
            await _until(publisher.flush(), run.stop.now)
        run.save()
        run.finish()
    return run.report


def _invalid(name: str, line: int, rejection: Rejection, event: Event | None = None) -> Invalid:
    return Invalid(
        file=name,
        line=line,
        reason=rejection.reason,
        detail=rejection.detail,
        event_id=event.event_id if event else None,
    )


# --- straight into PostgreSQL ---------------------------------------------------------------


async def ingest_files(
    paths: Sequence[str],
    store: Store | None,
    *,
    max_bytes: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = 8 * 1_048_576,
    concurrency: int = DEFAULT_CONCURRENCY,
    rate: float | None = None,
    checkpoint: Checkpoint | None = None,
    force: bool = False,
    rejects: Rejects | None = None,
    progress: bool = False,
    stop: Stop | None = None,
    retry_max_seconds: float = 30.0,
) -> Report:
    """Store every valid line of ``paths`` through :meth:`Store.ingest`, in batches of at
    most ``batch_size`` events and ``batch_bytes`` bytes (a larger single event alone),
    ``concurrency`` batches at a time (give the store's pool as many connections): what a
    run holds is bounded by ``concurrency + 1`` batches. ``store=None`` is a dry run. Lines
    the contract or the store refuses go to ``rejects``. A transient database fault is
    retried with backoff (up to :data:`DIRECT_ATTEMPTS` tries of the batch), then stops the
    run."""
    run = _Run.start(
        "direct",
        paths,
        dry_run=store is None,
        checkpoint=checkpoint,
        force=force,
        rejects=rejects,
        progress=progress,
        stop=stop,
    )
    pacer = Pacer(rate)
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def write(
        name: str, file: FileReport, mark: Watermark, batch: list[tuple[int, Event]]
    ) -> None:
        assert store is not None
        attributes = {"prompter.events": len(batch), "prompter.replay.file": name}
        with tracing.span(store.tracer, tracing.REPLAY_BATCH, attributes) as span:
            await write_batch(name, file, mark, batch, span)

    async def write_batch(
        name: str,
        file: FileReport,
        mark: Watermark,
        batch: list[tuple[int, Event]],
        span: Span | None,
    ) -> None:
        assert store is not None
        try:
            events = [e for _, e in batch]
            attempt = 0
            while True:
                try:
                    result = await store.ingest(events)
                    break
                except (DatabaseUnavailable, DatabaseConflict) as exc:
                    attempt += 1
                    if attempt >= DIRECT_ATTEMPTS or run.stop.is_set() or run.failure:
                        file.unconfirmed += len(batch)
                        run.fail(exc)
                        return
                    await asyncio.sleep(backoff(attempt + 1, retry_max_seconds))
                except Exception as exc:  # not worth retrying: a missing table, say
                    file.unconfirmed += len(batch)
                    run.fail(exc)
                    return
            if span is not None:
                span.set_attributes(_counts(result.outcomes, attempt))
            for (line, event), outcome in zip(batch, result.outcomes, strict=True):
                if isinstance(outcome, Rejection):
                    file.refused += 1
                    run.invalid(file, _invalid(name, line, outcome, event))
                else:
                    file.confirmed += 1
                    if outcome is Outcome.STORED:
                        file.stored += 1
                    else:
                        file.duplicates += 1
                mark.confirmed(line)
        finally:
            slots.release()

    async def submit(
        name: str, file: FileReport, mark: Watermark, batch: list[tuple[int, Event]]
    ) -> None:
        await slots.acquire()
        task = asyncio.create_task(write(name, file, mark, batch))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        for inp in run.inputs:
            if run.failure or run.stop.is_set():
                break
            started = _start_file(run, inp)
            if started is None:
                continue
            file, mark = started
            batch: list[tuple[int, Event]] = []
            held = 0
            with jsonl.Reader(inp.name, max_bytes=max_bytes) as reader:
                for line, event in run.valid_events(
                    inp, file, mark, reader, columns=store is not None
                ):
                    if store is None:
                        mark.skip(line)
                        continue
                    await pacer.wait()
                    if batch and held + len(event.body) > batch_bytes:
                        await submit(inp.name, file, mark, batch)
                        batch, held = [], 0
                    batch.append((line, event))
                    held += len(event.body)
                    mark.sent(line)
                    if len(batch) >= batch_size:
                        await submit(inp.name, file, mark, batch)
                        batch, held = [], 0
                if batch and not run.failure and not run.stop.now.is_set():
                    await submit(inp.name, file, mark, batch)
                if tasks:
                    await _until(asyncio.wait(set(tasks)), run.stop.now)
                _end_file(run, reader)
    except InputError as exc:
        run.fail(exc)
    finally:
        if tasks:
            await _until(asyncio.wait(set(tasks)), run.stop.now)
            for task in set(tasks):
                task.cancel()  # stopped at once: their lines stay unsettled
        run.save()
        run.finish()
    return run.report


# --- the commands ---------------------------------------------------------------------------


async def run_broker(
    settings: Settings,
    paths: Sequence[str],
    *,
    mode: str,
    routing_key: str,
    window: int = DEFAULT_WINDOW,
    rate: float | None = None,
    dry_run: bool = False,
    checkpoint_path: str | None = None,
    force: bool = False,
    rejects_path: str | None = None,
    progress: bool = False,
    name: str = "prompter-worker replay",
) -> Report:
    """``publish`` and ``replay``: files through the broker, stopped gracefully by SIGINT or
    SIGTERM. Raises only for what is wrong before anything is sent (an unreadable input, a
    changed file, a bad checkpoint); everything later is in the report."""
    checkpoint = Checkpoint.load(checkpoint_path) if checkpoint_path else None
    stop = Stop()
    # The publisher connects on its first send, after publish_files has checked the inputs.
    publisher = (
        None
        if dry_run
        else Publisher.from_settings(settings, window=window, name=name, app_id="prompter-worker")
    )
    rejects = Rejects(rejects_path) if rejects_path else None
    try:
        with stop_on_signals(stop):
            return await publish_files(
                paths,
                publisher,
                routing_key=routing_key,
                mode=mode,
                max_bytes=settings.max_event_bytes,
                rate=rate,
                checkpoint=checkpoint,
                force=force,
                rejects=rejects,
                progress=progress,
                stop=stop,
            )
    finally:
        if publisher is not None:
            await publisher.close(grace=0 if stop.now.is_set() else None)


def _counts(outcomes: Sequence[Outcome | Rejection], retries: int) -> dict[str, int]:
    """A ``replay --direct`` batch's span attributes."""
    return {
        "prompter.stored": sum(o is Outcome.STORED for o in outcomes),
        "prompter.duplicates": sum(o is Outcome.DUPLICATE for o in outcomes),
        "prompter.rejected": sum(isinstance(o, Rejection) for o in outcomes),
        "prompter.retries": retries,
    }


async def run_direct(
    settings: Settings,
    paths: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    rate: float | None = None,
    dry_run: bool = False,
    checkpoint_path: str | None = None,
    force: bool = False,
    rejects_path: str = DEFAULT_REJECTS_PATH,
    progress: bool = False,
) -> Report:
    """``replay --direct``: files straight into PostgreSQL, no broker; a pool of
    ``concurrency`` connections, one batch in flight on each."""
    checkpoint = Checkpoint.load(checkpoint_path) if checkpoint_path else None
    _inputs(paths, checkpoint, force=force)
    stop = Stop()
    rejects = Rejects(rejects_path)
    pool = None
    try:
        if not dry_run:
            pool = await _open_pool(settings, concurrency)
        with stop_on_signals(stop):
            return await ingest_files(
                paths,
                Store(pool, tracer=tracing.current()) if pool is not None else None,
                max_bytes=settings.max_event_bytes,
                batch_size=batch_size,
                batch_bytes=settings.batch_max_bytes,
                concurrency=concurrency,
                rate=rate,
                checkpoint=checkpoint,
                force=force,
                rejects=rejects,
                progress=progress,
                stop=stop,
                retry_max_seconds=settings.retry_max_seconds,
            )
    finally:
        if pool is not None:
            await asyncio.wait_for(pool.close(), timeout=30)


async def _open_pool(settings: Settings, size: int) -> asyncpg.Pool:
    url = settings.database_url
    try:
        pool = await create_pool(
            url,
            min_size=size,
            max_size=size,
            statement_cache_size=settings.statement_cache_size,
        )
    except WorkerError as exc:
        raise unreachable(url, exc) from None
    try:
        async with pool.acquire() as conn:
            await schema.require(conn, database_url=url)  # SchemaError: exit 2
    except BaseException:
        await pool.close()
        raise
    return pool
