"""observations.stream_key: where an imported row enters its step's evidence stream

The gate's confidence sequences run along the step's rows in arrival order, and their guarantee needs that
order to carry no information about the outcomes. A file's order may (an export sorted by latency, when
the sparse model loses more on long, slow requests, gave false GO 85-100% in simulation): an imported row
is therefore placed by a salted hash of its request id (`rollout.pilots.stream_key`) within its import,
and rows the pilot answered itself keep NULL (their order is their arrival). Rows imported before this
revision keep NULL: they stay in file order, so recorded decisions do not change.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stream_key", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.drop_column("stream_key")
