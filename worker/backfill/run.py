"""The one backfill loop (:func:`replay_files`): files read in order, each valid line handed
to a :class:`~worker.backfill.sinks.Sink` (the broker or the store), settled lines
checkpointed, invalid lines reported, progress shown, pacing and stopping obeyed.

What is done once here for both sinks: checking the inputs against the checkpoint before
anything is sent, reading and judging lines (:mod:`worker.backfill.jsonl`), the rejects
file, the watermark of each file, the checkpoint about once a second (and at the end of
each file, and when the run stops), the progress bar, and the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from worker.backfill import jsonl
from worker.backfill.checkpoint import Checkpoint, Watermark
from worker.backfill.options import ReplayOptions
from worker.backfill.pacing import Pacer, Progress, Stop
from worker.backfill.reports import FileReport, Invalid, Rejects, Report
from worker.errors import InputError, Rejection, WorkerError
from worker.events import Event

if TYPE_CHECKING:
    from worker.backfill.sinks import Sink

CHECKPOINT_EVERY_SECONDS: Final = 1.0
TICK_EVERY_LINES: Final = 64  # progress and the checkpoint clock are checked this often


@dataclass(frozen=True, kw_only=True)
class Input:
    """One input, checked: its identity (None for stdin) and where its checkpoint resumes."""

    name: str
    identity: jsonl.FileIdentity | None
    after: int  # lines settled by an earlier run
    complete: bool  # the earlier run settled every line


def check_inputs(
    paths: tuple[str, ...], checkpoint: Checkpoint | None, *, force: bool
) -> list[Input]:
    """Check every input before anything is sent: readable, not stdin twice, and not
    changed since its checkpoint (:class:`InputError` otherwise)."""
    if not paths:
        raise InputError("no input file given")
    if paths.count(jsonl.STDIN) > 1:
        raise InputError("stdin (-) can be read only once")
    out = []
    for name in paths:
        if name == jsonl.STDIN:
            if checkpoint is not None:
                raise InputError("stdin (-) cannot be resumed: a checkpoint needs files")
            out.append(Input(name=name, identity=None, after=0, complete=False))
            continue
        identity = jsonl.FileIdentity.of(name)
        after, complete = checkpoint.resume(identity, force=force) if checkpoint else (0, False)
        out.append(Input(name=name, identity=identity, after=after, complete=complete))
    return out


def load_checkpoint(options: ReplayOptions) -> Checkpoint | None:
    return Checkpoint.load(options.checkpoint_path) if options.checkpoint_path else None


@dataclass(frozen=True, kw_only=True)
class Checked:
    """A run's checkpoint and its inputs checked against it, before anything is sent."""

    checkpoint: Checkpoint | None
    inputs: list[Input]

    @classmethod
    def of(cls, options: ReplayOptions) -> Checked:
        checkpoint = load_checkpoint(options)
        inputs = check_inputs(tuple(options.paths), checkpoint, force=options.force)
        return cls(checkpoint=checkpoint, inputs=inputs)


@dataclass(eq=False, kw_only=True)
class OpenFile:
    """A file being sent: the sink settles its lines on ``mark`` and counts on ``report``."""

    input: Input
    report: FileReport
    mark: Watermark
    read_to_end: bool = False  # its last line was read (False when the run broke off)
    finished: bool = False  # read to its end, and its sink's end of file awaited

    @property
    def name(self) -> str:
        return self.input.name


