"""Bulk publishing and backfill from JSONL files: ``publish``, ``replay``, ``replay --direct``.

::

    files ─► jsonl.Reader (plain or gzip) ─► decode each line (the worker's own rules)
       │ invalid: reported with its line number, reason and detail; never sent
       ▼
    through the broker: Publisher (confirms pipelined) ─► prompter.events
                          routing key prompt_run.v1 (publish) or prompt_run.v1.replay (replay)
    --direct:           batches ─► Store.ingest (one transaction each, two at a time)

Both paths keep the original ``occurred_at``: history lands at its own time.

**Checkpoints** (``--checkpoint PATH``) make a run resumable. For each file they hold its
identity (absolute path, size, modification time, SHA-256 of its first 64 KiB) and its
*watermark*: the highest line number such that every line up to it is settled (confirmed
by the broker, committed to the database, or refused as invalid). Lines still awaiting a
confirm never count. The file is rewritten atomically (a temporary file, fsync,
``os.replace``) about once a second, when a file is finished, and when the run stops for
any reason. A re-run skips each file up to its watermark; the lines between the watermark
and what had been sent are sent again, which ingestion's idempotence makes harmless. A file
that changed since its checkpoint is refused unless ``force`` is given.

**Pacing** (``rate``) follows a schedule (GCRA, a token bucket's twin), not a sleep after
each event: the long-run rate is exact whatever the sleeps' jitter, and bursts are bounded.

**Stopping**: the first SIGINT or SIGTERM stops reading, waits for the confirms (or batches)
in flight, saves the checkpoint and reports; a second one stops at once (the checkpoint
still holds only settled lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import asyncpg
import orjson
from tqdm import tqdm

from worker import broker, jsonl
from worker.config import Settings, mask_url
from worker.errors import (
    ConfigError,
    DatabaseConflict,
    DatabaseUnavailable,
    InputError,
    Rejection,
    WorkerError,
)
from worker.events import Event
from worker.publisher import DEFAULT_WINDOW, Prepared, Publisher
from worker.store import Outcome, Store, create_pool

CHECKPOINT_VERSION: Final = 1
CHECKPOINT_EVERY_SECONDS: Final = 1.0
DEFAULT_BATCH_SIZE: Final = 1000
DEFAULT_CONCURRENCY: Final = 2
DEFAULT_REJECTS_PATH: Final = "prompter-rejects.jsonl"
DIRECT_ATTEMPTS: Final = 6  # tries of one batch on transient database faults
SHOWN_INVALID: Final = 20  # invalid lines listed one by one in the summary
TICK_EVERY_LINES: Final = 64  # progress and the checkpoint clock are checked this often


# --- settling lines in order ----------------------------------------------------------------


class Watermark:
    """The highest line such that every line up to it is settled, for one file.

    Lines are read in increasing order. A line that needs no confirm (invalid, or a dry
    run) is settled when read; a sent line is settled when its confirm (or commit) comes,
    in whatever order confirms arrive. A line whose publish failed is never settled, so the
    watermark stays below it and a resumed run sends it again.
    """

    def __init__(self, start: int = 0) -> None:
        self.value = start
        self._high = start
        self._pending: deque[int] = deque()
        self._done: set[int] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def high(self) -> int:
        """The last line read and handled (skipped or sent)."""
        return self._high

    def skip(self, line: int) -> None:
        """``line`` was read and needs no confirm."""
        self._high = line
        if not self._pending:
            self.value = line

    def sent(self, line: int) -> None:
        """``line`` was sent; it settles when :meth:`confirmed` is called for it."""
        self._high = line
        self._pending.append(line)

    def confirmed(self, line: int) -> None:
        self._done.add(line)
        pending, done = self._pending, self._done
        while pending and pending[0] in done:
            done.discard(pending.popleft())
        self.value = pending[0] - 1 if pending else self._high


# --- pacing ---------------------------------------------------------------------------------


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


# --- checkpoints ----------------------------------------------------------------------------


class Checkpoint:
    """Per-file watermarks, persisted atomically; see the module docstring."""

    def __init__(self, path: str, entries: dict[str, dict[str, Any]] | None = None) -> None:
        self.path = path
        self.entries = entries or {}

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        """The checkpoint at ``path``, or an empty one if the file does not exist yet."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise InputError(f"checkpoint {path}: cannot read: {exc.strerror or exc}") from None
        try:
            doc = orjson.loads(raw)
            if doc.get("version") != CHECKPOINT_VERSION or not isinstance(doc.get("files"), dict):
                raise ValueError(f"version {doc.get('version')!r}, or no files")
            entries = {str(k): dict(v) for k, v in doc["files"].items()}
            for entry in entries.values():
                int(entry["line"]), int(entry["size"]), int(entry["mtime_ns"])
                str(entry["head_sha256"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(
                f"checkpoint {path} is not a prompter-worker checkpoint ({exc}); "
                "name another file with --checkpoint, or delete it to start over"
            ) from None
        return cls(path, entries)

    def resume(self, identity: jsonl.FileIdentity, *, force: bool) -> tuple[int, bool]:
        """(lines already settled, whether the whole file was) for ``identity``.

        Raises :class:`InputError` if the file changed since the checkpoint was written,
        unless ``force``: then its recorded lines are skipped anyway (a file appended to).
        """
        entry = self.entries.get(identity.path)
        if entry is None:
            return 0, False
        changed = []
        if entry["size"] != identity.size:
            changed.append(f"size {entry['size']} -> {identity.size} bytes")
        if entry["head_sha256"] != identity.head_sha256:
            changed.append("its first bytes differ")
        if entry["mtime_ns"] != identity.mtime_ns:
            changed.append("modified since")
        line = int(entry["line"])
        if not changed:
            return line, bool(entry.get("complete"))
        if not force:
            raise InputError(
                f"{identity.path} changed since checkpoint {self.path} recorded it "
                f"({', '.join(changed)}). Use --force to resume after line {line} anyway "
                "(for a file that was only appended to), or delete the checkpoint (or name "
                "another one) to replay the file from its start."
            )
        return line, False

    def record(self, identity: jsonl.FileIdentity, line: int, *, complete: bool) -> None:
        self.entries[identity.path] = {
            "size": identity.size,
            "mtime_ns": identity.mtime_ns,
            "head_sha256": identity.head_sha256,
            "line": line,
            "complete": complete,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def save(self) -> None:
        """Write the checkpoint atomically: a reader sees the old file or the new one."""
        data = orjson.dumps(
            {"version": CHECKPOINT_VERSION, "files": self.entries}, option=orjson.OPT_INDENT_2
        )
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
        )
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


# --- reports --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Invalid:
    """A line refused: by the contract (never sent), or by the store (``--direct``)."""

    file: str
    line: int
    reason: str
    detail: str
    event_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "event_id": self.event_id,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(kw_only=True)
class FileReport:
    name: str
    resumed_after: int = 0  # lines settled by an earlier run, skipped
    already_complete: bool = False  # the checkpoint says the whole file was settled
    valid: int = 0  # lines that passed the contract (sent, unless a dry run)
    confirmed: int = 0  # confirmed by the broker, or committed (--direct)
    stored: int = 0  # --direct: new rows
    duplicates: int = 0  # --direct: events stored before
    unconfirmed: int = 0  # sent, but no confirm (or no commit) came
    refused: int = 0  # --direct: valid by the contract, refused by the store (a template)
    stopped_after: int | None = None  # the last line read, when the run stopped before EOF
    invalid: list[Invalid] = field(default_factory=list)


@dataclass(kw_only=True)
class Report:
    """What a run did, file by file. ``ok`` when every valid line was settled."""

    mode: str  # "publish", "replay", "direct"
    dry_run: bool = False
    files: list[FileReport] = field(default_factory=list)
    error: str | None = None  # the failure that stopped the run
    interrupted: bool = False
    elapsed: float = 0.0
    checkpoint: str | None = None
    rejects_path: str | None = None
    rejects_written: int = 0

    @property
    def valid(self) -> int:
        return sum(f.valid for f in self.files)

    @property
    def confirmed(self) -> int:
        return sum(f.confirmed for f in self.files)

    @property
    def unconfirmed(self) -> int:
        return sum(f.unconfirmed for f in self.files)

    @property
    def invalid(self) -> list[Invalid]:
        return [i for f in self.files for i in f.invalid]

    @property
    def unsent(self) -> int:
        """Valid lines read but neither confirmed nor failed (a stop, or an earlier error)."""
        if self.dry_run:
            return 0
        refused = sum(f.refused for f in self.files)
        return max(0, self.valid - self.confirmed - self.unconfirmed - refused)

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.interrupted
            and not self.invalid
            and not self.unconfirmed
            and not self.unsent
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "dry_run": self.dry_run,
            "valid": self.valid,
            "confirmed": self.confirmed,
            "unconfirmed": self.unconfirmed,
            "invalid": [i.as_dict() for i in self.invalid],
            "error": self.error,
            "interrupted": self.interrupted,
            "elapsed_seconds": round(self.elapsed, 3),
            "files": [
                {
                    "name": f.name,
                    "resumed_after": f.resumed_after,
                    "already_complete": f.already_complete,
                    "valid": f.valid,
                    "confirmed": f.confirmed,
                    "stored": f.stored,
                    "duplicates": f.duplicates,
                    "unconfirmed": f.unconfirmed,
                    "invalid": len(f.invalid),
                }
                for f in self.files
            ],
        }


def render(report: Report, *, with_error: bool = True) -> str:
    """The human summary: what was settled, what was not, and every invalid line's number
    (the first :data:`SHOWN_INVALID` in full), never its content; and the error that
    stopped the run, unless ``with_error`` is false (the CLI prints it on stderr)."""
    out: list[str] = []
    what = {"publish": "published", "replay": "replayed", "direct": "stored"}[report.mode]
    for f in report.files:
        if f.already_complete:
            out.append(f"{f.name}: already complete per the checkpoint, skipped")
        elif f.resumed_after:
            out.append(f"{f.name}: resumed after line {f.resumed_after:,}")
    invalid = report.invalid
    for inv in invalid[:SHOWN_INVALID]:
        out.append(f"{inv.file}:{inv.line}: {inv.reason}: {inv.detail}")
    if len(invalid) > SHOWN_INVALID:
        out.append(f"... and {len(invalid) - SHOWN_INVALID:,} more invalid lines")
    rate = report.confirmed / report.elapsed if report.elapsed > 0 else 0.0
    if report.dry_run:
        out.append(
            f"dry run: {_n(report.valid, 'valid line')}, {len(invalid):,} invalid; nothing sent"
        )
    elif report.mode == "direct":
        stored = sum(f.stored for f in report.files)
        dupes = sum(f.duplicates for f in report.files)
        out.append(
            f"{what} {_n(stored, 'event')} ({dupes:,} stored before), "
            f"{len(invalid):,} refused, in {report.elapsed:.1f}s ({rate:,.0f} events/s)"
        )
    else:
        out.append(
            f"{what} {_n(report.confirmed, 'event')} (confirmed by the broker), "
            f"{_n(len(invalid), 'invalid line')} not sent, in {report.elapsed:.1f}s "
            f"({rate:,.0f} events/s)"
        )
    if invalid:
        counts = Counter(i.reason for i in invalid)
        out.append("invalid by reason: " + ", ".join(f"{r} {n:,}" for r, n in counts.most_common()))
    if report.unconfirmed:
        out.append(f"{_n(report.unconfirmed, 'event')} sent but not confirmed (safe to resend)")
    if report.unsent:
        out.append(f"{_n(report.unsent, 'valid event')} read but not sent")
    for f in report.files:
        if f.stopped_after is not None:
            out.append(
                f"{f.name}: stopped before line {f.stopped_after + 1:,}: "
                "it and the rest were not processed"
            )
    if report.rejects_written:
        out.append(
            f"{_n(report.rejects_written, 'refused line')} appended to {report.rejects_path}"
        )
    if report.interrupted:
        out.append("interrupted")
    if report.checkpoint and not report.dry_run:
        if report.ok:
            out.append(f"checkpoint {report.checkpoint} saved")
        else:
            out.append(
                f"checkpoint {report.checkpoint} saved: run the same command again to continue"
            )
    if report.error and with_error:
        out.append(f"error: {report.error}")
    return "\n".join(out)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# --- the pieces around the loop -------------------------------------------------------------


class Rejects:
    """The rejects file: one JSON object per refused line, appended, opened on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self._fh: Any = None

    def write(self, invalid: Invalid) -> None:
        if self._fh is None:
            try:
                self._fh = open(self.path, "ab")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise InputError(
                    f"rejects file {self.path}: cannot open: {exc.strerror or exc}"
                ) from None
        self._fh.write(orjson.dumps(invalid.as_dict()) + b"\n")
        self.written += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.request)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


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
        self.base = 0  # bytes of the files finished before the current one
        self._saved_at = time.monotonic()
        self._started = time.monotonic()

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
                complete = eof and mark.pending == 0 and not file.unconfirmed
                self.checkpoint.record(inp.identity, mark.value, complete=complete)
        self.checkpoint.save()

    def finish(self) -> Report:
        report = self.report
        report.elapsed = time.monotonic() - self._started
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


def _end_file(run: _Run, reader: jsonl.Reader, *, eof: bool) -> None:
    inp, file, mark, _ = run.marks[-1]
    run.marks[-1] = (inp, file, mark, eof)
    if not eof:
        file.stopped_after = mark.high
    run.base += reader.size or 0
    run.tick(reader, force=True)


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
    report = Report(
        mode=mode,
        dry_run=publisher is None,
        checkpoint=checkpoint.path if checkpoint else None,
        rejects_path=rejects.path if rejects else None,
    )
    run = _Run(
        report,
        _inputs(paths, checkpoint, force=force),
        checkpoint=checkpoint,
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
            eof = False
            with jsonl.Reader(inp.name, max_bytes=max_bytes) as reader:
                for line, item in reader.events(after=inp.after):
                    if run.failure or run.stop.is_set():
                        break
                    if isinstance(item, Rejection):
                        run.invalid(file, _invalid(inp.name, line, item))
                        mark.skip(line)
                        continue
                    file.valid += 1
                    if publisher is None:
                        mark.skip(line)
                    else:
                        await pacer.wait()
                        try:
                            future = await publisher.send(
                                Prepared.from_event(item), routing_key=routing_key
                            )
                        except WorkerError as exc:
                            run.fail(exc)
                            break
                        mark.sent(line)
                        future.add_done_callback(functools.partial(settled, file, mark, line))
                    if line % TICK_EVERY_LINES == 0:
                        run.tick(reader)
                else:
                    eof = True
                if publisher is not None:  # this file's confirms, before it is called done
                    await _until(publisher.flush(), run.stop.now)
                _end_file(run, reader, eof=eof)
    except InputError as exc:
        run.fail(exc)
    finally:
        if publisher is not None:
            await _until(publisher.flush(), run.stop.now)
        run.save()
        run.finish()
    return report


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
    concurrency: int = DEFAULT_CONCURRENCY,
    rate: float | None = None,
    checkpoint: Checkpoint | None = None,
    force: bool = False,
    rejects: Rejects | None = None,
    progress: bool = False,
    stop: Stop | None = None,
    retry_max_seconds: float = 30.0,
) -> Report:
    """Store every valid line of ``paths`` through :meth:`Store.ingest`, in batches of
    ``batch_size``, ``concurrency`` batches at a time (give the store's pool as many
    connections). ``store=None`` is a dry run. Lines the contract or the store refuses go
    to ``rejects``. A transient database fault is retried with backoff (up to
    :data:`DIRECT_ATTEMPTS` tries of the batch), then stops the run."""
    report = Report(
        mode="direct",
        dry_run=store is None,
        checkpoint=checkpoint.path if checkpoint else None,
        rejects_path=rejects.path if rejects else None,
    )
    run = _Run(
        report,
        _inputs(paths, checkpoint, force=force),
        checkpoint=checkpoint,
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
                    delay = min(retry_max_seconds, 0.2 * 2**attempt) * random.uniform(0.5, 1)
                    await asyncio.sleep(delay)
                except WorkerError as exc:  # not worth retrying: a missing table, say
                    file.unconfirmed += len(batch)
                    run.fail(exc)
                    return
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
            eof = False
            batch: list[tuple[int, Event]] = []
            with jsonl.Reader(inp.name, max_bytes=max_bytes) as reader:
                for line, item in reader.events(after=inp.after):
                    if run.failure or run.stop.is_set():
                        break
                    if isinstance(item, Rejection):
                        run.invalid(file, _invalid(inp.name, line, item))
                        mark.skip(line)
                        continue
                    file.valid += 1
                    if store is None:
                        mark.skip(line)
                        continue
                    await pacer.wait()
                    batch.append((line, item))
                    mark.sent(line)
                    if len(batch) >= batch_size:
                        await submit(inp.name, file, mark, batch)
                        batch = []
                        run.tick(reader)
                else:
                    eof = True
                if batch and not run.failure and not run.stop.now.is_set():
                    await submit(inp.name, file, mark, batch)
                if tasks:
                    await _until(asyncio.wait(set(tasks)), run.stop.now)
                _end_file(run, reader, eof=eof)
    except InputError as exc:
        run.fail(exc)
    finally:
        if tasks:
            await _until(asyncio.wait(set(tasks)), run.stop.now)
            for task in set(tasks):
                task.cancel()  # stopped at once: their lines stay unsettled
        run.save()
        run.finish()
    return report


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
    _inputs(paths, checkpoint, force=force)  # refuse bad input before connecting
    stop = Stop()
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
            await publisher.close()


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
                Store(pool) if pool is not None else None,
                max_bytes=settings.max_event_bytes,
                batch_size=batch_size,
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
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {mask_url(url)}: {exc}") from None
    try:
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1 FROM prompt_results LIMIT 0")
    except asyncpg.UndefinedTableError:
        await pool.close()
        raise ConfigError(
            f"the database at {mask_url(url)} has no prompt_results table: "
            "run `prompter-worker migrate` first"
        ) from None
    except BaseException:
        await pool.close()
        raise
    return pool
