"""Ingestion into a real PostgreSQL: idempotent, order-independent, tenant-safe, never stuck."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import with_user
from tests.factories import (
    BASE_TIME,
    Tenant,
    encode,
    event,
    event_doc,
    make_tenant,
    snapshot,
    spaced,
)
from tests.helpers import run_cli, wait_until
from worker.config import Settings
from worker.errors import (
    DatabaseConflict,
    DatabaseError,
    DatabaseUnavailable,
    Rejection,
    TransientError,
)
from worker.events import Event, decode, exact_columns
from worker.store import classify as classify_module
from worker.store import ingest as store_module
from worker.store import pool as pool_module
from worker.store.ingest import Outcome, Store
from worker.store.sql import SQL


def at(seconds: float) -> datetime:
    return BASE_TIME + timedelta(seconds=seconds)


@pytest.fixture
async def pool(database: str, runtime_role: tuple[str, str]) -> AsyncIterator[asyncpg.Pool]:
    """The worker's pool, logged in as the least-privilege runtime role
    (``sql/runtime_role.sql``, column rights only), as in production: every test of this
    module that ingests through the ``store`` fixture proves its path works with those
    rights (COPY, INSERT, the look-up and comparison of repeats, ON CONFLICT under
    savepoints, bisection, the merge and its FOR NO KEY UPDATE)."""
    p = await pool_module.create_pool(with_user(database, *runtime_role), max_size=4)
    try:
        yield p
    finally:
        await p.close()


async def worker_waiting_on_a_lock(conn: asyncpg.Connection, awaited: str) -> list[int]:
    """The pids of the worker's backends waiting on a lock, as soon as there is one; the
    test fails after 10 s without one, naming what it ``awaited``.

    A poll, and the only way: PostgreSQL tells no client when a backend starts waiting on
    a lock; ``pg_stat_activity`` shows it, and the test must see it before it acts (kills
    that backend, or commits the transaction it waits for)."""
    pids: list[int] = []

    async def waiting() -> bool:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'prompter-worker'"
            " AND wait_event_type = 'Lock'"
        )
        pids[:] = [r["pid"] for r in rows]
        return bool(pids)

    await wait_until(waiting, within=10, message=awaited)
    return pids


async def test_the_store_fixture_logs_in_as_the_runtime_role(
    store: Store, runtime_role: tuple[str, str]
) -> None:
    """The tests of this module run as the runtime role, not as the superuser."""
    async with store.pool.acquire() as c:
        assert await c.fetchval("SELECT current_user") == runtime_role[0]
        assert not await c.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")


async def test_result_row_holds_the_event(store: Store, conn: asyncpg.Connection) -> None:
    """id = event_id, created_at = occurred_at, version_id = the version, JSONB as sent."""
    t = await make_tenant(conn)
    e = event(
        t,
        occurred_at=at(5),
        analysis_config={"rubric": "strict", "weights": [1, 2]},
        request={"messages": [{"role": "user", "content": "héllo ✓"}], "n": 1},
    )
    result = await store.ingest([e])
    assert result.outcomes == [Outcome.STORED]
    row = await conn.fetchrow("SELECT * FROM prompt_results")
    version = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert str(row["id"]) == e.event_id
    assert row["created_at"] == at(5)
    assert row["version_id"] == version["id"]
    assert (str(row["org_id"]), str(row["workspace_id"]), str(row["template_id"])) == (
        t.org_id,
        t.workspace_id,
        t.template_id,
    )
    assert row["provider_version_key"] == "gpt-4o-2024-08-06"
    assert row["system_fingerprint"] == e.system_fingerprint
    sent = orjson.loads(e.body)
    assert orjson.loads(row["request"]) == sent["request"]
    assert orjson.loads(row["response"]) == sent["response"]
    assert orjson.loads(row["analysis_config"]) == {"rubric": "strict", "weights": [1, 2]}


async def test_null_analysis_config_is_sql_null(store: Store, conn: asyncpg.Connection) -> None:
    """A JSON null (or absent) analysis_config is stored as SQL NULL, not the JSON 'null'."""
    t = await make_tenant(conn)
    absent = event_doc(t)
    del absent["analysis_config"]
    events = [event(t, analysis_config=None), decode(encode(absent))]
    assert all(isinstance(e, Event) for e in events)
    await store.ingest(events)  # type: ignore[arg-type]
    nulls = await conn.fetchval("SELECT count(*) FROM prompt_results WHERE analysis_config IS NULL")
    assert nulls == 2


async def test_big_integers_are_kept_exact(store: Store, conn: asyncpg.Connection) -> None:
    """Integers beyond 64 bits land in jsonb exactly (orjson alone would make them floats)."""
    t = await make_tenant(conn)
    body = encode(event_doc(t))[:-1] + b', "ignored": 1}'
    body = body.replace(b'"prompt_tokens":42', b'"prompt_tokens":123456789012345678901234567890')
    e = decode(body)
    assert isinstance(e, Event)
    await store.ingest([e])
    stored = await conn.fetchval("SELECT response->'usage'->>'prompt_tokens' FROM prompt_results")
    assert stored == "123456789012345678901234567890"


def _forms(t: Tenant) -> list[bytes]:
    """Bodies of every form: compact (COPY) and others (INSERT from the whole body)."""
    compact = encode(
        event_doc(t, request={"t": 0.1, "u": 'é ✓ \\ " \n'}, analysis_config={"w": [1.5]})
    )
    return [
        compact,
        encode(event_doc(t, analysis_config=None)),
        orjson.dumps(orjson.loads(compact), option=orjson.OPT_INDENT_2),
        encode(event_doc(t, request={"t": 1.5})).replace(b'"t":1.5', b'"t":1.50'),
        encode(event_doc(t, request={"t": 100})).replace(b'"t":100', b'"t":1E2'),
        encode(event_doc(t, request={"t": "é"})).replace("é".encode(), b"\\u00e9"),
        encode(event_doc(t, response={"n": 1})).replace(b'"n":1', b'"n":-0.000'),
    ]


@pytest.mark.parametrize("together", [True, False], ids=["one-batch", "one-by-one"])
async def test_stored_json_is_what_postgresql_makes_of_the_body(
    store: Store, conn: asyncpg.Connection, together: bool
) -> None:
    """Whatever the body's form and whichever way it is written (COPY of the exact texts
    or INSERT parsing the whole body), the JSON columns are what jsonb makes of the body."""
    t = await make_tenant(conn)
    bodies = _forms(t)
    events = [decode(b) for b in bodies]
    assert all(isinstance(e, Event) for e in events)
    assert [e.columns is not None for e in events] == [True, True] + [False] * 5  # type: ignore[union-attr]
    if together:
        await store.ingest(events)  # type: ignore[arg-type]
    else:
        for e in events:
            await store.ingest([e])  # type: ignore[list-item]
    for body, e in zip(bodies, events, strict=True):
        stored = await conn.fetchrow(
            "SELECT request::text, response::text, analysis_config::text"
            " FROM prompt_results WHERE id = $1",
            uuid.UUID(e.event_id),  # type: ignore[union-attr]
        )
        expected = await conn.fetchrow(
            "SELECT (d -> 'request')::text, (d -> 'response')::text,"
            " NULLIF(d -> 'analysis_config', 'null'::jsonb)::text"
            " FROM (SELECT convert_from($1::bytea, 'UTF8')::jsonb AS d) AS s",
            body,
        )
        assert tuple(stored) == tuple(expected)


async def test_compact_batches_are_copied(
    store: Store, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of compact bodies is written with COPY; one body of another form sends the
    batch through INSERT. A batch holding a repeated event fails the COPY and is redone
    looking its ids up first, and so are the batches after it for a while: the stored one
    is settled without being written, the new ones are COPYed; the rows are the same."""
    copies: list[int] = []
    lookups: list[int] = []
    copy = asyncpg.Connection.copy_records_to_table
    fetch = asyncpg.Connection.fetch

    async def counting(self: asyncpg.Connection, table: str, **kwargs: Any) -> str:
        records = list(kwargs.pop("records"))
        copies.append(len(records))
        result: str = await copy(self, table, records=records, **kwargs)
        return result

    async def looking(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == SQL.STORED_IDS:
            lookups.append(len(args[0].split()))
        return await fetch(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", counting)
    monkeypatch.setattr(asyncpg.Connection, "fetch", looking)
    t = await make_tenant(conn)
    assert (await store.ingest([event(t), event(t)])).stored == 2
    assert copies == [2]
    assert (await store.ingest([event(t), spaced(event(t))])).stored == 2
    assert copies == [2]
    e = event(t)
    assert (await store.ingest([e, event(t)])).outcomes == [Outcome.STORED] * 2
    assert copies == [2, 2]
    assert lookups == []  # new events are not looked up
    assert (await store.ingest([event(t), e])).outcomes == [Outcome.STORED, Outcome.DUPLICATE]
    assert copies == [2, 2, 2, 1]  # the COPY failed on the repeat; the new one COPYed alone
    assert lookups == [2]
    assert (await store.ingest([event(t)])).stored == 1
    assert copies == [2, 2, 2, 1, 1]
    assert lookups == [2, 1]  # still looked up for a while after a repeat
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 8


async def test_repeated_event_is_a_counted_duplicate(
    store: Store, conn: asyncpg.Connection
) -> None:
    """A repeated event_id is a no-op, in the same batch or a later one, counted."""
    t = await make_tenant(conn)
    e = event(t)
    first = await store.ingest([e, e])
    assert first.outcomes == [Outcome.STORED, Outcome.DUPLICATE]
    again = await store.ingest([e])
    assert again.outcomes == [Outcome.DUPLICATE]
    assert (again.stored, again.duplicates) == (0, 1)
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 1


async def test_version_row_collapses_a_batch(store: Store, conn: asyncpg.Connection) -> None:
    """Several events for one key in one batch: one row, least/greatest/newest."""
    t = await make_tenant(conn)
    batch = [
        event(t, occurred_at=at(50), model_id="gpt-4o-mid"),
        event(t, occurred_at=at(10), fingerprint_captured_at=at(3).isoformat()),
        event(t, occurred_at=at(90), model_id="gpt-4o-new", provider="azure-openai"),
        event(t, occurred_at=at(30), fingerprint_captured_at=at(7).isoformat()),
    ]
    await store.ingest(batch)
    rows = await conn.fetch("SELECT * FROM prompt_versions")
    assert len(rows) == 1
    v = rows[0]
    assert (v["first_seen_at"], v["last_seen_at"]) == (at(10), at(90))
    assert v["fingerprint_captured_at"] == at(7)
    assert (v["provider"], v["model_id"]) == ("azure-openai", "gpt-4o-new")


async def test_version_row_merges_across_batches(store: Store, conn: asyncpg.Connection) -> None:
    """An older event arriving later widens first_seen but does not change the newest fields."""
    t = await make_tenant(conn)
    await store.ingest([event(t, occurred_at=at(100), model_id="new")])
    await store.ingest([event(t, occurred_at=at(1), model_id="old")])
    await store.ingest([event(t, occurred_at=at(50), fingerprint_captured_at=at(2).isoformat())])
    v = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert (v["first_seen_at"], v["last_seen_at"], v["model_id"]) == (at(1), at(100), "new")
    assert v["fingerprint_captured_at"] == at(2)
    assert await conn.fetchval("SELECT count(DISTINCT version_id) FROM prompt_results") == 1


async def test_ties_resolve_the_same_in_any_order(database: str, conn: asyncpg.Connection) -> None:
    """Two newest events at the same instant: the winner does not depend on arrival order."""
    t = await make_tenant(conn)
    a = event(t, occurred_at=at(9), model_id="model-a")
    b = event(t, occurred_at=at(9), model_id="model-b")
    pool = await pool_module.create_pool(database)
    try:
        s = Store(pool)
        await s.ingest([a])
        await s.ingest([b])
        first = await conn.fetchval("SELECT model_id FROM prompt_versions")
        await conn.execute("TRUNCATE prompt_results, prompt_versions")
        await s.ingest([b])
        await s.ingest([a])
        second = await conn.fetchval("SELECT model_id FROM prompt_versions")
    finally:
        await pool.close()
    assert first == second == "model-b"


async def test_tenant_rules(store: Store, conn: asyncpg.Connection) -> None:
    """Unknown template and another tenant's template are rejected; neighbours are stored."""
    t = await make_tenant(conn)
    other = await make_tenant(conn)
    good = event(t)
    unknown = event(Tenant(t.org_id, t.workspace_id, str(uuid.uuid4())))
    wrong_org = event(Tenant(str(uuid.uuid4()), t.workspace_id, t.template_id))
    wrong_ws = event(Tenant(t.org_id, other.workspace_id, t.template_id))
    result = await store.ingest([unknown, good, wrong_org, wrong_ws])
    assert result.outcomes[1] is Outcome.STORED
    reasons = [o.reason for o in result.outcomes if isinstance(o, Rejection)]
    assert reasons == ["unknown_template", "template_tenant_mismatch", "template_tenant_mismatch"]
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 1
    assert await conn.fetchval("SELECT count(*) FROM prompt_versions") == 1


async def test_template_registered_later_is_found(store: Store, conn: asyncpg.Connection) -> None:
    """An unknown template is not cached as unknown: once registered, its events are stored."""
    from tests.factories import template_doc
    from worker import templates

    org, ws = str(uuid.uuid4()), str(uuid.uuid4())
    spec = templates.parse_spec(template_doc(org, ws))
    e = event(Tenant(org, ws, str(uuid.uuid4())))
    assert (await store.ingest([e])).outcomes[0].reason == "unknown_template"  # type: ignore[union-attr]
    template_id, _ = await templates.register(conn, spec)
    e2 = event(Tenant(org, ws, template_id))
    assert (await store.ingest([e2])).outcomes == [Outcome.STORED]


async def test_soft_deleted_template_still_takes_results(
    store: Store, conn: asyncpg.Connection
) -> None:
    """History arrives late: a soft-deleted template keeps accepting results."""
    from worker import templates

    t = await make_tenant(conn)
    assert await templates.soft_delete(conn, t.template_id)
    assert (await store.ingest([event(t)])).outcomes == [Outcome.STORED]


@pytest.mark.parametrize("compact", [True, False], ids=["copy", "insert"])
async def test_data_error_is_isolated_by_splitting_the_batch(
    store: Store, conn: asyncpg.Connection, compact: bool
) -> None:
    """If PostgreSQL refuses an event the decoder let through, only that event is rejected,
    whether the batch was on its way through COPY or through INSERT."""
    t = await make_tenant(conn)
    good = [event(t, occurred_at=at(i)) for i in range(9)]
    if not compact:
        good = [spaced(e) for e in good]
    base = event(t)
    # Forge what the decoder would refuse: a NUL escape PostgreSQL cannot store.
    body = encode(event_doc(t, request={"x": "\u0000"}))
    bad = base._replace(body=body, columns=exact_columns(orjson.loads(body), body))
    assert bad.columns is not None
    batch = [*good[:4], bad, *good[4:]]
    result = await store.ingest(batch)
    assert result.stored == 9
    [(index, rejection)] = result.rejected
    assert index == 4
    assert rejection.reason == "unstorable_content"
    assert "22P05" in rejection.detail
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 9


async def test_template_deleted_under_the_cache_is_an_unknown_template(
    store: Store, conn: asyncpg.Connection
) -> None:
    """A hard-deleted template the cache still knows: FK violation -> that event rejected."""
    t = await make_tenant(conn)
    gone = await make_tenant(conn)
    await store.ingest([event(gone)])
    await conn.execute("DELETE FROM prompt_results")
    await conn.execute("DELETE FROM prompt_versions")
    await conn.execute("DELETE FROM prompt_templates WHERE id = $1", uuid.UUID(gone.template_id))
    result = await store.ingest([event(t), event(gone), event(t)])
    assert [o if o is Outcome.STORED else o.reason for o in result.outcomes] == [  # type: ignore[union-attr]
        Outcome.STORED,
        "unknown_template",
        Outcome.STORED,
    ]


async def test_empty_batch(store: Store) -> None:
    """Nothing in, nothing out, no round trip needed."""
    assert (await store.ingest([])).outcomes == []


async def test_concurrent_ingest_on_overlapping_keys(
    store: Store, conn: asyncpg.Connection
) -> None:
    """Four concurrent ingest calls on shared keys and shared events: no deadlock, right rows."""
    tenants = [await make_tenant(conn) for _ in range(3)]
    rng = random.Random(7)
    pool_of_events = [
        event(rng.choice(tenants), version_key=f"v{rng.randrange(4)}", occurred_at=at(i), rng=rng)
        for i in range(800)
    ]
    batches = []
    for _ in range(4):
        chosen = rng.sample(pool_of_events, 500)
        batches.append([chosen[i : i + 100] for i in range(0, 500, 100)])

    async def worker(my_batches: list[list[Event]]) -> None:
        for b in my_batches:
            await store.ingest(b)

    await asyncio.wait_for(asyncio.gather(*(worker(b) for b in batches)), timeout=60)
    expected = {e.event_id for b in batches for part in b for e in part}
    stored = {str(r[0]) for r in await conn.fetch("SELECT id FROM prompt_results")}
    assert stored == expected
    keys = {
        (e.org_id, e.workspace_id, e.template_id, e.provider_version_key)
        for e in pool_of_events
        if e.event_id in expected
    }
    assert await conn.fetchval("SELECT count(*) FROM prompt_versions") == len(keys)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_any_order_any_repeats_any_batches_same_tables(
    database: str, data: st.DataObject
) -> None:
    """Random events, shuffled, repeated and split into random batches: identical tables."""
    conn = await asyncpg.connect(database)
    pool = await pool_module.create_pool(database)
    try:
        await conn.execute("TRUNCATE prompt_results, prompt_versions, prompt_templates CASCADE")
        tenants = [await make_tenant(conn) for _ in range(2)]
        seed = data.draw(st.integers(0, 2**32), label="seed")
        rng = random.Random(seed)
        n = data.draw(st.integers(1, 40), label="events")
        events = [
            event(
                rng.choice(tenants),
                rng=rng,
                version_key=rng.choice(["k1", "k2", "k3"]),
                occurred_at=at(rng.randrange(6)),  # few instants: many ties
                model_id=rng.choice(["m1", "m2"]),
                provider=rng.choice(["p1", "p2"]),
                fingerprint_captured_at=rng.choice([None, at(rng.randrange(5)).isoformat()]),
            )
            for _ in range(n)
        ]
        # Some bodies not in compact form: their batches go through INSERT, the rest COPY.
        events = [spaced(e) if rng.random() < 0.2 else e for e in events]
        await Store(pool).ingest(sorted(events, key=lambda e: e.event_id))
        reference = await snapshot(conn)
        await conn.execute("TRUNCATE prompt_results, prompt_versions")

        stream = events + data.draw(st.lists(st.sampled_from(events), max_size=20), label="repeats")
        stream = data.draw(st.permutations(stream), label="order")
        cuts = sorted(data.draw(st.sets(st.integers(1, len(stream)), max_size=6), label="cuts"))
        fresh = Store(pool)  # a new worker: cold template cache
        start = 0
        for cut in [*cuts, len(stream)]:
            if cut > start:
                await fresh.ingest(stream[start:cut])
                start = cut
        assert await snapshot(conn) == reference
    finally:
        await pool.close()
        await conn.close()


# --- transient failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), DatabaseUnavailable),
        (asyncpg.exceptions.ConnectionFailureError("x"), DatabaseUnavailable),
        (asyncpg.exceptions.AdminShutdownError("terminating"), DatabaseUnavailable),
        (asyncpg.exceptions.CrashShutdownError("crash"), DatabaseUnavailable),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), DatabaseUnavailable),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), DatabaseUnavailable),
        (asyncpg.exceptions.InvalidCachedStatementError("plan changed"), DatabaseUnavailable),
        (asyncpg.exceptions.OutOfMemoryError("oom"), DatabaseUnavailable),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), DatabaseConflict),
        (asyncpg.exceptions.SerializationError("serialize"), DatabaseConflict),
        (asyncpg.exceptions.LockNotAvailableError("lock"), DatabaseConflict),
        (asyncpg.exceptions.QueryCanceledError("timeout"), DatabaseConflict),
        (asyncpg.exceptions.UndefinedTableError("no table"), DatabaseError),
        (asyncpg.exceptions.InsufficientPrivilegeError("denied"), DatabaseError),
        (asyncpg.exceptions.InterfaceError("connection is closed"), DatabaseUnavailable),
        (ConnectionRefusedError(111, "refused"), DatabaseUnavailable),
        (OSError(113, "no route"), DatabaseUnavailable),
        (TimeoutError(), DatabaseUnavailable),
    ],
)
def test_classify_by_sqlstate_and_type(exc: BaseException, kind: type[TransientError]) -> None:
    """Infrastructure failures map onto the transient branch, by SQLSTATE and type."""
    out = classify_module.classify(exc)
    assert type(out) is kind
    assert not classify_module.is_data_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.UntranslatableCharacterError("\\u0000"),
        asyncpg.exceptions.InvalidTextRepresentationError("bad json"),
        asyncpg.exceptions.ForeignKeyViolationError("fk"),
        asyncpg.exceptions.NumericValueOutOfRangeError("numeric"),
        asyncpg.exceptions.ProgramLimitExceededError("index row too big"),
    ],
)
def test_data_errors_are_not_transient(exc: asyncpg.PostgresError) -> None:
    """Data errors belong to an event: they are split out, never retried forever."""
    assert classify_module.is_data_error(exc)


