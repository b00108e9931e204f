"""pilots.pilot_number / pilots.go_alpha: the use case's alpha spent across its pilots

`pilot_number` is the pilot's place among its use case's pilots (1 = the first); `go_alpha` the level its
GO test runs at, fixed when the pilot starts (rollout.gate.spending: alpha 6 / (pi^2 k^2) for pilot k
under the spec's `gate.alpha_spending: use_case`). Pilots started before this revision keep NULL: their
steps were judged at the spec's alpha and keep being so, so recorded decisions do not change.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"  # no branch labels, no dependencies (alembic's defaults)


def upgrade() -> None:  # nullable columns: a plain ALTER TABLE ADD on SQLite and PostgreSQL alike
    op.add_column("pilots", sa.Column("pilot_number", sa.Integer(), nullable=True))
    op.add_column("pilots", sa.Column("go_alpha", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pilots", schema=None) as batch_op:  # SQLite drops columns in batch mode
        batch_op.drop_column("go_alpha")
        batch_op.drop_column("pilot_number")
