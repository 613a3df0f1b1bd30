"""Reading JSONL input, settling lines in order, pacing and checkpoints: no servers needed."""

from __future__ import annotations

import gzip
import io
import os
import uuid
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import Tenant, encode, event_doc
from worker.backfill.checkpoint import Checkpoint, Watermark
from worker.backfill.jsonl import FileIdentity, Reader
from worker.backfill.pacing import Pacer, Progress
from worker.errors import InputError, Rejection
from worker.events import Event

TENANT = Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))


def read(path: Path, **kwargs: int) -> list[tuple[int, Event | Rejection]]:
    with Reader(str(path), **kwargs) as reader:
        return list(reader.events())


def test_lines_are_numbered_from_one_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    """Numbers count every line (blank ones too) from 1; CRLF endings and a last line
    without a newline are fine; whitespace-only lines are skipped, not refused."""
    a, b, c = (encode(event_doc(TENANT)) for _ in range(3))
    path = tmp_path / "events.jsonl"
    path.write_bytes(a + b"\r\n\n   \t\n" + b + b"\n\n" + c)
    got = read(path)
    assert [n for n, _ in got] == [1, 4, 6]
    assert all(isinstance(e, Event) for _, e in got)
    assert [e.body for _, e in got] == [a, b, c]  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.gz", "no-suffix"])
def test_gzip_is_recognised_by_its_magic_bytes_whatever_the_name(tmp_path: Path, name: str) -> None:
    """Compressed or not is read from the content: a gzip file called .jsonl works, and so
    does a plain file called .gz."""
    bodies = [encode(event_doc(TENANT)) for _ in range(50)]
    data = b"\n".join(bodies) + b"\n"
    for content in (data, gzip.compress(data)):
        path = tmp_path / name
        path.write_bytes(content)
        with Reader(str(path)) as reader:
            got = list(reader.events())
            assert reader.gzip == (content != data)
        assert [e.body for _, e in got] == bodies  # type: ignore[union-attr]


def test_invalid_lines_come_with_number_reason_and_detail_never_the_payload(
    tmp_path: Path,
) -> None:
    """Each refused line: its number, the decoder's reason and a detail that names the
    field but never quotes the content."""
    secret = "customer-secret-4242"
    lines = [
        encode(event_doc(TENANT)),
        b'{"event_id": "' + secret.encode() + b'"',
        encode(event_doc(TENANT, occurred_at=secret)),
        b"[1, 2]",
        encode(event_doc(TENANT)),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))
    got = read(path)
    refused = [(n, r.reason) for n, r in got if isinstance(r, Rejection)]
    assert refused == [(2, "invalid_json"), (3, "invalid_field"), (4, "not_an_object")]
    for _, r in got:
        if isinstance(r, Rejection):
            assert secret not in r.detail
    assert "occurred_at" in next(r.detail for n, r in got if n == 3)  # type: ignore[union-attr]


def test_a_line_over_the_size_limit_is_refused_and_reading_goes_on(tmp_path: Path) -> None:
    """A line longer than the event size limit is payload_too_large at its own number, and
    the lines after it are read normally."""
    small = encode(event_doc(TENANT))
    huge = encode(event_doc(TENANT, request={"x": "y" * 100_000}))
    path = tmp_path / "big.jsonl"
    path.write_bytes(small + b"\n" + huge + b"\n" + small + b"\n")
    got = read(path, max_bytes=4096)
    assert got[0][0] == 1
    assert isinstance(got[0][1], Event)
    assert got[1][0] == 2
    assert isinstance(got[1][1], Rejection)
    assert got[1][1].reason == "payload_too_large"
    assert got[2][0] == 3
    assert isinstance(got[2][1], Event)


def test_truncated_gzip_is_an_input_error_naming_file_and_line(tmp_path: Path) -> None:
    """A gzip file cut short raises InputError with the file name, the last line read and
    'truncated'; the complete lines before it were read."""
    data = b"\n".join(encode(event_doc(TENANT)) for _ in range(200)) + b"\n"
    packed = gzip.compress(data)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    got: list[int] = []

    def read_all() -> None:
        with Reader(str(path)) as reader:
            got.extend(n for n, _ in reader.events())

    with pytest.raises(InputError) as caught:
        read_all()
    message = str(caught.value)
    assert str(path) in message
    assert "truncated" in message
    assert f"past line {got[-1]}" in message


def test_missing_file_is_an_input_error() -> None:
    """A file that does not exist: InputError naming it, not a traceback."""
    with pytest.raises(InputError, match=r"nope\.jsonl: cannot read"):
        read(Path("nope.jsonl"))


def test_lines_up_to_after_are_skipped(tmp_path: Path) -> None:
    """Resuming after line N yields only the lines after N, with their own numbers."""
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(encode(event_doc(TENANT)) for _ in range(10)))
    with Reader(str(path)) as reader:
        assert [n for n, _ in reader.events(after=7)] == [8, 9, 10]