async def test_terminated_connection_is_a_retryable_error(
    store: Store, conn: asyncpg.Connection, database: str
) -> None:
    """pg_terminate_backend mid-batch: DatabaseUnavailable, nothing committed, retry works."""
    t = await make_tenant(conn)
    batch = [event(t) for _ in range(50)]
    await store.ingest([event(t)])  # warm up the pool's connections
    blocker = await asyncpg.connect(database)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE prompt_results IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(store.ingest(batch))
        # Wait until the worker's statement is blocked on the lock, then kill its backend.
        pids = await worker_waiting_on_a_lock(conn, "the ingest to reach the lock")
        await conn.execute("SELECT pg_terminate_backend($1)", pids[0])
        with pytest.raises(DatabaseUnavailable):
            await asyncio.wait_for(task, 30)
        await tx.rollback()
    finally:
        await blocker.close()
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 1
    result = await store.ingest(batch)  # the pool replaces the dead connection
    assert result.stored == 50


async def test_unreachable_database_is_unavailable() -> None:
    """A pool that cannot connect raises DatabaseUnavailable, not a raw socket error."""
    with pytest.raises(DatabaseUnavailable):
        await pool_module.create_pool(
            "postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=2
        )


async def test_pool_decodes_jsonb_with_orjson(pool: asyncpg.Pool) -> None:
    """The pool's connections read and write json/jsonb through orjson."""
    async with pool.acquire() as c:
        value = await c.fetchval("SELECT $1::jsonb", {"a": [1, "é"]})
        assert value == {"a": [1, "é"]}


