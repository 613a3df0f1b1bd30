"""V7 prompt tables: prompt_templates, prompt_versions, prompt_results.

Exactly the V7 schema spec (``v7_prompt_upgrade_20250814141329``), nothing more: anything
the project needs beyond it lives in later revisions, each saying why.

The branch label ``prompter`` lets an application that adds this directory to its
``version_locations`` address prompter's history as a branch of its own
(``alembic upgrade prompter@head``, ``alembic downgrade prompter@base``); a copy of this file
re-parented onto an application's revision (the spec's integration instructions) keeps
the label, harmlessly, and the revision id the later revisions name.

Reading of the spec: "(required)" is NOT NULL; "(auto-generated)" ids are primary keys
defaulting to ``gen_random_uuid()``; "(auto-set)" timestamps are NOT NULL defaulting to
``now()``; every other column is nullable. Foreign keys keep PostgreSQL's default actions.

Revision ID: 20250814141329
Revises:
Create Date: 2025-08-14 14:13:29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision: str = "20250814141329"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("prompter",)
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: workers of this revision and later run on the schema it leaves.
workers_compatible_from: str = "20250814141329"

TIMESTAMPTZ = sa.TIMESTAMP(timezone=True)


def _id() -> sa.Column[object]:
    return sa.Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    )


def _auto_set(name: str) -> sa.Column[object]:
    return sa.Column(name, TIMESTAMPTZ, nullable=False, server_default=sa.text("now()"))


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")

    op.create_table(
        "prompt_templates",
        _id(),
        sa.Column("org_id", UUID(as_uuid=True), nullable=False),
        sa.Column("workspace_id", UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.Column("system_instructions", sa.Text(), nullable=True),
        sa.Column("user_prompt_template", sa.Text(), nullable=False),
        sa.Column("country_set", JSONB(), nullable=False),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("inference_params", JSONB(), nullable=False),
        sa.Column("tools_spec", JSONB(), nullable=True),
        sa.Column("response_format", JSONB(), nullable=True),
        sa.Column("grounding_profile_id", UUID(as_uuid=True), nullable=True),
        sa.Column("grounding_snapshot_id", sa.Text(), nullable=True),
        sa.Column("retrieval_params", JSONB(), nullable=True),
        sa.Column("config_hash", sa.Text(), nullable=False),
        sa.Column("config_canonical_json", JSONB(), nullable=False),
        sa.Column("created_by", UUID(as_uuid=True), nullable=True),
        _auto_set("created_at"),
        sa.Column("deleted_at", TIMESTAMPTZ, nullable=True),
    )
    op.create_index(
        "ux_tpl_org_ws_confighash_active",
        "prompt_templates",
        ["org_id", "workspace_id", "config_hash"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )

    op.create_table(
        "prompt_versions",
        _id(),
        sa.Column("org_id", UUID(as_uuid=True), nullable=False),
        sa.Column("workspace_id", UUID(as_uuid=True), nullable=False),
        sa.Column(
            "template_id",
            UUID(as_uuid=True),
            sa.ForeignKey("prompt_templates.id", name="prompt_versions_template_id_fkey"),
            nullable=True,
        ),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("provider_version_key", sa.Text(), nullable=False),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("fingerprint_captured_at", TIMESTAMPTZ, nullable=True),
        _auto_set("first_seen_at"),
        _auto_set("last_seen_at"),
        sa.UniqueConstraint(
            "org_id",
            "workspace_id",
            "template_id",
            "provider_version_key",
            name="ux_versions_org_ws_tpl_pvk",
        ),
    )

    op.create_table(
        "prompt_results",
        _id(),
        sa.Column("org_id", UUID(as_uuid=True), nullable=False),
        sa.Column("workspace_id", UUID(as_uuid=True), nullable=False),
        sa.Column(
            "template_id",
            UUID(as_uuid=True),
            sa.ForeignKey("prompt_templates.id", name="prompt_results_template_id_fkey"),
            nullable=True,
        ),
        sa.Column(
            "version_id",
            UUID(as_uuid=True),
            sa.ForeignKey("prompt_versions.id", name="prompt_results_version_id_fkey"),
            nullable=True,
        ),
        sa.Column("provider_version_key", sa.Text(), nullable=True),
        sa.Column("system_fingerprint", sa.Text(), nullable=True),
        sa.Column("request", JSONB(), nullable=False),
        sa.Column("response", JSONB(), nullable=False),
        sa.Column("analysis_config", JSONB(), nullable=True),
        _auto_set("created_at"),
    )
    op.create_index(
        "ix_results_tpl_time", "prompt_results", ["template_id", sa.text("created_at DESC")]
    )
    op.create_index(
        "ix_results_workspace", "prompt_results", ["workspace_id", sa.text("created_at DESC")]
    )


def downgrade() -> None:
    # Indexes first, in dependency order; then the tables, results -> versions -> templates.
    # pgcrypto stays: other schemas may use it, and dropping it needs more rights.
    op.drop_index("ix_results_workspace", table_name="prompt_results")
    op.drop_index("ix_results_tpl_time", table_name="prompt_results")
    op.drop_constraint("ux_versions_org_ws_tpl_pvk", "prompt_versions", type_="unique")
    op.drop_index("ux_tpl_org_ws_confighash_active", table_name="prompt_templates")
    op.drop_table("prompt_results")
    op.drop_table("prompt_versions")
    op.drop_table("prompt_templates")
