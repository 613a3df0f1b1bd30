"""What a ``publish`` or ``replay`` run did, file by file, and how it is told.

Invalid lines are always reported by file, line number, reason and detail, never by their
content; the rejects file (``--rejects``) holds the same, one JSON object per line.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from worker.errors import InputError

SHOWN_INVALID: Final = 20  # invalid lines listed one by one in the summary


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
    held_back: int | None = None  # an unterminated last line left unread (jsonl.Reader)
    reached: bool = True  # False: the run stopped before it got to this file
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
            and not any(f.held_back for f in self.files)
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
                    "reached": f.reached,
                    "valid": f.valid,
                    "confirmed": f.confirmed,
                    "stored": f.stored,
                    "duplicates": f.duplicates,
                    "unconfirmed": f.unconfirmed,
                    "invalid": len(f.invalid),
                    "held_back": f.held_back,
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
        elif f.resumed_after and f.reached:
            out.append(f"{f.name}: resumed after line {f.resumed_after:,}")
    invalid = report.invalid
    for inv in invalid[:SHOWN_INVALID]:
        out.append(f"{inv.file}:{inv.line}: {inv.reason}: {inv.detail}")
    if len(invalid) > SHOWN_INVALID:
        out.append(f"... and {len(invalid) - SHOWN_INVALID:,} more invalid lines")
    rate = report.confirmed / report.elapsed if report.elapsed > 0 else 0.0
    if report.dry_run:
        out.append(
            f"dry run: {plural(report.valid, 'valid line')}, {len(invalid):,} invalid; nothing sent"
        )
    elif report.mode == "direct":
        stored = sum(f.stored for f in report.files)
        dupes = sum(f.duplicates for f in report.files)
        out.append(
            f"{what} {plural(stored, 'event')} ({dupes:,} stored before), "
            f"{len(invalid):,} refused, in {report.elapsed:.1f}s ({rate:,.0f} events/s)"
        )
    else:
        out.append(
            f"{what} {plural(report.confirmed, 'event')} (confirmed by the broker), "
            f"{plural(len(invalid), 'invalid line')} not sent, in {report.elapsed:.1f}s "
            f"({rate:,.0f} events/s)"
        )
    if invalid:
        counts = Counter(i.reason for i in invalid)
        out.append("invalid by reason: " + ", ".join(f"{r} {n:,}" for r, n in counts.most_common()))
    if report.unconfirmed:
        out.append(f"{plural(report.unconfirmed, 'event')} sent but not confirmed (safe to resend)")
    if report.unsent:
        out.append(f"{plural(report.unsent, 'valid event')} read but not sent")
    for f in report.files:
        if f.held_back is not None:
            again = " with --force" if report.checkpoint else ""
            out.append(
                f"{f.name}:{f.held_back}: no line ending yet, and not a whole JSON object: "
                "not read (a writer may still be writing it); run the same command again"
                f"{again} once the line is complete"
            )
    for f in report.files:
        if not f.reached:
            out.append(f"{f.name}: not reached, nothing of it was processed")
        elif f.stopped_after is not None:
            out.append(
                f"{f.name}: stopped before line {f.stopped_after + 1:,}: "
                "it and the rest were not processed"
            )
    if report.rejects_written:
        out.append(
            f"{plural(report.rejects_written, 'refused line')} appended to {report.rejects_path}"
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


def plural(count: int, noun: str) -> str:
    """``1 event``, ``2 events``, ``1,000 events``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


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

    def flush(self) -> None:
        """Everything written so far on disk (before a checkpoint counts those lines)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
