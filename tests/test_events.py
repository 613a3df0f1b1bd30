"""The event contract: decoding is pure, total, and names what is wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import Tenant, encode, event_doc
from worker import events
from worker.errors import Rejection
from worker.events import Event, decode

ROOT = Path(__file__).resolve().parent.parent
TENANT = Tenant(
    "0b5e7a4e-6c1a-4d0e-9a51-5f4c8a1e2b3c",
    "2f1d3c4b-5a69-4788-99aa-bbccddeeff00",
    "7e3c2a10-1b2c-4d5e-8f90-a1b2c3d4e5f6",
)


def doc(**overrides: Any) -> dict[str, Any]:
    d = event_doc(TENANT, event_id="11111111-2222-4333-8444-555555555555")
    d.update(overrides)
    return d


def without(name: str) -> dict[str, Any]:
    d = doc()
    del d[name]
    return d


def rejected(body: bytes | dict[str, Any], **kwargs: Any) -> Rejection:
    raw = body if isinstance(body, bytes) else encode(body)
    out = decode(raw, **kwargs)
    assert isinstance(out, Rejection), out
    return out


def test_valid_event_decodes_to_canonical_values() -> None:
    """UUIDs are lowercased, timestamps timezone-aware, optional fields default to None."""
    d = doc(
        event_id="AAAAAAAA-2222-4333-8444-555555555555",
        occurred_at="2025-08-14T16:13:29.5+02:00",
    )
    del d["system_fingerprint"]
    out = decode(encode(d))
    assert isinstance(out, Event)
    assert out.event_id == "aaaaaaaa-2222-4333-8444-555555555555"
    assert out.occurred_at == datetime(2025, 8, 14, 14, 13, 29, 500000, tzinfo=UTC)
    assert out.occurred_at.utcoffset() == timedelta(hours=2)
    assert out.system_fingerprint is None
    assert out.fingerprint_captured_at is None
    assert out.version_key == (
        TENANT.org_id,
        TENANT.workspace_id,
        TENANT.template_id,
        "gpt-4o-2024-08-06",
    )


def test_unknown_fields_are_ignored_and_schema_version_one_is_accepted() -> None:
    """Extra fields pass; schema_version 1 explicit or absent is the same."""
    assert isinstance(decode(encode(doc(extra={"x": 1}, schema_version=1))), Event)


def test_event_repr_never_shows_the_payload() -> None:
    """The body stays out of repr, so a logged event never leaks request or response."""
    out = decode(encode(doc(request={"secret": "hunter2"})))
    assert "hunter2" not in repr(out)


@pytest.mark.parametrize(
    ("body", "reason", "detail"),
    [
        (b"{not json", "invalid_json", "line 1"),
        (b"", "invalid_json", "empty"),
        (b'{"a": 1} trailing', "invalid_json", "after document"),
        (b"\xef\xbb\xbf{}", "invalid_json", "BOM"),
        (b'{"a": "\xff"}', "invalid_json", "UTF-8"),
        (b'{"a": NaN}', "invalid_json", ""),
        (b'{"a": Infinity}', "invalid_json", ""),
        (b'{"a": "\\ud800"}', "invalid_json", "surrogate"),
        (b"[" * 2000 + b"]" * 2000, "invalid_json", "depth"),
        (b"[1, 2]", "not_an_object", "array"),
        (b'"text"', "not_an_object", "string"),
        (b"null", "not_an_object", "null"),
    ],
)
def test_malformed_documents(body: bytes, reason: str, detail: str) -> None:
    """Bytes that are not one JSON object are rejected with the parser's reason."""
    out = rejected(body)
    assert out.reason == reason
    assert detail in out.detail