def test_result_counts() -> None:
    """IngestResult counts its outcomes."""
    r = store_module.IngestResult(
        outcomes=[Outcome.STORED, Outcome.DUPLICATE, Rejection("unknown_template", "x")]
    )
    assert (r.stored, r.duplicates, len(r.rejected)) == (1, 1, 1)


async def test_event_stored_concurrently_by_another_worker_is_a_duplicate(
    store: Store, conn: asyncpg.Connection, database: str
) -> None:
    """Another transaction inserts the same event (same content) and commits while our
    batch waits on it: our batch is rerun, that event counts as a duplicate, the others are
    stored."""
    t = await make_tenant(conn)
    x, y = event(t), event(t)
    await store.ingest([event(t)])  # the version row and the template cache exist
    other = await asyncpg.connect(database)
    try:
        tx = other.transaction()
        await tx.start()
        version_id = await other.fetchval("SELECT id FROM prompt_versions")
        await other.execute(
            "INSERT INTO prompt_results (id, org_id, workspace_id, template_id, version_id,"
            " provider_version_key, system_fingerprint, request, response, created_at)"
            " SELECT $1, $2, $3, $4, $5, d ->> 'provider_version_key',"
            " d ->> 'system_fingerprint', d -> 'request', d -> 'response', $6"
            " FROM (SELECT convert_from($7::bytea, 'UTF8')::jsonb AS d) AS s",
            uuid.UUID(x.event_id),
            uuid.UUID(t.org_id),
            uuid.UUID(t.workspace_id),
            uuid.UUID(t.template_id),
            version_id,
            x.occurred_at,
            x.body,
        )
        task = asyncio.create_task(store.ingest([x, y]))
        await worker_waiting_on_a_lock(conn, "our insert to wait on the other transaction")
        await tx.commit()
        result = await asyncio.wait_for(task, 30)
    finally:
        await other.close()
    assert result.outcomes == [Outcome.DUPLICATE, Outcome.STORED]
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 3


