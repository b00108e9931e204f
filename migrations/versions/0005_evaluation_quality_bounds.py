"""evaluation_runs.quality_low / quality_high: the evaluation's bounds on the task-score change

One-sided 95% bounds on the mean per-row change sparse - dense, valid at any number of rows
(sparse_core.task_bound.delta_bounds). Runs recorded before this revision keep NULL: their report has no
bounds to copy, and a mean alone vouches for nothing.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ("quality_low", "quality_high")


def upgrade() -> None:
    with op.batch_alter_table("evaluation_runs", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_runs", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
