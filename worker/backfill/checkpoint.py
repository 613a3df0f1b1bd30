"""Resumable runs: which lines of a file are settled, and the checkpoint that keeps it.

A :class:`Watermark` follows one file as it is sent: the highest line number such that
every line up to it is *settled* (confirmed by the broker, committed to the database, or
refused as invalid). Lines still awaiting their confirm never count, whatever order the
confirms come back in.

A :class:`Checkpoint` (``--checkpoint PATH``) keeps, for each file, its identity (absolute
path, size, modification time, SHA-256 of its first 64 KiB) and its watermark. It is
rewritten atomically (a temporary file in the same directory, fsync, ``os.replace``, fsync
of the directory), so a crash leaves the old checkpoint or the new one, never a torn one. A
re-run skips each file up to its watermark; the lines between the watermark and what had
been sent are sent again, which ingestion's idempotence makes harmless. A file that changed
since its checkpoint is refused unless forced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import deque
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from worker.backfill import jsonl
from worker.errors import InputError

CHECKPOINT_VERSION: Final = 1


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
