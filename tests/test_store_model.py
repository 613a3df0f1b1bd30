"""The store against a model: prompt_versions is a pure function of the stored events.

Hypothesis generates event sets with exact repeats (in other JSON forms too), conflicting
duplicates (another occurred_at, key, payload, template or tenant), copies differing only in
what a result row does not keep, equal timestamps, early and late history and provider names
that collations order differently; cuts them into random batches, written over 1-4
concurrent connections in random order, on a database of the C collation and one of an ICU
collation, as the least-privilege runtime role. Then the tables must be what a few lines of
Python say from the copies the store reports as stored, and every other copy must be reported
a duplicate or a conflicting duplicate, exactly as its content says.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    admin,
    apply_runtime_role,
    database_url,
    drop_database,
    unique_name,
    with_user,
)
from tests.factories import Tenant, encode, event_doc, template_doc
from worker import templates
from worker.errors import DatabaseConflict, Rejection
from worker.events import Event, decode
from worker.store import migrations
from worker.store.ingest import Outcome, Store
from worker.store.pool import create_pool

#: How each database is created (from template0, then migrated to head).
COLLATIONS = {
    "c": "LOCALE 'C'",
    "icu": "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
}


@contextlib.contextmanager
def collated_database(kind: str, role: tuple[str, str]) -> Iterator[str]:
    """A migrated database of collation ``kind`` with the runtime role's grants; its URL
    for that role. Dropped on the way out (which takes the role's grants in it along)."""
    name = unique_name(f"prompter_model_{kind}")
    admin(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' {COLLATIONS[kind]}")
    try:
        url = database_url(name)
        migrations.upgrade(url)
        apply_runtime_role(url, *role)
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="module", params=sorted(COLLATIONS))
def collated(
    request: pytest.FixtureRequest, runtime_role: tuple[str, str]
) -> Iterator[tuple[str, str, str]]:
    """(collation, owner URL, runtime-role URL) of a database reused by the whole module;
    each example empties it first."""
    with collated_database(request.param, runtime_role) as url:
        yield request.param, url, with_user(url, *runtime_role)


#: The templates made in each database, by its URL: made once, kept by every example.
TENANTS: dict[str, list[Tenant]] = {}


@contextlib.asynccontextmanager
async def fresh(url: str) -> AsyncIterator[tuple[asyncpg.Connection, list[Tenant]]]:
    """An owner connection to the database, emptied of results and versions, and its
    three templates: two of one workspace, one of another org."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM prompt_results; DELETE FROM prompt_versions")
        if url not in TENANTS:
            org, ws, other_org, other_ws = (str(uuid.uuid4()) for _ in range(4))
            made = []
            for o, w, prompt in ((org, ws, "A"), (org, ws, "B"), (other_org, other_ws, "C")):
                spec = templates.parse_spec(template_doc(o, w, user_prompt_template=prompt))
                template_id, _ = await templates.register(conn, spec)
                made.append(Tenant(o, w, template_id))
            TENANTS[url] = made
        yield conn, TENANTS[url]
    finally:
        await conn.close()


async def test_the_database_collations_differ(collated: tuple[str, str, str]) -> None:
    """The two databases really order text differently (else the model test proves less)."""
    kind, url, _ = collated
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT 'azure' < 'Bedrock'") is (kind == "icu")
    finally:
        await conn.close()


# --- issue 13, case 2 ----------------------------------------------------------------------

TIE = datetime(2025, 8, 14, 12, 0, tzinfo=UTC)


async def test_ties_resolve_in_byte_order_under_any_collation(
    collated: tuple[str, str, str],
) -> None:
    """Two events of one version at the same instant, providers azure and Bedrock: the
    version says azure ('a' > 'B' in byte order) whether they come in one batch or in two,
    in either order, on a C and an ICU database alike (where ICU puts 'azure' first)."""
    _, url, runtime_url = collated
    found = []
    for arrangement in ("one batch", "azure first", "Bedrock first"):
        async with fresh(url) as (conn, tenants):
            t = tenants[0]
            azure, bedrock = (
                _event(event_doc(t, occurred_at=TIE, provider=p, model_id=p))
                for p in ("azure", "Bedrock")
            )
            pool = await create_pool(runtime_url, max_size=1)
            try:
                store = Store(pool)
                if arrangement == "one batch":
                    await store.ingest([azure, bedrock])
                elif arrangement == "azure first":
                    await store.ingest([azure])
                    await store.ingest([bedrock])
                else:
                    await store.ingest([bedrock])
                    await store.ingest([azure])
            finally:
                await pool.close()
            found.append(
                tuple(await conn.fetchrow("SELECT provider, model_id FROM prompt_versions"))
            )
    assert found == [("azure", "azure")] * 3


# --- the model ----------------------------------------------------------------------------

INSTANTS = (
    datetime(2019, 1, 1, tzinfo=UTC),  # early history
    TIE,
    TIE,  # drawn twice as often: ties
    TIE + timedelta(seconds=1),
    datetime(2026, 6, 1, tzinfo=UTC),  # late (the decoder refuses the far future)
)
PROVIDERS = ("azure", "Bedrock", "bedrock", "Azure", "éclair", "eclair", "Zeta", "a b", "ab")
MODELS = ("m", "M", "m-1", "m_1", "Ω")
KEYS = ("k1", "K1", "k2")


def _event(doc: dict[str, Any], form: str = "compact") -> Event:
    body = encode(doc)
    if form == "indented":
        body = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    elif form == "reordered":
        body = orjson.dumps(dict(reversed(doc.items())))
    decoded = decode(body)
    assert isinstance(decoded, Event), decoded
    return decoded


def content(e: Event) -> tuple[Any, ...]:
    """What the result row keeps of an event: equal for a duplicate, different for a
    conflicting one (the JSON columns as JSON values)."""
    doc = orjson.loads(e.body)

    def value(name: str) -> bytes | None:
        v = doc.get(name)
        return None if v is None else orjson.dumps(v, option=orjson.OPT_SORT_KEYS)

    return (
        e.org_id,
        e.workspace_id,
        e.template_id,
        e.provider_version_key,
        e.system_fingerprint,
        e.occurred_at,
        value("request"),
        value("response"),
        value("analysis_config"),
    )


def model_versions(stored: list[Event]) -> dict[tuple[str, ...], tuple[Any, ...]]:
    """prompt_versions from the stored events alone: first and last seen, the newest
    capture, provider and model of the greatest (occurred_at, provider, model_id) with the
    strings in code point order."""
    groups: dict[tuple[str, ...], list[Event]] = defaultdict(list)
    for e in stored:
        groups[e.version_key].append(e)
    out = {}
    for key, es in groups.items():
        captured = [e.fingerprint_captured_at for e in es if e.fingerprint_captured_at]
        newest = max((e.occurred_at, e.provider, e.model_id) for e in es)
        out[key] = (
            newest[1],
            newest[2],
            max(captured) if captured else None,
            min(e.occurred_at for e in es),
            max(e.occurred_at for e in es),
        )
    return out


@st.composite
def copies(draw: st.DrawFn, tenants: list[Tenant]) -> list[Event]:
    """Events: a few event ids, each sent 1-3 times, the later copies exact repeats (maybe
    in another JSON form or offset), differing only in what results do not keep, or
    conflicting in one kept column; maybe one event of its own that cannot be encoded."""
    out = []
    for _ in range(draw(st.integers(1, 8), label="ids")):
        event_id = str(uuid.uuid4())
        t = tenants[draw(st.integers(0, 2))]
        base = event_doc(
            t,
            event_id=event_id,
            occurred_at=draw(st.sampled_from(INSTANTS)),
            version_key=draw(st.sampled_from(KEYS)),
            provider=draw(st.sampled_from(PROVIDERS)),
            model_id=draw(st.sampled_from(MODELS)),
            fingerprint_captured_at=draw(
                st.sampled_from([None, *(i.isoformat() for i in INSTANTS)])
            ),
            request={"messages": [{"role": "user", "content": "hi"}], "t": 1.5},
            response={"text": draw(st.sampled_from(["yes", "no"]))},
            analysis_config=draw(st.sampled_from([None, {"rubric": "strict"}])),
        )
        out.append(_event(base, draw(st.sampled_from(["compact", "indented"]))))
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(
                st.sampled_from(
                    ["exact", "form", "offset", "unkept", "occurred_at", "payload", "key",
                     "fingerprint", "analysis", "template", "tenant"]
                )
            )  # fmt: skip
            doc = dict(base)
            form = "compact"
            if kind == "form":
                form = draw(st.sampled_from(["indented", "reordered"]))
                doc["request"] = {"t": 1.50, "messages": [{"content": "hi", "role": "user"}]}
            elif kind == "offset":
                at = datetime.fromisoformat(base["occurred_at"].replace("Z", "+00:00"))
                doc["occurred_at"] = at.astimezone(timezone(timedelta(hours=-7))).isoformat()
            elif kind == "unkept":
                doc["provider"] = draw(st.sampled_from(PROVIDERS))
                doc["model_id"] = draw(st.sampled_from(MODELS))
                doc["fingerprint_captured_at"] = INSTANTS[-1].isoformat()
            elif kind == "occurred_at":
                doc["occurred_at"] = draw(st.sampled_from(INSTANTS)).isoformat()
                doc["provider"] = draw(st.sampled_from(PROVIDERS))
            elif kind == "payload":
                doc["response"] = {"text": draw(st.sampled_from(["yes", "no", "maybe"]))}
            elif kind == "key":
                doc["provider_version_key"] = draw(st.sampled_from(KEYS))
            elif kind == "fingerprint":
                doc["system_fingerprint"] = draw(st.sampled_from([None, "fp_other"]))
            elif kind == "analysis":
                doc["analysis_config"] = draw(st.sampled_from([None, {"rubric": "lenient"}]))
            elif kind in ("template", "tenant"):
                other = tenants[1 if kind == "template" else 2]
                if other.template_id == base["template_id"]:
                    other = tenants[0]
                doc.update(
                    org_id=other.org_id,
                    workspace_id=other.workspace_id,
                    template_id=other.template_id,
                )
            out.append(_event(doc, form))
    if draw(st.booleans(), label="one event the driver cannot encode"):
        doc = event_doc(tenants[0], occurred_at=TIE, request={"x": 1}, response={"y": 2})
        out.append(_event(doc)._replace(occurred_at=BEYOND_UTC))
    return out


#: A valid RFC 3339 instant that is year 10000 in UTC (set past the decoder): asyncpg cannot
#: encode it, so its batch is bisected and it alone rejected.
BEYOND_UTC = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1)))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
async def test_versions_are_a_function_of_the_stored_events(
    collated: tuple[str, str, str], data: st.DataObject
) -> None:
    """Any events, copies and conflicting copies, in any batches over 1-4 concurrent
    connections, on either collation: one result row per event_id holding the copy
    reported stored; every other copy reported once, a duplicate if its content is the
    stored one's and a conflicting duplicate if not; an event the driver cannot encode
    rejected alone; prompt_versions exactly the model of the stored copies (no row, and
    no value, from any other event)."""
    _, url, runtime_url = collated
    async with fresh(url) as (conn, tenants):
        sent = data.draw(copies(tenants), label="events")
        stream = data.draw(st.permutations(sent), label="order")
        cuts = sorted(data.draw(st.sets(st.integers(1, len(stream)), max_size=6), label="cuts"))
        batches = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        lanes_n = data.draw(st.integers(1, 4), label="connections")
        lanes: list[list[list[Event]]] = [[] for _ in range(lanes_n)]
        for b in batches:
            if b:
                lanes[data.draw(st.integers(0, lanes_n - 1), label="lane")].append(b)
        shared = data.draw(st.booleans(), label="one store for all connections")

        outcomes: list[tuple[Event, Outcome | Rejection]] = []
        pool = await create_pool(runtime_url, min_size=lanes_n, max_size=lanes_n)
        try:
            one = Store(pool)

            async def lane(mine: list[list[Event]]) -> None:
                store = one if shared else Store(pool)
                for b in mine:
                    for _ in range(20):
                        try:
                            result = await store.ingest(b)
                        except DatabaseConflict:
                            # As the worker does: a deadlock is possible only while a
                            # batch is bisected (its halves take locks out of order).
                            continue
                        break
                    outcomes.extend(zip(b, result.outcomes, strict=True))

            await asyncio.wait_for(asyncio.gather(*(lane(m) for m in lanes)), timeout=60)
        finally:
            await pool.close()

        assert len(outcomes) == len(sent)
        by_id: dict[str, list[tuple[Event, Outcome | Rejection]]] = defaultdict(list)
        for e, o in outcomes:
            if e.occurred_at == BEYOND_UTC:
                assert isinstance(o, Rejection), o
                assert o.reason == "unstorable_content", o
                continue
            by_id[e.event_id].append((e, o))
        stored: dict[str, Event] = {}
        for event_id, reported in by_id.items():
            winners = [e for e, o in reported if o is Outcome.STORED]
            assert len(winners) == 1, (event_id, [o for _, o in reported])
            stored[event_id] = winners[0]
            kept = content(winners[0])
            for e, o in reported:
                if e is winners[0]:
                    continue
                if content(e) == kept:
                    assert o is Outcome.DUPLICATE, o
                else:
                    assert isinstance(o, Rejection), o
                    assert o.reason == "conflicting_duplicate", o

        rows = await conn.fetch(
            """
            SELECT r.id::text, r.org_id::text, r.workspace_id::text, r.template_id::text,
                   r.provider_version_key, r.system_fingerprint, r.created_at,
                   r.request, r.response, r.analysis_config,
                   (v.org_id::text, v.workspace_id::text, v.template_id::text,
                    v.provider_version_key) = (r.org_id::text, r.workspace_id::text,
                    r.template_id::text, r.provider_version_key) AS own_version
            FROM prompt_results r JOIN prompt_versions v ON v.id = r.version_id
            """
        )
        assert {r[0] for r in rows} == set(stored)
        for r in rows:
            json = [
                None if x is None else orjson.dumps(orjson.loads(x), option=orjson.OPT_SORT_KEYS)
                for x in r[7:10]
            ]
            assert (*r[1:7], *json) == content(stored[r[0]])
            assert r["own_version"]

        versions = {
            tuple(r[:4]): tuple(r[4:])
            for r in await conn.fetch(
                """
                SELECT org_id::text, workspace_id::text, template_id::text,
                       provider_version_key, provider, model_id, fingerprint_captured_at,
                       first_seen_at, last_seen_at
                FROM prompt_versions
                """
            )
        }
        assert versions == model_versions(list(stored.values()))
