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
live, loaded database does not block ingestion. If a concurrent build is interrupted it
leaves an INVALID index behind: drop it (``DROP INDEX CONCURRENTLY``) and upgrade again.

Revision ID: 20261124090000
Revises: 20250814141329
Create Date: 2026-11-24 09:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261124090000"
down_revision: str | Sequence[str] | None = "20250814141329"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_versions_template_id",
            "prompt_versions",
            ["template_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_results_version_id",
            "prompt_results",
            ["version_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_results_version_id",
            table_name="prompt_results",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.drop_index(
            "ix_versions_template_id",
            table_name="prompt_versions",
            postgresql_concurrently=True,
            if_exists=True,
        )