async def test_version_row_deleted_under_the_cache_is_recreated(
    store: Store, conn: asyncpg.Connection
) -> None:
    """A version row removed by someone else while the store caches its id: the next batch
    notices the foreign-key violation, forgets the cache and stores everything."""
    t = await make_tenant(conn)
    await store.ingest([event(t, occurred_at=at(1))])
    await conn.execute("DELETE FROM prompt_results")
    await conn.execute("DELETE FROM prompt_versions")
    result = await store.ingest([event(t, occurred_at=at(2)), event(t, occurred_at=at(3))])
    assert result.outcomes == [Outcome.STORED, Outcome.STORED]
    v = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert (v["first_seen_at"], v["last_seen_at"]) == (at(2), at(3))
    assert (
        await conn.fetchval("SELECT count(*) FROM prompt_results WHERE version_id = $1", v["id"])
        == 2
    )


async def test_old_events_leave_the_version_row_untouched(
    store: Store, conn: asyncpg.Connection
) -> None:
    """An event inside the known range changes nothing, so the row is not even rewritten
    (no lock, no new row version): replays of history do not contend with live traffic."""
    t = await make_tenant(conn)
    await store.ingest([event(t, occurred_at=at(1)), event(t, occurred_at=at(100))])
    before = await conn.fetchval("SELECT xmin::text FROM prompt_versions")
    await store.ingest([event(t, occurred_at=at(50))])
    assert await conn.fetchval("SELECT xmin::text FROM prompt_versions") == before
    await store.ingest([event(t, occurred_at=at(101))])
    assert await conn.fetchval("SELECT xmin::text FROM prompt_versions") != before
    v = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert (v["first_seen_at"], v["last_seen_at"]) == (at(1), at(101))


