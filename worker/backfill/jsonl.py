"""JSONL input of ``publish`` and ``replay``: plain or gzip, one event per line, decoded.

Shared by every way events enter from a file (through the broker or straight into the
store), so all of them agree on what a line is:

- gzip is recognised by its magic bytes, whatever the file is called (``-`` reads stdin);
- lines are numbered from 1, as editors and ``sed -n`` count them; blank lines are skipped
  (but counted);
- a line ending is ``\\n`` or ``\\r\\n``; the last line needs none *if the input is
  complete* (below);
- a line longer than the event size limit is refused as ``payload_too_large`` without ever
  being held in memory whole;
- each line is decoded by :func:`worker.events.decode`, so a file is judged exactly as the
  worker judges a message. An invalid line is reported with its number, reason and detail,
  never its content.

A file that cannot be read, or ends inside a gzip stream, raises
:class:`~worker.errors.InputError` naming the file and the line reached.

**A line a writer is halfway through is never judged.** A file may still be growing (a
service appending events) when it is read. A last line without its line ending is taken as
written only when the input is *complete*:

- stdin at its end: whoever wrote the pipe has closed it, no more bytes will come;
- a gzip stream that ended with its end-of-stream marker (one cut short is an
  :class:`~worker.errors.InputError`, and its unfinished line never comes out of it);
- a plain file whose unterminated last line is a whole JSON object. A writer halfway
  through an event has not written its closing ``}`` yet: no proper prefix of a JSON object
  is itself a JSON object (except for trailing whitespace, which changes nothing).

Otherwise the line is *held back*: not yielded, so neither judged nor settled nor
checkpointed; :attr:`Reader.held_back` names it, and the run reports it. Once the writer
has finished it (or terminated it), a later run reads it whole. A finished plain file whose
last line is broken and unterminated is reported the same way at every run, never skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final, TypeAlias

import orjson

from worker import events
from worker.errors import InputError, Rejection
from worker.events import Event

GZIP_MAGIC: Final = b"\x1f\x8b"
STDIN: Final = "-"
#: How much of a file's head its identity hashes (see :class:`FileIdentity`).
HEAD_BYTES: Final = 65_536
_READ_ERRORS: Final = (OSError, EOFError, zlib.error, gzip.BadGzipFile)
_Stream: TypeAlias = BinaryIO | gzip.GzipFile


@dataclass(frozen=True, slots=True, kw_only=True)
class FileIdentity:
    """What tells a file from another, or from itself once changed: for checkpoints."""

    path: str  # absolute
    size: int
    mtime_ns: int
    head_sha256: str  # of the first HEAD_BYTES bytes

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        """The identity of the file at ``path``; :class:`InputError` if it cannot be read."""
        absolute = os.path.abspath(path)
        try:
            with open(absolute, "rb") as fh:
                st = os.fstat(fh.fileno())
                head = fh.read(HEAD_BYTES)
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls(
            path=absolute,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            head_sha256=hashlib.sha256(head).hexdigest(),
        )


class _Prefixed(io.RawIOBase):
    """A stream that yields ``prefix`` and then the rest of ``stream`` (for stdin, whose
    first bytes were read to sniff gzip and cannot be put back)."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self._prefix = prefix
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        read1 = getattr(self._stream, "read1", self._stream.read)
        data: bytes = read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class Reader:
    """One input (a path, or ``-`` for stdin), opened for reading lines.

    ``position`` is how far into the *stored* bytes reading has gone (compressed bytes for
    gzip), for progress bars; ``size`` is the stored size, or None for stdin. After
    :meth:`lines` (or :meth:`events`) ran to the end, ``held_back`` is the number of the
    unterminated last line left for a later run (see the module docstring), or None.
    """

    def __init__(self, name: str, *, max_bytes: int = events.DEFAULT_MAX_EVENT_BYTES) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.size: int | None = None
        self.gzip = False
        self.held_back: int | None = None
        self._raw: BinaryIO | None = None
        self._stream: _Stream | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Reader:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self) -> None:
        if self.name == STDIN:
            raw: BinaryIO = sys.stdin.buffer
            head = b""
            while len(head) < len(GZIP_MAGIC):  # a pipe may hand over one byte at a time
                chunk = raw.read(len(GZIP_MAGIC) - len(head))
                if not chunk:
                    break
                head += chunk
            source: BinaryIO = io.BufferedReader(_Prefixed(head, raw))
        else:
            try:
                raw = self._stack.enter_context(open(self.name, "rb"))  # noqa: SIM115 - closed by the stack
                self.size = os.fstat(raw.fileno()).st_size
                head = raw.read(len(GZIP_MAGIC))
                raw.seek(0)
            except OSError as exc:
                raise InputError(f"{self.name}: cannot read: {exc.strerror or exc}") from None
            source = raw
        self._raw = raw
        if head == GZIP_MAGIC:
            self.gzip = True
            self._stream = self._stack.enter_context(gzip.GzipFile(fileobj=source, mode="rb"))
        else:
            self._stream = source

    @property
    def position(self) -> int:
        if self._raw is None or self.size is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            return self._raw.tell()
        return 0

    def lines(self, *, after: int = 0) -> Iterator[tuple[int, bytes | Rejection]]:
        """``(line number, bytes without the line ending)`` for each non-blank line, or a
        ``payload_too_large`` rejection for a line over the size limit. Lines up to
        ``after`` are read past without being looked at (a resumed replay)."""
        stream = self._stream
        if stream is None:
            raise RuntimeError("Reader used outside its with block")
        limit = self.max_bytes + 2  # the body, then "\r\n"
        number = 0
        self.held_back = None
        while True:
            try:
                line = stream.readline(limit)
            except _READ_ERRORS as exc:
                raise InputError(
                    f"{self.name}: cannot read past line {number}: {_why(exc)}"
                ) from None
            if not line:
                return
            number += 1
            if not line.endswith(b"\n") and len(line) == limit:
                self._skip_rest(stream, number)
                if number > after:
                    yield (
                        number,
                        Rejection(
                            events.PAYLOAD_TOO_LARGE,
                            f"the line is longer than the limit of {self.max_bytes} bytes",
                        ),
                    )
                continue
            if number <= after:
                continue
            if line[-1:] == b"\n":
                line = line[:-2] if line[-2:-1] == b"\r" else line[:-1]
            elif not self._whole(line):
                self.held_back = number
                return
            if not line or (line[:1] in b" \t\r\f\v" and not line.strip()):
                continue
            yield number, line

    def _whole(self, tail: bytes) -> bool:
        """Whether an unterminated last line is all there will be of it (see the module
        docstring): always for stdin and gzip, which end only when complete; for a plain
        file, when it is blank or a whole JSON object."""
        if self.name == STDIN or self.gzip or not tail.strip():
            return True
        try:
            return isinstance(orjson.loads(tail), dict)
        except orjson.JSONDecodeError:
            return False

    def _skip_rest(self, stream: _Stream, number: int) -> None:
        while True:
            try:
                chunk = stream.readline(1_048_576)
            except _READ_ERRORS as exc:
                raise InputError(
                    f"{self.name}: cannot read past line {number}: {_why(exc)}"
                ) from None
            if not chunk or chunk.endswith(b"\n"):
                return

    def events(
        self, *, after: int = 0, columns: bool = True
    ) -> Iterator[tuple[int, Event | Rejection]]:
        """Each non-blank line decoded: ``(line number, Event or Rejection)``; ``columns``
        as for :func:`worker.events.decode`."""
        max_bytes = self.max_bytes
        decode = events.decode
        for number, line in self.lines(after=after):
            if isinstance(line, Rejection):
                yield number, line
            else:
                yield number, decode(line, max_bytes, columns=columns)


def _why(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the gzip stream is truncated (the file ends before its end marker)"
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"corrupt gzip data ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
