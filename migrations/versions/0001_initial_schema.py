"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29 08:07:41.525268
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # First written by Alembic's autogenerate; the columns every table shares (id, primary key), the
    # foreign keys and the indexes come from _create_table, in the order autogenerate wrote them.
    _create_table(
        "use_cases",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("criticality", sa.String(length=10), nullable=False),
        sa.Column("phase", sa.String(length=30), nullable=False),
        sa.Column("current_spec_version", sa.Integer(), nullable=False),
        _at("created_at"),
        _at("updated_at"),
        unique=[("name",)],
    )
    _create_table(
        "alias_history",
        _idempotency_key(),
        _ref("use_case_id"),
        sa.Column("alias", sa.String(length=30), nullable=False),
        sa.Column("from_version", sa.String(length=20), nullable=True),
        sa.Column("to_version", sa.String(length=20), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _at("created_at"),
        refs={"use_case_id": "use_cases"},
        unique=[("idempotency_key",)],
        indexes=["use_case_id"],
    )
    _create_table(
        "audit_log",
        _at("ts"),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=60), nullable=False),
        _ref("use_case_id", nullable=True),
        sa.Column("entity", sa.String(length=60), nullable=True),
        sa.Column("entity_id", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        refs={"use_case_id": "use_cases"},
        indexes=["action", "ts", "use_case_id"],
    )
    _create_table(
        "model_versions",
        _ref("use_case_id"),
        sa.Column("base_model_ref", sa.String(length=500), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("plan_hash", sa.String(length=64), nullable=False),
        sa.Column("mlflow_model_name", sa.String(length=200), nullable=True),
        sa.Column("mlflow_version", sa.String(length=20), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("density", sa.Float(), nullable=True),
        _at("created_at"),
        refs={"use_case_id": "use_cases"},
        unique=[("use_case_id", "plan_hash")],
    )
    _create_table(
        "spec_versions",
        _ref("use_case_id"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        _at("created_at"),
        refs={"use_case_id": "use_cases"},
        unique=[("use_case_id", "spec_hash"), ("use_case_id", "version")],
    )
    _create_table(
        "calibration_runs",
        _idempotency_key(),
        _ref("use_case_id"),
        sa.Column("spec_version", sa.Integer(), nullable=False),
        _ref("model_version_id", nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _at("started_at"),
        _at("finished_at", nullable=True),
        refs={"model_version_id": "model_versions", "use_case_id": "use_cases"},
        unique=[("idempotency_key",)],
    )
    _create_table(
        "evaluation_runs",
        _idempotency_key(),
        _ref("use_case_id"),
        _ref("model_version_id"),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("device", sa.String(length=50), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("density", sa.Float(), nullable=True),
        sa.Column("quality_delta", sa.Float(), nullable=True),
        sa.Column("speedup", sa.Float(), nullable=True),
        sa.Column("speedup_low", sa.Float(), nullable=True),
        sa.Column("speedup_high", sa.Float(), nullable=True),
        sa.Column("savings_month_usd", sa.Float(), nullable=True),
        sa.Column("savings_month_low", sa.Float(), nullable=True),
        sa.Column("savings_month_high", sa.Float(), nullable=True),
        sa.Column("payback_days", sa.Float(), nullable=True),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("roi", sa.JSON(), nullable=False),
        sa.Column("artifacts", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _at("created_at"),
        refs={"model_version_id": "model_versions", "use_case_id": "use_cases"},
        unique=[("idempotency_key",)],
    )
    _create_table(
        "pilots",
        _ref("use_case_id"),
        _ref("model_version_id"),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=30), nullable=False),
        sa.Column("current_step_index", sa.Integer(), nullable=False),
        _at("started_at"),
        _at("ended_at", nullable=True),
        refs={"model_version_id": "model_versions", "use_case_id": "use_cases"},
    )
    _create_table(
        "pilot_steps",
        _ref("pilot_id"),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("traffic_pct", sa.Float(), nullable=False),
        sa.Column("min_samples", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        _at("started_at"),
        _at("ended_at", nullable=True),
        refs={"pilot_id": "pilots"},
        unique=[("pilot_id", "index")],
    )
    _create_table(
        "gate_decisions",
        _idempotency_key(),
        _ref("use_case_id"),
        _ref("pilot_id", nullable=True),
        _ref("pilot_step_id", nullable=True),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("look_index", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=10), nullable=False),
        sa.Column("awaiting", sa.String(length=30), nullable=False),
        sa.Column("resolution", sa.String(length=20), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("data_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        _at("created_at"),
        refs={"pilot_id": "pilots", "pilot_step_id": "pilot_steps", "use_case_id": "use_cases"},
        unique=[("idempotency_key",)],
        indexes=["use_case_id"],
    )
    _create_table(
        "observations",
        _ref("pilot_step_id"),
        _ref("use_case_id"),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("arm", sa.String(length=10), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("error", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        _at("created_at"),
        refs={"pilot_step_id": "pilot_steps", "use_case_id": "use_cases"},
        unique=[("pilot_step_id", "request_id", "arm")],
        indexes=["pilot_step_id", "use_case_id"],
    )
    _create_table(
        "approvals",
        _ref("decision_id"),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("against_recommendation", sa.Boolean(), nullable=False),
        _at("created_at"),
        refs={"decision_id": "gate_decisions"},
        indexes=["decision_id"],
    )
    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    _drop_table("approvals", indexes=["decision_id"])
    _drop_table("observations", indexes=["pilot_step_id", "use_case_id"])
    _drop_table("gate_decisions", indexes=["use_case_id"])
    _drop_table("pilot_steps")
    _drop_table("pilots")
    _drop_table("evaluation_runs")
    _drop_table("calibration_runs")
    _drop_table("spec_versions")
    _drop_table("model_versions")
    _drop_table("audit_log", indexes=["action", "ts", "use_case_id"])
    _drop_table("alias_history", indexes=["use_case_id"])
    _drop_table("use_cases")


def _create_table(
    name: str,
    *columns: sa.Column,
    refs: dict[str, str] | None = None,
    unique: list[tuple[str, ...]] | None = None,
    indexes: list[str] | None = None,
) -> None:
    """Table `name`: an integer id first, then `columns`; a foreign key for each column in `refs` onto
    the id of the table it names, the primary key on id, the unique constraints; then an index on each
    column in `indexes`."""
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        *columns,
        *(sa.ForeignKeyConstraint([column], [f"{table}.id"]) for column, table in (refs or {}).items()),
        sa.PrimaryKeyConstraint("id"),
        *(sa.UniqueConstraint(*key) for key in unique or []),
    )
    if indexes:
        with op.batch_alter_table(name, schema=None) as batch_op:
            for column in indexes:
                batch_op.create_index(batch_op.f(f"ix_{name}_{column}"), [column], unique=False)


def _drop_table(name: str, indexes: list[str] | None = None) -> None:
    """Undo _create_table: its indexes, last created first, then the table."""
    if indexes:
        with op.batch_alter_table(name, schema=None) as batch_op:
            for column in reversed(indexes):
                batch_op.drop_index(batch_op.f(f"ix_{name}_{column}"))
    op.drop_table(name)


def _ref(name: str, nullable: bool = False) -> sa.Column:
    """An integer column that refers to another table's id (its foreign key: _create_table's refs)."""
    return sa.Column(name, sa.Integer(), nullable=nullable)


def _at(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _idempotency_key() -> sa.Column:
    return sa.Column("idempotency_key", sa.String(length=128), nullable=False)


# The ORM refuses to update/delete audit rows; these triggers make the database refuse too, so raw SQL
# and other clients cannot rewrite history either.
def _create_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION audit_log_append_only() RETURNS trigger AS $$
            BEGIN
              RAISE EXCEPTION 'audit_log is append-only';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )


def _drop_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