async def test_works_without_a_prepared_statement_cache(
    database: str, conn: asyncpg.Connection
) -> None:
    """PROMPTER_STATEMENT_CACHE_SIZE=0 (PgBouncer in transaction mode): every path of
    ingestion still works, fast and safe statements, repeats and rejections alike."""
    t = await make_tenant(conn)
    pool = await pool_module.create_pool(database, statement_cache_size=0)
    try:
        s = Store(pool)
        first = [event(t) for _ in range(20)]
        assert (await s.ingest(first)).stored == 20
        again = await s.ingest(
            [*first[:5], event(t), event(Tenant(t.org_id, t.workspace_id, str(uuid.uuid4())))]
        )
        assert [o if isinstance(o, Outcome) else o.reason for o in again.outcomes] == [
            *[Outcome.DUPLICATE] * 5,
            Outcome.STORED,
            "unknown_template",
        ]
    finally:
        await pool.close()
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 21


ROUNDS = 40


async def test_concurrent_batches_merging_the_same_versions_never_deadlock(
    database: str, conn: asyncpg.Connection
) -> None:
    """Six connections each writing ever newer events for the same version keys: every
    batch merges those rows, in one lock order, so no deadlock error ever reaches a
    worker (a deadlock would surface here as DatabaseConflict). The benchmark's
    four-connection variant is the sharper probe: before the rows were locked in id order
    first, it hit a dozen deadlocks in ten seconds."""
    tenants = [await make_tenant(conn) for _ in range(50)]
    keys = [(t, f"v{k}") for t in tenants for k in range(5)]
    # Whatever plan PostgreSQL picks: without index scans, an UPDATE locks rows in heap
    # order, which concurrent updates reshuffle (this test's own database only).
    await conn.execute(f"ALTER DATABASE {database.rsplit('/', 1)[1]} SET enable_indexscan = off")
    pool = await pool_module.create_pool(database, max_size=6)
    try:
        stores = [Store(pool) for _ in range(6)]
        await stores[0].ingest([event(t, version_key=k, occurred_at=at(0)) for t, k in keys])

        async def writer(s: Store, offset: int) -> None:
            rng = random.Random(offset)
            for round_ in range(ROUNDS):
                batch = [
                    event(t, version_key=k, occurred_at=at(1 + round_ * 10 + offset), rng=rng)
                    for t, k in rng.sample(keys, len(keys))
                ]
                result = await s.ingest(batch)
                assert result.stored == len(batch)

        await asyncio.wait_for(
            asyncio.gather(*(writer(s, i) for i, s in enumerate(stores))), timeout=120
        )
    finally:
        await pool.close()
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == len(keys) * (
        1 + 6 * ROUNDS
    )
    assert await conn.fetchval("SELECT max(last_seen_at) FROM prompt_versions") == at(
        1 + (ROUNDS - 1) * 10 + 5
    )


