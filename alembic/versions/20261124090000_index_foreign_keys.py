"""Index the foreign keys the V7 spec left unindexed.

Why: the spec says PostgreSQL indexes foreign keys automatically; it does not. Only the
referenced side (the primary keys) is indexed. Without an index on the referencing column,
every delete of a template or version, and every key update, scans the whole referencing
table while holding its lock. Two columns are not covered by an existing index whose
leading column they are:

- ``prompt_versions.template_id`` (the unique constraint leads with org_id);
- ``prompt_results.version_id``.

``prompt_results.template_id`` is already covered by ``ix_results_tpl_time``.

The indexes are built CONCURRENTLY, outside a transaction, so applying this revision to a
live, loaded database does not block ingestion. A concurrent build that is interrupted (a
lock timeout, a cancel, a lost connection) leaves an INVALID index behind, which
``IF NOT EXISTS`` alone would skip for ever: an INVALID one found here is dropped
(``DROP INDEX CONCURRENTLY``) and built again, and each index is checked valid after its
build. (Offline, ``--sql`` cannot look: the statements are emitted as they are.)

Additive: workers of the V7 revision run on this schema unchanged.

Revision ID: 20261124090000
Revises: 20250814141329
Create Date: 2026-11-24 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision: str = "20261124090000"
down_revision: str | Sequence[str] | None = "20250814141329"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: workers of this revision and later run on the schema it leaves.
workers_compatible_from: str = "20250814141329"

#: (index, table, column), built in this order, dropped in the reverse.
INDEXES = (
    ("ix_versions_template_id", "prompt_versions", "template_id"),
    ("ix_results_version_id", "prompt_results", "version_id"),
)
IS_VALID = sa.text("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:name)")


def _valid(name: str) -> bool | None:
    """True or False for an index that exists (valid or not); None if it does not."""
    value = op.get_bind().execute(IS_VALID, {"name": name}).scalar()
    return None if value is None else bool(value)


def upgrade() -> None:
    offline = op.get_context().as_sql
    with op.get_context().autocommit_block():
        for name, table, column in INDEXES:
            if not offline and _valid(name) is False:
                op.drop_index(name, table_name=table, postgresql_concurrently=True)
            op.create_index(name, table, [column], postgresql_concurrently=True, if_not_exists=True)
            if not offline and not _valid(name):
                raise CommandError(
                    f"index {name} is INVALID after its concurrent build: drop it with "
                    f"`DROP INDEX CONCURRENTLY {name}` and run migrate again"
                )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, _column in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
