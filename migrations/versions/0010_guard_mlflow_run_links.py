"""guard the MLflow run links of 0009: recorded once, never changed

0009 gave gate decisions an `mlflow_run_id` and made `observation_batches`, each written once the run is
logged. The decision's guard (0003) did not cover the new column, and the batches had none: any process
with the app role could point a settled decision at another run, clear the link, or rewrite a batch's
counts, with no audit row. Now a decision's and a batch's run, once recorded, cannot change, a batch's
other columns never change, and batches cannot be deleted (SQLite and PostgreSQL alike; on PostgreSQL
the app role also loses UPDATE on `observations` and `spec_versions`, which nothing updates:
rollout.db.roles, applied by `sparsepilot init`).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"

_BATCH_FIXED = ("id", "pilot_step_id", "batch_id", "source", "rows", "inserted", "created_at")
_RUN_ONCE = "OLD.mlflow_run_id IS NOT NULL AND NEW.mlflow_run_id IS DISTINCT FROM OLD.mlflow_run_id"


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    fixed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in _BATCH_FIXED)
    if _pg():
        _pg_guard(
            "gate_decisions_run_once",
            "gate_decisions",
            "UPDATE",
            _RUN_ONCE,
            "gate_decisions: a decision''s MLflow run, once recorded, cannot change",
        )
        _pg_guard(
            "observation_batches_guard",
            "observation_batches",
            "UPDATE OR DELETE",
            f"TG_OP = 'DELETE' OR {fixed} OR ({_RUN_ONCE})",
            "observation_batches: rows cannot be deleted, and only a batch''s MLflow run may be recorded, "
            "once",
        )
        return
    op.execute(
        "CREATE TRIGGER gate_decisions_run_once BEFORE UPDATE OF mlflow_run_id ON gate_decisions "
        f"WHEN {_RUN_ONCE.replace('IS DISTINCT FROM', 'IS NOT')} "
        "BEGIN SELECT RAISE(ABORT, 'gate_decisions: a decision''s MLflow run, once recorded, cannot "
        "change'); END"
    )
    op.execute(
        "CREATE TRIGGER observation_batches_guard BEFORE UPDATE ON observation_batches "
        f"WHEN {fixed.replace('IS DISTINCT FROM', 'IS NOT')} OR "
        f"({_RUN_ONCE.replace('IS DISTINCT FROM', 'IS NOT')}) "
        "BEGIN SELECT RAISE(ABORT, 'observation_batches: only a batch''s MLflow run may be recorded, "
        "once'); END"
    )
    op.execute(
        "CREATE TRIGGER observation_batches_no_delete BEFORE DELETE ON observation_batches "
        "BEGIN SELECT RAISE(ABORT, 'observation_batches rows cannot be deleted'); END"
    )


def _pg_guard(name: str, table: str, events: str, refuse_when: str, refusal: str) -> None:
    op.execute(
        f"""
        CREATE FUNCTION {name}() RETURNS trigger AS $$
        BEGIN
          IF {refuse_when} THEN
            RAISE EXCEPTION '{refusal}';
          END IF;
          IF TG_OP = 'DELETE' THEN
            RETURN OLD;
          END IF;
          RETURN NEW;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(f"CREATE TRIGGER {name} BEFORE {events} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()")


def downgrade() -> None:
    if _pg():
        for name, table in (
            ("gate_decisions_run_once", "gate_decisions"),
            ("observation_batches_guard", "observation_batches"),
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
        return
    for name in ("gate_decisions_run_once", "observation_batches_guard", "observation_batches_no_delete"):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
