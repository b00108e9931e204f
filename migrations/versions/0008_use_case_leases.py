"""use_case_leases: one run at a time works on a use case

A use case's cycle runs on a schedule, and a cycle can outlast its interval or meet a manual `sparsepilot
pilot`, `gate` or `calibrate`. Two runs at once calibrated the same plan twice, drew the same next requests
(the second run's answers lost to the observations' unique key, its flow failing on it) and timed their
measurements on a host the other was loading. A flow now holds its use case's lease while it works
(`rollout.leases`): a row per use case (made with the use case; here, for the ones that exist) with the
holder's token, what it is doing, its flow run, host and process, and when the lease lapses unless
renewed. Released by clearing those fields: the app role updates, never deletes.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_table(
        "use_case_leases",
        sa.Column("use_case_id", sa.Integer(), sa.ForeignKey("use_cases.id"), primary_key=True),
        sa.Column("holder", sa.String(length=64), nullable=True),
        sa.Column("work", sa.String(length=300), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.execute("INSERT INTO use_case_leases (use_case_id) SELECT id FROM use_cases")


def downgrade() -> None:
    op.drop_table("use_case_leases")
