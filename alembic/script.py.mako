"""${message}

Why: <say why the project needs this beyond the V7 spec>

Compatible with older workers? <say whether workers built before this revision still run
on the schema it leaves, and set workers_compatible_from below to match>

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}
#: Rolling upgrades (migrate first, then the workers): the OLDEST revision whose workers
#: still run correctly on the schema this revision leaves. `migrate` records it in the
#: database (prompter_schema_compat) when it applies this revision, so a worker that does
#: not have this file can still read it at start: it runs if it knows that revision, and
#: exits 2 asking to be upgraded otherwise.
#: - Additive for the workers (a new index, a new table or nullable column they do not use,
#:   a looser constraint): copy the previous revision's value, so the running workers keep
#:   running while they are replaced.
#: - Anything an older worker would trip on (a column it reads or writes renamed, retyped or
#:   dropped, a new NOT NULL column without a default, a changed unique key): this
#:   revision's own id (the default): older workers refuse to start until upgraded.
#: It may never name an older revision than the previous revision's value.
workers_compatible_from: str = ${repr(up_revision)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