# --- a file still being written ---------------------------------------------------------------


def test_a_half_written_last_line_of_a_plain_file_is_held_back(tmp_path: Path) -> None:
    """Issue 13, case 3: 3 lines and half of line 4 in a plain file. Lines 1-3 are read;
    line 4 is neither yielded nor judged (no invalid_json), and ``held_back`` names it. Once
    the writer finished it, reading after line 3 yields it whole."""
    lines = [encode(event_doc(TENANT)) for _ in range(4)]
    path = tmp_path / "growing.jsonl"
    half = len(lines[3]) // 2
    path.write_bytes(b"".join(line + b"\n" for line in lines[:3]) + lines[3][:half])
    with Reader(str(path)) as reader:
        got = list(reader.events())
        assert [n for n, _ in got] == [1, 2, 3]
        assert all(isinstance(e, Event) for _, e in got)
        assert reader.held_back == 4
    with path.open("ab") as fh:
        fh.write(lines[3][half:] + b"\n")
    with Reader(str(path)) as reader:
        [(number, event)] = list(reader.events(after=3))
        assert reader.held_back is None
    assert number == 4
    assert isinstance(event, Event)
    assert event.body == lines[3]


@pytest.mark.parametrize(
    ("tail", "whole"),
    [
        (b'{"event_id": "x"}', True),  # a whole object: judged (here: refused as invalid)
        (b'{"event_id": "x"}\r', True),  # the writer is between \r and \n
        (b"   ", True),  # blank: skipped, as blank lines are
        (b'{"event_id": "x"', False),
        (b"[1, 2]", False),  # not an object: no event is, so it cannot be a whole one
        (b"12", False),  # a number's prefix is a number: held back until terminated
        (b'{"a": "\xc3', False),  # cut inside a UTF-8 character
    ],
)
def test_only_a_whole_json_object_ends_a_plain_file_without_a_newline(
    tmp_path: Path, tail: bytes, whole: bool
) -> None:
    """A plain file's unterminated last line is read only when it is a whole JSON object
    (or blank); anything else may be a writer's unfinished line, and is held back."""
    first = encode(event_doc(TENANT))
    path = tmp_path / "e.jsonl"
    path.write_bytes(first + b"\n" + tail)
    with Reader(str(path)) as reader:
        got = list(reader.events())
        held = reader.held_back
    assert got[0][0] == 1
    if whole:
        assert held is None
        assert [n for n, _ in got] == ([1] if not tail.strip() else [1, 2])
    else:
        assert held == 2
        assert len(got) == 1


def test_stdin_and_gzip_are_complete_at_their_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stdin at EOF (its writer closed it) and a gzip stream that ended properly are
    complete: their unterminated last line is judged, here refused as invalid_json."""
    good = encode(event_doc(TENANT))
    data = good + b"\n" + good[: len(good) // 2]
    path = tmp_path / "e.jsonl.gz"
    path.write_bytes(gzip.compress(data))
    with Reader(str(path)) as reader:
        got = list(reader.events())
        assert reader.held_back is None
    assert [(n, getattr(r, "reason", None)) for n, r in got] == [(1, None), (2, "invalid_json")]

    class Stdin:
        buffer = io.BytesIO(data)

    monkeypatch.setattr("sys.stdin", Stdin)
    with Reader("-") as reader:
        got = list(reader.events())
        assert reader.held_back is None
    assert [(n, getattr(r, "reason", None)) for n, r in got] == [(1, None), (2, "invalid_json")]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.dictionaries(st.text(), _JSON, max_size=6),
    indent=st.booleans(),
    cut=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_no_cut_of_an_object_line_is_read_before_it_is_terminated(
    tmp_path_factory: pytest.TempPathFactory, doc: dict[str, object], indent: bool, cut: float
) -> None:
    """Wherever a writer stops inside a line holding a JSON object (compact or spaced),
    the plain file's unfinished last line is held back, never yielded."""
    line = orjson.dumps(doc)
    if indent:
        line = orjson.dumps(doc, option=orjson.OPT_INDENT_2).replace(b"\n", b" ")
    prefix = line[: max(1, int(len(line) * cut))]
    path = tmp_path_factory.mktemp("cut") / "e.jsonl"
    path.write_bytes(encode(event_doc(TENANT)) + b"\n" + prefix)
    with Reader(str(path)) as reader:
        got = list(reader.lines())
        assert reader.held_back == 2
    assert [n for n, _ in got] == [1]


# --- the watermark ----------------------------------------------------------------------------


