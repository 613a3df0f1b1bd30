"""Compress the large JSON columns of prompt_results with lz4 instead of pglz.

Why: with production-sized events (the benchmark's size mix: log-normal, median 4 KiB,
mean 27 KiB, up to 4 MiB) PostgreSQL's default TOAST compression, pglz, is what bounds
ingestion: it compresses at a few tens of MB/s per core, and every ``request`` and
``response`` over about 2 KB is compressed as it is stored. Measured on 20,000 events of
the mix, mean body 25.5 KiB (``python -m bench --only toast``: ``Store.ingest`` in the
worker's default batches, two connections, 3 interleaved runs, PostgreSQL 15, 2 cores;
``bench/results/2026-12-02-vm-toast.md``), medians:

- ingest: 3,302 events/s (86 MB/s) with lz4 against 1,377 (36 MB/s) with pglz: 2.40x
  (2.18 - 2.45x run by run);
- bytes on disk per event (table, TOAST and indexes): 15,949 against 13,462: 1.18x, the
  bodies being 26,071 bytes on average (lz4 keeps 61% of them, pglz 52%);
- reading every value back (``sum(octet_length(col::text))``): 7,460 against 5,964
  events/s: 1.25x.

lz4 compresses a little less, so the table takes 18% more disk for the same events;
ingestion of large events more than doubles, reads gain a quarter, and ingestion of large
events is what bounded the worker's MB/s (issue 14): end to end, ``prompter-worker run``
stored the mix at 25 MB/s on pglz and 87 MB/s on lz4, 1 MiB events at 55 and 115 MB/s
(``bench/results/2026-12-02-vm-sizes.md`` and ``-sizes-lz4.md``). The trade is taken.

What it does: ``ALTER TABLE prompt_results ALTER COLUMN ... SET COMPRESSION lz4`` on
``request``, ``response`` and ``analysis_config``. Only the catalog changes: values stored
before keep their pglz compression (PostgreSQL reads both; a rewrite such as ``VACUUM
FULL`` would recompress them, and is not done here since it locks the table for as long
as it takes), values stored afterwards use lz4. The statement takes the table's ACCESS
EXCLUSIVE lock for a moment (a catalog update), waiting at most the migration's lock
timeout behind running transactions.

A server built without lz4 (``default_toast_compression`` does not list it among its
values; the Debian package measured here does) is left on pglz, with a warning; the
revision is still recorded, and ``SET COMPRESSION lz4`` can be run by hand once the server
has it.

Downgrade: the columns go back to the default compression (``default_toast_compression``,
pglz unless configured otherwise); values stored meanwhile stay lz4, readable as before.

Compatible with older workers? Yes: no column, type or key changes; a worker never names a
compression method.

Revision ID: 20261202090000
Revises: 20261201090000
Create Date: 2026-12-02 09:00:00
"""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261202090000"
down_revision: str | Sequence[str] | None = "20261201090000"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Additive for the workers: those of the V7 revision and later run on it unchanged.
workers_compatible_from: str = "20250814141329"

COLUMNS = ("request", "response", "analysis_config")
SUPPORTS_LZ4 = sa.text(
    "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
)
log = logging.getLogger("alembic.runtime.migration")


def _set(method: str) -> None:
    clauses = ", ".join(f"ALTER COLUMN {c} SET COMPRESSION {method}" for c in COLUMNS)
    op.execute(f"ALTER TABLE prompt_results {clauses}")


def upgrade() -> None:
    if not op.get_context().as_sql and not op.get_bind().execute(SUPPORTS_LZ4).scalar():
        log.warning(
            "this PostgreSQL server was built without lz4: prompt_results stays on pglz "
            "(run ALTER TABLE prompt_results ALTER COLUMN request SET COMPRESSION lz4, and "
            "the same for response and analysis_config, once it has lz4)"
        )
        return
    _set("lz4")


def downgrade() -> None:
    _set("default")
