"""spec versions remember the dataset they were validated with

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 08:40:00

A spec version points at an immutable, content-addressed copy of its dataset (sha256) and keeps the
validation summary (row count, token lengths, how tokens were counted), so an old version stays
usable after the source file changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("spec_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dataset_path", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("dataset_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("dataset_rows", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("validation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("spec_versions", schema=None) as batch_op:
        batch_op.drop_column("validation")
        batch_op.drop_column("dataset_rows")
        batch_op.drop_column("dataset_sha256")
        batch_op.drop_column("dataset_path")
