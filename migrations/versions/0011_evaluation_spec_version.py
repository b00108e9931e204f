"""evaluation_runs.spec_version: the spec version an evaluation's dollars are priced at

An evaluation prices its measured speed-ups at the spec's traffic and cost (rollout.roi). After
`usecase add --new-version` changes them, its dollars are the old version's: the portfolio, its totals,
the main job's summary and the use-case page say "priced at spec vN; current is vM" beside them
(rollout.roi.priced_at). Runs recorded before this revision keep NULL: the version they were priced at
was not recorded (the idempotency key holds only a hash of it), and nothing is said of them.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluation_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spec_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_runs", schema=None) as batch_op:
        batch_op.drop_column("spec_version")
