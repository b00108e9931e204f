"""gate_decisions.mlflow_run_id and observation_batches: which stored rows have their MLflow run

A flow writes its row to the state DB first and logs to MLflow after it: a gate decision, then its MLflow
run; a pilot batch's observations, then the batch's run. A log that failed (an MLflow blip) was never made
good: a rerun of the gate found the decision already recorded and logged only new ones, and a rerun of the
pilot drew new requests. The decision now keeps the id of its MLflow run, and each stored batch has a row
(its step, batch id, source, rows and rows inserted) with its run's id; NULL until the run is logged, so a
rerun sees what is missing and logs it (rollout.run_links). Decisions recorded before this revision keep
NULL (a rerun looks their run up in MLflow by decision id before it logs one); batches stored before it
have no row and are not looked at.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    with op.batch_alter_table("gate_decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mlflow_run_id", sa.String(length=64), nullable=True))
    op.create_table(
        "observation_batches",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("pilot_step_id", sa.Integer(), sa.ForeignKey("pilot_steps.id"), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("inserted", sa.Integer(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("pilot_step_id", "batch_id", name="uq_observation_batches_step_batch"),
    )


def downgrade() -> None:
    op.drop_table("observation_batches")
    with op.batch_alter_table("gate_decisions", schema=None) as batch_op:
        batch_op.drop_column("mlflow_run_id")
