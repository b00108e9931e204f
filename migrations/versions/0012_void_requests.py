"""void_requests: the requests a pilot step drew whose reference the control arm could not make

A reference-free use case scores both arms against the control's (dense) answer. Where the control failed
to answer, the treatment's row was stored as an error with quality 0 although the treatment was never
asked: the dense arm's failures became the sparse arm's (a false NO-GO; the monitor rolled back a healthy
champion). Such a request is now void in both arms (rollout.arms.step): no observation, and a row here
(its step, batch, request id, why), so the request counts as used and is never drawn again, and the
voids of a batch are counted. Insert-only for the app role, as observations are.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "void_requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("pilot_step_id", sa.Integer(), sa.ForeignKey("pilot_steps.id"), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("pilot_step_id", "request_id", name="uq_void_requests_step_request"),
    )
    op.create_index("ix_void_requests_pilot_step_id", "void_requests", ["pilot_step_id"])


def downgrade() -> None:
    op.drop_index("ix_void_requests_pilot_step_id", table_name="void_requests")
    op.drop_table("void_requests")