# --- versions from stored events only: conflicting duplicates -------------------------------


def _copy(e: Event, **changes: Any) -> Event:
    """Another event with ``e``'s event_id: its document with ``changes``."""
    doc = {**orjson.loads(e.body), **changes}
    decoded = decode(encode(doc))
    assert isinstance(decoded, Event), decoded
    return decoded


def _reasons(result: store_module.IngestResult) -> list[object]:
    return [o if isinstance(o, Outcome) else o.reason for o in result.outcomes]


async def test_conflicting_duplicates_change_nothing_and_are_reported(
    store: Store, conn: asyncpg.Connection
) -> None:
    """Issue 13, case 1. Event X is stored (2025, key v-a). X again with key v-b and
    provider evil, and X again with v-a, provider zzz and a later occurred_at, are both
    conflicting duplicates naming the columns that differ: no phantom version v-b, and v-a
    still says what its only result says. Another tenant's event reusing the id is one
    too, its detail naming none of the stored row's values, and it gets no version row."""
    t, other = await make_tenant(conn), await make_tenant(conn)
    x = event(t, version_key="v-a", occurred_at=datetime(2025, 3, 1, tzinfo=UTC))
    assert (await store.ingest([x])).outcomes == [Outcome.STORED]
    before = await snapshot(conn)

    evil = _copy(x, provider_version_key="v-b", provider="evil")
    late = _copy(x, provider="zzz", occurred_at="2026-01-01T00:00:00Z")  # not in the future
    foreign = _copy(
        x,
        org_id=other.org_id,
        workspace_id=other.workspace_id,
        template_id=other.template_id,
        provider_version_key="v-c",
    )
    for copy, differing in (
        (evil, ['"provider_version_key"']),
        (late, ['"occurred_at"']),
        (foreign, []),
    ):
        [outcome] = (await store.ingest([copy])).outcomes
        assert isinstance(outcome, Rejection), outcome
        assert outcome.reason == "conflicting_duplicate"
        for column in differing:
            assert column in outcome.detail
        for value in (t.org_id, t.workspace_id, t.template_id, "v-a", "Where is my order"):
            assert value not in outcome.detail
    assert "another org or workspace" in outcome.detail
    assert await snapshot(conn) == before
    keys = {r[0] for r in await conn.fetch("SELECT provider_version_key FROM prompt_versions")}
    assert keys == {"v-a"}