@pytest.mark.parametrize(
    "name",
    [
        "event_id",
        "occurred_at",
        "org_id",
        "workspace_id",
        "template_id",
        "provider",
        "provider_version_key",
        "model_id",
        "request",
        "response",
    ],
)
def test_missing_required_field_is_named(name: str) -> None:
    """Each required field, absent, is a missing_field naming it; null is invalid_field."""
    out = rejected(without(name))
    assert (out.reason, out.detail) == ("missing_field", f'"{name}" is required')
    out = rejected(doc(**{name: None}))
    assert out.reason == "invalid_field"
    assert f'"{name}"' in out.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", "not-a-uuid"),
        ("event_id", 12345),
        ("event_id", "{11111111-2222-4333-8444-555555555555}"),
        ("org_id", "11111111222243338444555555555555"),
        ("workspace_id", ["x"]),
        ("template_id", "11111111-2222-4333-8444-55555555555g"),
        ("occurred_at", "2025-08-14T14:13:29"),  # no offset
        ("occurred_at", "2025-08-14"),
        ("occurred_at", "infinity"),
        ("occurred_at", "2025-02-30T00:00:00Z"),  # impossible date
        ("occurred_at", "2025-08-14T25:00:00Z"),
        ("occurred_at", "20250814T141329Z"),  # ISO basic format, not RFC 3339
        ("occurred_at", "\uff12\uff10\uff12\uff15-08-14T14:13:29Z"),  # fullwidth digits
        ("occurred_at", 1723644809),
        # Python's first instant: asyncpg would store it as -infinity
        ("occurred_at", "0001-01-01T00:00:00Z"),
        ("occurred_at", "0001-01-01T01:00:00+01:00"),  # the same instant
        ("fingerprint_captured_at", "0001-01-01T00:00:00Z"),
        ("fingerprint_captured_at", "yesterday"),
        ("provider", ""),
        ("provider", "   "),
        ("model_id", 4),
        ("provider_version_key", "k" * 513),
        ("system_fingerprint", 12),
        ("request", "text"),
        ("response", [1, 2]),
        ("analysis_config", "x"),
        ("schema_version", "1"),
        ("schema_version", 1.5),
        ("schema_version", True),
    ],
)
def test_invalid_field_is_named(field: str, value: object) -> None:
    """A present field of the wrong type or shape is invalid_field, naming the field."""
    out = rejected(doc(**{field: value}))
    assert out.reason == "invalid_field"
    assert f'"{field}"' in out.detail


def test_unsupported_schema_version() -> None:
    """Any integer schema_version other than 1 is unsupported."""
    out = rejected(doc(schema_version=2))
    assert out.reason == "unsupported_schema_version"
    assert "2" in out.detail


def test_payload_too_large_is_checked_before_parsing() -> None:
    """The size limit applies to the raw bytes, so even invalid JSON is refused as too large."""
    out = rejected(b"{" * 2000, max_bytes=1000)
    assert out.reason == "payload_too_large"
    assert "2000 bytes" in out.detail
    assert isinstance(decode(encode(doc()), max_bytes=10_000), Event)


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"request": {"messages": [{"content": "a\u0000b"}]}}, "$.request.messages[0].content"),
        ({"response": {"k\u0000": 1}}, '$.response["k?"] (the key)'),
        ({"system_fingerprint": "fp\u0000"}, "$.system_fingerprint"),
        ({"unknown": {"deep": ["\u0000"]}}, "$.unknown.deep[0]"),
    ],
)
def test_nul_anywhere_is_unstorable_and_its_path_is_named(
    overrides: dict[str, Any], path: str
) -> None:
    """PostgreSQL jsonb and text cannot hold U+0000: refused with the JSON path."""
    out = rejected(doc(**overrides))
    assert out.reason == "unstorable_content"
    assert out.detail.startswith(path)


def test_escaped_backslash_u0000_is_not_a_nul() -> None:
    """The six characters \\u0000 (an escaped backslash) are ordinary text."""
    assert isinstance(decode(encode(doc(request={"text": "\\u0000"}))), Event)


def test_duplicate_keys_last_wins() -> None:
    """Duplicate keys follow jsonb: the last occurrence wins (documented policy)."""
    body = encode(doc())[:-1] + b', "provider": "anthropic"}'
    out = decode(body)
    assert isinstance(out, Event)
    assert out.provider == "anthropic"


def test_timestamps_keep_offsets_and_nanoseconds_truncate() -> None:
    """Offsets are honoured; digits beyond microseconds are dropped, not rounded."""
    out = decode(encode(doc(occurred_at="2025-08-14T14:13:29.123456789-05:30")))
    assert isinstance(out, Event)
    assert out.occurred_at.utcoffset() == -timedelta(hours=5, minutes=30)
    assert out.occurred_at.microsecond == 123456
    lower = decode(encode(doc(occurred_at="2025-08-14t14:13:29z")))
    assert isinstance(lower, Event)
    assert lower.occurred_at.tzinfo is not None
    assert lower.occurred_at == datetime(2025, 8, 14, 14, 13, 29, tzinfo=timezone.utc)  # noqa: UP017


@pytest.mark.parametrize(
    ("content_type", "encoding", "ok"),
    [
        (None, None, True),
        ("application/json", None, True),
        ("Application/JSON; charset=utf-8", "utf-8", True),
        ("text/plain", None, False),
        ("application/json", "gzip", False),
    ],
)
def test_content_properties(content_type: str | None, encoding: str | None, ok: bool) -> None:
    """Only JSON in plain UTF-8 is accepted; absent properties mean JSON."""
    out = events.check_properties(content_type, encoding)
    assert (out is None) == ok
    if out is not None:
        assert out.reason == "unsupported_content_type"


