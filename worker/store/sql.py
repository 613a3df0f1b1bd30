"""Every SQL statement of the ingestion path, by name (:class:`SQL`), run by the store
(:mod:`~worker.store.ingest`, :mod:`~worker.store.writer`, :mod:`~worker.store.repeats`);
how each one works and why is said beside it, and so is the shape the batch's events
travel in as their arguments (:func:`in_id_order`, :func:`body_positions`). The spans of
a traced batch carry these names (:func:`statement_span`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Final

from worker import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from worker.events import Event


class SQL:
    """Every statement of the ingestion path, by name."""

    TEMPLATE_TENANTS: Final = """
        SELECT id::text, org_id::text, workspace_id::text
        FROM prompt_templates
        WHERE id = ANY($1::uuid[])
    """

    # Version keys whose id is not cached yet: inserted with the batch's values if new, with
    # ON CONFLICT DO NOTHING, which never locks an existing row (a key inserted concurrently
    # and not yet committed is waited for). $1..$9: one row per key, sorted by key.
    INSERT_VERSIONS: Final = """
        INSERT INTO prompt_versions AS v
            (org_id, workspace_id, template_id, provider_version_key, provider, model_id,
             fingerprint_captured_at, first_seen_at, last_seen_at)
        SELECT org_id, workspace_id, template_id, provider_version_key, provider, model_id,
               fingerprint_captured_at, first_seen_at, last_seen_at
        FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                    $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
             WITH ORDINALITY AS t(org_id, workspace_id, template_id, provider_version_key,
                                  provider, model_id, fingerprint_captured_at,
                                  first_seen_at, last_seen_at, ord)
        ORDER BY ord
        ON CONFLICT ON CONSTRAINT ux_versions_org_ws_tpl_pvk DO NOTHING
        RETURNING v.id::text, v.org_id::text, v.workspace_id::text, v.template_id::text,
                  v.provider_version_key
    """
    # The ids of keys that already existed (a new statement: it sees every row committed
    # before it, including one the INSERT above waited for). Through the unique index.
    VERSION_IDS: Final = """
        SELECT v.id::text, v.org_id::text, v.workspace_id::text, v.template_id::text,
               v.provider_version_key
        FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[])
             AS k(org_id, workspace_id, template_id, provider_version_key)
        JOIN prompt_versions v USING (org_id, workspace_id, template_id, provider_version_key)
    """

    # Existing version rows: merged LAST in the transaction, so their row locks are held
    # only until the commit that follows, and a concurrent batch on the same keys writes its
    # results meanwhile (the results' foreign-key checks take KEY SHARE locks, which do not
    # conflict with these). Rows the batch would not change are not touched at all (every
    # field only ever moves one way, so skipping on a stale snapshot is safe).
    # The newest event is the greatest (last_seen_at, provider, model_id) with the strings
    # in byte order (COLLATE "C"), as Python compares them: never the column's collation,
    # under which an ICU database orders 'azure' < 'Bedrock' and the result would depend on
    # how the events were cut into batches.
    # Its subquery locks the rows to change in id order: every transaction takes its locks
    # in one order (new version keys by key, results by id, existing version rows by id), so
    # workers never deadlock each other. (A plain UPDATE ... FROM locks in the order of its
    # plan's scan; two of them deadlocked within seconds with four connections.)
    # $1..$6: one row per key, sorted by version id.
    _CHANGES_SOURCE: Final = """
        unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
               $6::timestamptz[])
        AS u(id, provider, model_id, fingerprint_captured_at, first_seen_at, last_seen_at)
    """
    _CHANGES_NEEDED: Final = """
        v.id = u.id
        AND (u.first_seen_at < v.first_seen_at
             OR u.last_seen_at > v.last_seen_at
             OR (u.fingerprint_captured_at IS NOT NULL
                 AND (v.fingerprint_captured_at IS NULL
                      OR u.fingerprint_captured_at > v.fingerprint_captured_at))
             OR (u.last_seen_at, u.provider COLLATE "C", u.model_id COLLATE "C")
              > (v.last_seen_at, v.provider COLLATE "C", v.model_id COLLATE "C"))
    """
    MERGE_VERSIONS: Final = f"""
        UPDATE prompt_versions AS v SET
            first_seen_at = LEAST(v.first_seen_at, l.first_seen_at),
            last_seen_at = GREATEST(v.last_seen_at, l.last_seen_at),
            fingerprint_captured_at =
                GREATEST(v.fingerprint_captured_at, l.fingerprint_captured_at),
            provider = CASE
                WHEN (l.last_seen_at, l.provider COLLATE "C", l.model_id COLLATE "C")
                   > (v.last_seen_at, v.provider COLLATE "C", v.model_id COLLATE "C")
                THEN l.provider ELSE v.provider END,
            model_id = CASE
                WHEN (l.last_seen_at, l.provider COLLATE "C", l.model_id COLLATE "C")
                   > (v.last_seen_at, v.provider COLLATE "C", v.model_id COLLATE "C")
                THEN l.model_id ELSE v.model_id END
        FROM (
            SELECT v.id, u.provider, u.model_id, u.fingerprint_captured_at,
                   u.first_seen_at, u.last_seen_at
            FROM prompt_versions AS v, {_CHANGES_SOURCE}
            WHERE {_CHANGES_NEEDED}
            ORDER BY v.id
            FOR NO KEY UPDATE OF v  -- locked in id order, before any row is updated
        ) AS l
        WHERE v.id = l.id
    """

    # The results, for batches that cannot be COPYed (a body not in compact form) or are
    # being bisected. INSERT_RESULTS skips a repeated event ON CONFLICT (id) DO NOTHING (one
    # inserted concurrently by another worker is waited for, then skipped) and returns the
    # ids it inserted: bisection uses it, as a unique violation there would look like bad
    # data. INSERT_RESULTS_FAST is a plain INSERT: about 15% faster (no speculative
    # insertion, see bench/README.md), but one repeated event fails it with a unique
    # violation, as it fails COPY; the store uses either for events it takes to be new.
    # (An anti-join, WHERE NOT EXISTS, was tried and rejected: its plan depends on table
    # statistics, and a generic plan made while the table was small seq-scans it forever.)
    # $1..$4: per version key (org, workspace, template, version id); $5..$9: one row per
    # event, sorted by event_id: id, the 1-based position of its key in $1..$4,
    # occurred_at (as Python parsed it, the same value the version row got), and where its
    # body sits in $10, every body concatenated. The text columns come from the body, as
    # PostgreSQL parses it (the same value as the decoder's: duplicate keys, last wins).
    # Whole numbers and UUIDs travel as space-separated text and bodies as one bytea:
    # asyncpg spends ~0.25 us per array element on shape checks and regrows its buffer by
    # ~1 KiB per element past 64 KiB, so fewer, flatter parameters cost the worker far less
    # CPU (bench/README.md has the numbers).
    _RESULTS_TEMPLATE: Final = """
        INSERT INTO prompt_results
            (id, org_id, workspace_id, template_id, version_id, provider_version_key,
             system_fingerprint, request, response, analysis_config, created_at)
        SELECT r.id,
               ($1::uuid[])[r.k], ($2::uuid[])[r.k], ($3::uuid[])[r.k], ($4::uuid[])[r.k],
               d.doc ->> 'provider_version_key', d.doc ->> 'system_fingerprint',
               d.doc -> 'request', d.doc -> 'response',
               NULLIF(d.doc -> 'analysis_config', 'null'::jsonb), r.created_at
        FROM unnest(string_to_array($5, ' ')::uuid[], string_to_array($6, ' ')::int[],
                    $7::timestamptz[], string_to_array($8, ' ')::int[],
                    string_to_array($9, ' ')::int[])
             AS r(id, k, created_at, body_start, body_length)
        -- OFFSET 0 keeps the subquery from being inlined: one parse per body, not five.
        CROSS JOIN LATERAL (
            SELECT convert_from(substring($10::bytea FROM r.body_start FOR r.body_length),
                                'UTF8')::jsonb AS doc
            OFFSET 0
        ) AS d
    """
    INSERT_RESULTS: Final = (
        _RESULTS_TEMPLATE + "        ON CONFLICT (id) DO NOTHING\n        RETURNING id::text\n"
    )
    INSERT_RESULTS_FAST: Final = _RESULTS_TEMPLATE

    # Which of these event ids are stored already: one index probe each. Run before writing
    # whenever the batch may hold repeats; the ids come back in no particular order.
    STORED_IDS: Final = """
        SELECT id::text FROM prompt_results WHERE id = ANY(string_to_array($1, ' ')::uuid[])
    """
    # The repeats of a batch against their stored rows: per id, whether the row belongs to
    # another org or workspace, and the names of the other columns whose values differ.
    # Compared in SQL, the way the row was written: the JSON values as jsonb (the same JSON
    # value, whatever its text: key order, spacing, escapes, 1.5 vs 1.50), occurred_at as an
    # instant, text exactly. Nothing of the stored row leaves the server but these names.
    # $1..$7: one element per event; $8..$10 locate its body in $10 as in _RESULTS_TEMPLATE.
    COMPARE_STORED: Final = """
        SELECT u.id::text,
               r.org_id <> u.org_id OR r.workspace_id <> u.workspace_id AS other_tenant,
               array_remove(ARRAY[
                   CASE WHEN r.template_id IS DISTINCT FROM u.template_id
                        THEN 'template_id' END,
                   CASE WHEN r.provider_version_key IS DISTINCT FROM u.provider_version_key
                        THEN 'provider_version_key' END,
                   CASE WHEN r.system_fingerprint IS DISTINCT FROM u.system_fingerprint
                        THEN 'system_fingerprint' END,
                   CASE WHEN r.created_at IS DISTINCT FROM u.occurred_at
                        THEN 'occurred_at' END,
                   CASE WHEN r.request IS DISTINCT FROM d.doc -> 'request'
                        THEN 'request' END,
                   CASE WHEN r.response IS DISTINCT FROM d.doc -> 'response'
                        THEN 'response' END,
                   CASE WHEN r.analysis_config
                             IS DISTINCT FROM NULLIF(d.doc -> 'analysis_config', 'null'::jsonb)
                        THEN 'analysis_config' END
               ], NULL) AS differing
        FROM unnest(string_to_array($1, ' ')::uuid[], $2::uuid[], $3::uuid[], $4::uuid[],
                    $5::text[], $6::text[], $7::timestamptz[],
                    string_to_array($8, ' ')::int[], string_to_array($9, ' ')::int[])
             AS u(id, org_id, workspace_id, template_id, provider_version_key,
                  system_fingerprint, occurred_at, body_start, body_length)
        JOIN prompt_results AS r ON r.id = u.id
        CROSS JOIN LATERAL (
            SELECT convert_from(substring($10::bytea FROM u.body_start FOR u.body_length),
                                'UTF8')::jsonb AS doc
            OFFSET 0
        ) AS d
    """


def in_id_order(events: Iterable[Event]) -> list[Event]:
    """The events sorted by id: the order every transaction writes result rows in, and so
    takes their locks in (see ``MERGE_VERSIONS``)."""
    return sorted(events, key=_event_id)


def _event_id(e: Event) -> str:
    return e.event_id


def body_positions(bodies: list[bytes]) -> tuple[str, str]:
    """Where each body sits in the bodies concatenated into one bytea: the 1-based starts
    and the lengths, each as space-separated text (see ``_RESULTS_TEMPLATE``)."""
    lengths = [len(b) for b in bodies]
    return (
        " ".join(map(str, itertools.accumulate(lengths[:-1], initial=1))),
        " ".join(map(str, lengths)),
    )


def statement_span(tracer: Tracer | None, name: str) -> AbstractContextManager[object]:
    """The span of one statement of :class:`SQL`, by its name, when tracing."""
    if tracer is None:
        return nullcontext()
    return tracing.span(
        tracer,
        tracing.SQL_PREFIX + name,
        {"db.system.name": "postgresql", "db.query.summary": name},
    )


def transaction_span(tracer: Tracer | None, mode: str) -> AbstractContextManager[object]:
    """The span of one attempt at a batch's transaction (BEGIN to COMMIT), when tracing."""
    if tracer is None:
        return nullcontext()
    return tracing.span(
        tracer,
        tracing.SQL_PREFIX + "transaction",
        {"db.system.name": "postgresql", "prompter.mode": mode},
    )