async def test_exact_repeats_in_another_form_are_plain_duplicates(
    store: Store, conn: asyncpg.Connection
) -> None:
    """An exact repeat is a duplicate whatever its form: indented, keys in another order,
    numbers written otherwise (1.5 and 1.50 are the same JSON value), occurred_at in another
    offset for the same instant. Fields not kept per result (provider, model_id,
    fingerprint_captured_at) cannot be compared: a copy differing only there is a duplicate
    too, and changes nothing."""
    t = await make_tenant(conn)
    x = event(t, occurred_at=at(0), request={"t": 1.5, "messages": ["hi"]})
    assert (await store.ingest([x])).outcomes == [Outcome.STORED]
    before = await snapshot(conn)
    doc = orjson.loads(x.body)
    reordered = decode(encode(dict(reversed(doc.items()))).replace(b'"t":1.5', b'"t":1.50'))
    assert isinstance(reordered, Event)
    offset = _copy(x, occurred_at=at(0).astimezone(timezone(timedelta(hours=5))).isoformat())
    newest = _copy(x, provider="zzz", model_id="zzz", fingerprint_captured_at=at(99).isoformat())
    result = await store.ingest([spaced(x), reordered, offset, newest])
    assert result.outcomes == [Outcome.DUPLICATE] * 4
    assert await snapshot(conn) == before


async def test_copies_within_one_batch_first_wins(store: Store, conn: asyncpg.Connection) -> None:
    """Copies of one event_id in one batch: the first is written, a later exact copy is a
    duplicate and a later different one a conflicting duplicate; the version row comes from
    the first copy only, whichever path (COPY or INSERT) the batch takes."""
    t = await make_tenant(conn)
    for compact in (True, False):
        x = event(t, version_key=f"k-{compact}", occurred_at=at(10))
        if not compact:
            x = spaced(x)
        conflicting = _copy(x, occurred_at=at(500).isoformat(), provider="zzz")
        phantom = _copy(x, provider_version_key=f"phantom-{compact}")
        y = event(t, version_key=f"k-{compact}", occurred_at=at(20))
        result = await store.ingest([x, conflicting, y, x, phantom])
        assert _reasons(result) == [
            Outcome.STORED,
            "conflicting_duplicate",
            Outcome.STORED,
            Outcome.DUPLICATE,
            "conflicting_duplicate",
        ]
        v = await conn.fetchrow(
            "SELECT * FROM prompt_versions WHERE provider_version_key = $1", f"k-{compact}"
        )
        assert (v["first_seen_at"], v["last_seen_at"], v["provider"]) == (at(10), at(20), "openai")
    keys = {r[0] for r in await conn.fetch("SELECT provider_version_key FROM prompt_versions")}
    assert keys == {"k-True", "k-False"}
    assert await conn.fetchval("SELECT count(*) FROM prompt_results") == 4


async def test_a_batch_of_new_events_and_repeats_merges_only_the_new(
    store: Store, conn: asyncpg.Connection
) -> None:
    """A batch mixing new events with conflicting repeats of stored ones (the batch that
    makes the COPY fail and is rerun): the new events are stored and merged, the repeats
    touch nothing, and the batches after it (checked for repeats first) do the same."""
    t = await make_tenant(conn)
    stored = [event(t, version_key="k", occurred_at=at(i)) for i in range(3)]
    await store.ingest(stored)
    for round_ in range(3):
        fresh = event(t, version_key="k", occurred_at=at(10 + round_))
        repeats = [_copy(e, occurred_at=at(1000).isoformat(), provider="zzz") for e in stored]
        result = await store.ingest([repeats[0], fresh, *repeats[1:]])
        assert (
            _reasons(result)
            == ["conflicting_duplicate", Outcome.STORED] + ["conflicting_duplicate"] * 2
        )
        v = await conn.fetchrow("SELECT * FROM prompt_versions")
        assert (v["first_seen_at"], v["last_seen_at"], v["provider"]) == (
            at(0),
            at(10 + round_),
            "openai",
        )