# --- the JSON Schema shipped for publishers -----------------------------------------------

SCHEMA = json.loads((ROOT / "worker" / "event.schema.json").read_text())
VALID_EXAMPLES = [
    doc(),
    doc(schema_version=1, extra="ignored"),
    doc(analysis_config={"rubric": "v2"}, fingerprint_captured_at="2025-08-14T14:00:00+00:00"),
    doc(occurred_at="2025-08-14 14:13:29.1-03:00"),
]
INVALID_EXAMPLES = [
    without("event_id"),
    without("request"),
    doc(event_id="nope"),
    doc(occurred_at="2025-08-14T14:13:29"),
    doc(provider=""),
    doc(provider=" "),
    doc(request=[]),
    doc(analysis_config=3),
    doc(schema_version=2),
    doc(system_fingerprint=1),
    doc(fingerprint_captured_at="soon"),
    doc(provider_version_key="x" * 513),
]


@pytest.mark.parametrize("example", VALID_EXAMPLES)
def test_schema_and_decoder_accept_the_same_valid_examples(example: dict[str, Any]) -> None:
    """What the schema accepts, the decoder accepts."""
    jsonschema.validate(example, SCHEMA)
    assert isinstance(decode(encode(example)), Event)


@pytest.mark.parametrize("example", INVALID_EXAMPLES)
def test_schema_and_decoder_reject_the_same_invalid_examples(example: dict[str, Any]) -> None:
    """What the schema rejects, the decoder rejects."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(example, SCHEMA)
    assert isinstance(decode(encode(example)), Rejection)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    """Publishers can load it with any conforming validator."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


# --- fuzzing: decoding is total -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_an_event_or_a_rejection(body: bytes) -> None:
    """Any bytes at all: an Event or a Rejection, never an exception."""
    out = decode(body)
    assert isinstance(out, (Event, Rejection))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(doc())), json_values, max_size=14), st.data())
def test_random_json_gives_an_event_or_a_rejection(
    fields: dict[str, Any], data: st.DataObject
) -> None:
    """Random values in the contract's fields, mixed into a valid event: never an exception,
    and every rejection uses a documented reason."""
    base = doc()
    keep = data.draw(st.booleans())
    # The standard library writes integers of any size, and lone surrogates as escapes.
    body = json.dumps({**base, **fields} if keep else fields).encode()
    out = decode(body)
    assert isinstance(out, (Event, Rejection))
    if isinstance(out, Rejection):
        assert out.reason in events.REASONS
        assert out.detail


def test_compact_bodies_carry_their_json_columns_exactly() -> None:
    """A body in orjson's compact form carries request, response and analysis_config as
    their very text in the body (the store COPYs them); surrounding whitespace is fine."""
    d = doc(analysis_config={"rubric": "strict", "weights": [0.5, 2]})
    body = encode(d)
    for form in (body, body + b"\n", b" \r\n" + body + b"\t"):
        out = decode(form)
        assert isinstance(out, Event)
        assert out.columns is not None
        request, response, analysis = out.columns
        assert (request, response) == (encode(d["request"]), encode(d["response"]))
        assert analysis == b'{"rubric":"strict","weights":[0.5,2]}'
        for text in out.columns:
            assert text is not None
            assert text in body
    skipped = decode(body, columns=False)  # what the publisher asks for: it only validates
    assert isinstance(skipped, Event)
    assert skipped.columns is None
    absent = without("analysis_config")
    for d in (doc(analysis_config=None), absent):
        out = decode(encode(d))
        assert isinstance(out, Event)
        assert out.columns is not None
        assert out.columns[2] is None


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(doc()).encode(),  # spaces after ':' and ','
        encode(doc(request={"text": "caf\u00e9"})).replace("é".encode(), b"\\u00e9"),
        encode(doc(request={"path": "a/b"})).replace(b"a/b", b"a\\/b"),
        encode(doc(request={"temperature": 1.5})).replace(b"1.5", b"1.50"),
        encode(doc(request={"n": 100})).replace(b'"n":100', b'"n":1e2'),
        encode(doc(request={"n": 1})).replace(b'"n":1', b'"n":123456789012345678901234567890'),
        encode(doc())[:-1] + b',"provider":"anthropic"}',  # a duplicate key
    ],
    ids=["spaces", "unicode-escape", "slash-escape", "trailing-zero", "exponent", "big-int", "dup"],
)
def test_other_bodies_are_stored_from_the_whole_body(body: bytes) -> None:
    """Any body orjson would not write back byte for byte has no columns: PostgreSQL then
    parses the whole body, so what is stored never depends on Python's reading of it."""
    out = decode(body)
    assert isinstance(out, Event)
    assert out.columns is None
