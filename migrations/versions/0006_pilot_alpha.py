"""pilots.pilot_number / pilots.go_alpha: the use case's alpha spent across its pilots

`pilot_number` is the pilot's place among its use case's pilots (1 = the first); `go_alpha` the level its
GO test runs at, fixed when the pilot starts (rollout.gate.spending: alpha 6 / (pi^2 k^2) for pilot k
under the spec's `gate.alpha_spending: use_case`). Pilots started before this revision keep NULL: their
steps were judged at the spec's alpha and keep being so, so recorded decisions do not change.
(use_case_id, pilot_number) is unique, so two pilots started at once cannot both take one place.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"  # no branch labels, no dependencies (alembic's defaults)


def upgrade() -> None:
    with op.batch_alter_table("pilots", schema=None) as batch_op:  # SQLite adds a constraint in batch mode
        batch_op.add_column(sa.Column("pilot_number", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("go_alpha", sa.Float(), nullable=True))
        batch_op.create_unique_constraint("uq_pilots_use_case_number", ["use_case_id", "pilot_number"])


def downgrade() -> None:
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.drop_constraint("uq_pilots_use_case_number", type_="unique")
        batch_op.drop_column("go_alpha")
        batch_op.drop_column("pilot_number")