async def test_event_stored_concurrently_with_other_content_is_a_conflict(
    store: Store, conn: asyncpg.Connection, database: str
) -> None:
    """Another transaction stores event X (other content, same key) after our batch
    checked that X was new, and commits while our insert waits on it: the batch is redone,
    X is a conflicting duplicate, and the version row holds nothing of our copy."""
    t = await make_tenant(conn)
    seed = event(t, version_key="k", occurred_at=at(1))
    x, y = event(t, version_key="k", occurred_at=at(900)), event(t, occurred_at=at(2))
    await store.ingest([seed])
    await store.ingest([seed])  # a repeat: the next batches check for repeats first
    other = await asyncpg.connect(database)
    try:
        tx = other.transaction()
        await tx.start()
        version_id = await other.fetchval("SELECT id FROM prompt_versions")
        await other.execute(
            "INSERT INTO prompt_results (id, org_id, workspace_id, template_id, version_id,"
            " provider_version_key, request, response, created_at)"
            " VALUES ($1, $2, $3, $4, $5, 'k', '{}', '{}', $6)",
            uuid.UUID(x.event_id),
            uuid.UUID(t.org_id),
            uuid.UUID(t.workspace_id),
            uuid.UUID(t.template_id),
            version_id,
            at(1),
        )
        task = asyncio.create_task(store.ingest([x, y]))
        await worker_waiting_on_a_lock(conn, "our insert to wait on the other transaction")
        await tx.commit()
        result = await asyncio.wait_for(task, 30)
    finally:
        await other.close()
    assert _reasons(result) == ["conflicting_duplicate", Outcome.STORED]
    v = await conn.fetchrow("SELECT * FROM prompt_versions WHERE provider_version_key = 'k'")
    assert (v["first_seen_at"], v["last_seen_at"]) == (at(1), at(1))


# --- values the driver cannot encode ------------------------------------------------------

#: A valid RFC 3339 instant that is year 10000 in UTC: asyncpg cannot encode it.
BEYOND_UTC = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1)))


@pytest.mark.parametrize("compact", [True, False], ids=["copy", "insert"])
async def test_value_the_driver_cannot_encode_is_rejected_alone(
    store: Store, conn: asyncpg.Connection, compact: bool
) -> None:
    """Issue 12: an event whose value asyncpg cannot encode (occurred_at beyond year 9999
    in UTC: OverflowError inside COPY, DataError for INSERT's arguments) is a data error:
    the batch is bisected, that event rejected as unstorable_content naming the cause (not
    quoting values), its neighbours stored, and nothing of it reaches prompt_versions."""
    t = await make_tenant(conn)
    # The version key is known already, so the results are written first (COPY's records
    # or INSERT's arguments), before any statement about versions.
    assert (await store.ingest([event(t, occurred_at=at(0))])).stored == 1
    good = [event(t, occurred_at=at(i)) for i in range(1, 7)]
    bad = event(t, occurred_at=at(3))._replace(occurred_at=BEYOND_UTC)
    if not compact:
        good, bad = [spaced(e) for e in good], spaced(bad)._replace(occurred_at=BEYOND_UTC)
    result = await store.ingest([*good[:2], bad, *good[2:]])
    assert result.stored == 6
    [(index, rejection)] = result.rejected
    assert index == 2
    assert rejection.reason == "unstorable_content"
    assert "OverflowError" in rejection.detail
    assert "datetime" not in rejection.detail
    assert "9999" not in rejection.detail
    v = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert (v["first_seen_at"], v["last_seen_at"]) == (at(0), at(6))
    # The store keeps working on the same connections.
    assert (await store.ingest([event(t, occurred_at=at(7))])).stored == 1


async def test_replay_direct_refuses_a_conflicting_duplicate_and_exits_1(
    settings: Settings, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """`replay --direct` (as the runtime role) reports a conflicting duplicate as a refused
    line, with its reason and the differing column in the rejects file, and exits 1; the
    exact repeat is a duplicate; the version row holds nothing of the conflicting copy."""
    t = await make_tenant(conn)
    x, y = event(t, occurred_at=at(1)), event(t, occurred_at=at(2))
    conflicting = _copy(x, occurred_at=at(900).isoformat(), provider="zzz")
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"\n".join([x.body, x.body, conflicting.body, y.body]) + b"\n")
    rejects = tmp_path / "rejects.jsonl"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": settings.database_url,
        "PROMPTER_LOG_FORMAT": "text",
    }
    # One transaction at a time, so the first line is stored first (in flight together,
    # either copy could be the first stored, and the other the conflicting one).
    args = ("replay", "--direct", str(path), "--rejects", str(rejects), "--batch-size", "2",
            "--concurrency", "1")  # fmt: skip
    result = await asyncio.to_thread(run_cli, *args, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stored 2 events (1 stored before), 1 refused" in result.stdout
    [reject] = [orjson.loads(line) for line in rejects.read_bytes().splitlines()]
    assert (reject["line"], reject["reason"]) == (3, "conflicting_duplicate")
    assert '"occurred_at"' in reject["detail"]
    v = await conn.fetchrow("SELECT * FROM prompt_versions")
    assert (v["first_seen_at"], v["last_seen_at"], v["provider"]) == (at(1), at(2), "openai")