def test_watermark_counts_only_lines_settled_without_a_gap() -> None:
    """Confirms in any order: the watermark is the highest line with every line up to it
    settled; lines needing no confirm (invalid) pass as soon as everything before them has."""
    mark = Watermark(10)
    mark.sent(11)
    mark.skip(12)  # an invalid line
    mark.sent(13)
    mark.sent(14)
    assert mark.value == 10
    mark.confirmed(13)
    assert mark.value == 10  # 11 still outstanding
    mark.confirmed(11)
    assert mark.value == 13
    mark.confirmed(14)
    assert mark.value == 14
    mark.skip(15)
    assert mark.value == 15


def test_watermark_never_passes_a_line_whose_publish_failed() -> None:
    """A line that is never confirmed holds the watermark below it, however many lines
    after it are confirmed: a resumed run sends it again."""
    mark = Watermark()
    for line in range(1, 6):
        mark.sent(line)
    for line in (1, 2, 4, 5):
        mark.confirmed(line)
    assert mark.value == 2
    assert mark.pending == 3


# --- pacing -------------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the pacer sleeps, oversleeping each time."""

    def __init__(self, oversleep: float) -> None:
        self.now = 1000.0
        self.oversleep = oversleep
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds + self.oversleep


@pytest.mark.parametrize("oversleep", [0.0, 0.004])
async def test_pacer_holds_the_rate_without_drift(oversleep: float) -> None:
    """2,000 events at 200/s take 10 s of the clock, whatever each sleep oversleeps (the
    schedule makes it up), with far fewer sleeps than events."""
    t = FakeTime(oversleep)
    pacer = Pacer(200, clock=t.clock, sleep=t.sleep)
    start = t.now
    for _ in range(2000):
        await pacer.wait()
    elapsed = t.now - start
    assert 9.9 <= elapsed <= 10.0 + 0.05  # at most one burst early, one oversleep late
    assert t.sleeps < 2000 / 5


async def test_pacer_allows_only_a_small_burst_after_idling() -> None:
    """After a long pause the pacer does not let the missed events through at once: at
    most a burst of 1/20 s worth."""
    t = FakeTime(0.0)
    pacer = Pacer(1000, clock=t.clock, sleep=t.sleep)
    await pacer.wait()
    t.now += 60  # idle for a minute
    start = t.now
    for _ in range(1050):
        await pacer.wait()
    assert t.now - start >= 1.0 - 0.051


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_atomic(tmp_path: Path) -> None:
    """Saved and loaded back the same; no temporary file is left behind."""
    events = tmp_path / "e.jsonl"
    events.write_bytes(b"\n".join(encode(event_doc(TENANT)) for _ in range(5)))
    path = tmp_path / "cp.json"
    cp = Checkpoint(str(path))
    cp.record(FileIdentity.of(str(events)), 3, complete=False)
    cp.save()
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "e.jsonl"]
    loaded = Checkpoint.load(str(path))
    assert loaded.resume(FileIdentity.of(str(events)), force=False) == (3, False)
    assert Checkpoint.load(str(tmp_path / "absent.json")).entries == {}


def test_a_file_changed_since_its_checkpoint_is_refused_unless_forced(tmp_path: Path) -> None:
    """Appending to (or replacing) a checkpointed file makes resuming refuse with a message
    naming the file and what changed; --force resumes after the recorded line."""
    events = tmp_path / "e.jsonl"
    events.write_bytes(b"\n".join(encode(event_doc(TENANT)) for _ in range(5)) + b"\n")
    cp = Checkpoint(str(tmp_path / "cp.json"))
    cp.record(FileIdentity.of(str(events)), 5, complete=True)
    with events.open("ab") as fh:
        fh.write(encode(event_doc(TENANT)) + b"\n")
    changed = FileIdentity.of(str(events))
    with pytest.raises(InputError) as caught:
        cp.resume(changed, force=False)
    message = str(caught.value)
    assert str(events) in message
    assert "size" in message
    assert "--force" in message
    assert cp.resume(changed, force=True) == (5, False)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """A checkpoint path holding something else is an InputError, never overwritten."""
    path = tmp_path / "cp.json"
    path.write_bytes(orjson.dumps({"hello": "world"}))
    with pytest.raises(InputError, match="not a prompter-worker checkpoint"):
        Checkpoint.load(str(path))


# --- progress ---------------------------------------------------------------------------------


def test_progress_bar_shows_rate_and_eta_only_when_enabled() -> None:
    """Enabled (a terminal): a bar with bytes, rate, ETA and events per second. Disabled:
    not a character written."""
    shown, quiet = io.StringIO(), io.StringIO()
    for stream, enabled in ((shown, True), (quiet, False)):
        progress = Progress(10_000, enabled=enabled, stream=stream)
        progress.update(2_500, 100)
        progress.update(5_000, 200)
        progress.close()
    text = shown.getvalue()
    assert "50%" in text
    assert "B/s" in text  # the rate
    assert "<" in text  # elapsed<remaining: the ETA
    assert "200 events" in text
    assert quiet.getvalue() == ""
