"""Event ids from the publisher library: time-ordered UUIDv7, accepted by the contract like
any UUID, used by ``demo``."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.factories import Tenant, event_doc
from worker.commands import demo
from worker.publisher import new_event_id, prepare

TENANT = Tenant(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))


def _millis(event_id: str) -> int:
    return uuid.UUID(event_id).int >> 80


def test_new_event_ids_are_canonical_v7_and_strictly_increasing() -> None:
    """new_event_id(): a canonical lowercase UUID string, version 7, RFC variant, carrying
    the current time in milliseconds; 10,000 in a row are distinct and sorted."""
    before = int(datetime.now(UTC).timestamp() * 1000)
    ids = [new_event_id() for _ in range(10_000)]
    after = int(datetime.now(UTC).timestamp() * 1000)
    for event_id in (ids[0], ids[-1]):
        parsed = uuid.UUID(event_id)
        assert str(parsed) == event_id
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= _millis(event_id) <= after
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


@given(st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.timezones()))
def test_an_event_id_of_a_given_time_carries_that_millisecond(at: datetime) -> None:
    """new_event_id(at) carries ``at`` to the millisecond (any offset, any time a UUIDv7
    can hold), and the contract accepts it as the event's id."""
    if at.astimezone(UTC) < datetime(1970, 1, 1, tzinfo=UTC):
        with pytest.raises(ValueError, match="1970"):
            new_event_id(at)
        return
    event_id = new_event_id(at)
    delta = at.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert _millis(event_id) == delta // timedelta(milliseconds=1)
    assert uuid.UUID(event_id).version == 7
    assert prepare(event_doc(TENANT, event_id=event_id)).event_id == event_id


def test_an_event_id_needs_an_aware_time() -> None:
    """A naive datetime has no defined instant: ValueError, as the contract's
    ``occurred_at`` refuses one."""
    with pytest.raises(ValueError, match="timezone-aware"):
        new_event_id(datetime(2025, 8, 14, 14, 13, 29))
    two_hours_east = timezone(timedelta(hours=2))
    at = datetime(2025, 8, 14, 16, 13, 29, tzinfo=two_hours_east)  # 14:13:29 UTC
    assert _millis(new_event_id(at)) == 1_755_180_809_000


def test_the_contract_still_accepts_any_uuid() -> None:
    """v4, v1 and v7 ids alike: the decoder does not prefer one."""
    for event_id in (str(uuid.uuid4()), str(uuid.uuid1()), new_event_id()):
        assert prepare(event_doc(TENANT, event_id=event_id)).event_id == event_id


def test_demo_events_have_v7_ids_of_their_own_time() -> None:
    """demo's events carry UUIDv7 ids whose time is the event's ``occurred_at``, so the
    ids sort like the events; each is a valid event."""
    now = datetime(2025, 8, 14, 15, 0, tzinfo=UTC)
    made = demo.make_events(
        200,
        org_id=TENANT.org_id,
        workspace_id=TENANT.workspace_id,
        template_id=TENANT.template_id,
        now=now,
        rng=random.Random(7),
    )
    stamps = []
    for doc in made:
        at = datetime.fromisoformat(doc["occurred_at"])
        assert uuid.UUID(doc["event_id"]).version == 7
        assert _millis(doc["event_id"]) == int(at.timestamp() * 1000)
        assert prepare(doc).event_id == doc["event_id"]
        stamps.append(_millis(doc["event_id"]))
    assert stamps == sorted(stamps)