class Run:
    """One run's state, whatever the sink: the report, checkpoint, progress, rejects, stop,
    and the first failure (which stops reading)."""

    def __init__(
        self,
        options: ReplayOptions,
        *,
        dry_run: bool,
        stop: Stop | None,
        checked: Checked | None = None,
    ) -> None:
        checked = checked or Checked.of(options)
        self.checkpoint = checked.checkpoint
        self.inputs = checked.inputs
        rejects_path = options.rejects_path
        self.rejects = Rejects(rejects_path) if rejects_path else None
        self.report = Report(
            mode=options.mode,
            dry_run=dry_run,
            checkpoint=options.checkpoint_path,
            rejects_path=rejects_path,
        )
        self.stop = stop or Stop()
        sizes = [i.identity.size if i.identity else None for i in self.inputs]
        total = None if None in sizes else sum(s or 0 for s in sizes)
        self.progress = Progress(total, enabled=options.progress)
        self.files: list[OpenFile] = []
        self.failure: BaseException | None = None
        self.base = 0  # bytes of the files finished before the current one
        self._saved_at = time.monotonic()
        self._started = time.monotonic()

    def open_file(self, inp: Input) -> OpenFile | None:
        """The report of ``inp``, and None if its checkpoint says it was all settled."""
        report = FileReport(name=inp.name, resumed_after=inp.after)
        self.report.files.append(report)
        if inp.complete:
            report.already_complete = True
            return None
        file = OpenFile(input=inp, report=report, mark=Watermark(inp.after))
        self.files.append(file)
        return file

    def valid_events(
        self, file: OpenFile, reader: jsonl.Reader, *, columns: bool
    ) -> Iterator[tuple[int, Event]]:
        """The valid events of one file after its checkpoint, with their line numbers
        (``columns``: whether the store will write them, see :func:`worker.events.decode`).
        Invalid lines are reported and settled here; it ends early on a failure or a stop.
        ``file.read_to_end`` tells afterwards whether the file was read to its end."""
        file.read_to_end = False
        events = reader.events(after=file.input.after, columns=columns)
        for seen, (line, item) in enumerate(events, 1):
            if self.failure or self.stop.is_set():
                return
            if seen % TICK_EVERY_LINES == 0:  # lines read, valid or not, whatever their numbers
                self.tick(reader)
            if isinstance(item, Rejection):
                self.invalid(file, line, item)
                file.mark.skip(line)
                continue
            file.report.valid += 1
            yield line, item
        file.read_to_end = True

    def invalid(
        self, file: OpenFile, line: int, rejection: Rejection, event: Event | None = None
    ) -> None:
        """``line`` was refused (by the contract, or by the store): reported, and written
        to the rejects file."""
        invalid = Invalid(
            file=file.name,
            line=line,
            reason=rejection.reason,
            detail=rejection.detail,
            event_id=event.event_id if event else None,
        )
        file.report.invalid.append(invalid)
        if self.rejects is not None:
            self.rejects.write(invalid)

    def fail(self, exc: BaseException) -> None:
        """Stop reading: the first failure is the one the report gives."""
        if self.failure is None:
            self.failure = exc

    def end_file(self, file: OpenFile, reader: jsonl.Reader) -> None:
        if file.read_to_end:
            file.report.held_back = reader.held_back
            file.finished = True
        else:
            file.report.stopped_after = file.mark.high
        self.tick(reader, force=True)  # the bar at the end of this file: base + its position
        self.base += reader.size or 0

    def tick(self, reader: jsonl.Reader, force: bool = False) -> None:
        """Progress, and a checkpoint about once a second."""
        self.progress.update(self.base + reader.position, self.report.confirmed)
        if force or time.monotonic() - self._saved_at >= CHECKPOINT_EVERY_SECONDS:
            self.save()

    def save(self) -> None:
        """Record each file's settled lines in the checkpoint (not in a dry run)."""
        self._saved_at = time.monotonic()
        if self.checkpoint is None or self.report.dry_run:
            return
        for file in self.files:
            if file.input.identity is not None:
                report = file.report
                complete = (
                    file.finished
                    and file.mark.pending == 0
                    and not report.unconfirmed
                    and report.held_back is None
                )
                self.checkpoint.record(file.input.identity, file.mark.value, complete=complete)
        if self.rejects is not None:  # the lines it settles as refused are on disk first
            self.rejects.flush()
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


async def replay_files(
    options: ReplayOptions,
    sink: Sink | None,
    *,
    max_bytes: int,
    stop: Stop | None = None,
    checked: Checked | None = None,
) -> Report:
    """Hand every valid line of ``options.paths`` to ``sink`` (None: a dry run, which
    validates and reports). Raises only for what is wrong before anything is sent (an
    unreadable input, a changed file, a bad checkpoint: ``checked`` if the caller checked
    them already); what happens to events, the broker or the database is in the report,
    with the error that stopped the run."""
    run = Run(options, dry_run=sink is None, stop=stop, checked=checked)
    pacer = Pacer(options.rate)
    columns = sink is not None and sink.columns
    try:
        for inp in run.inputs:
            if run.failure or run.stop.is_set():
                break
            file = run.open_file(inp)
            if file is None:
                continue
            with jsonl.Reader(inp.name, max_bytes=max_bytes) as reader:
                for line, event in run.valid_events(file, reader, columns=columns):
                    if sink is None:
                        file.mark.skip(line)
                        continue
                    await pacer.wait()
                    try:
                        await sink.send(run, file, line, event)
                    except WorkerError as exc:
                        run.fail(exc)
                        break
                if sink is not None:  # this file's lines settled, before it is called done
                    await sink.end_file(run, file)
                run.end_file(file, reader)
    except InputError as exc:
        run.fail(exc)
    finally:
        if sink is not None:
            await sink.end_run(run)
        run.save()
        run.finish()
    return run.report
