"""trust: audit hash chain and origin, pilots pinned to a spec version, guarded decision tables

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:30:00

- audit_log gets os_user, host, prev_hash and row_hash (rollout.audit); existing rows are chained in
  id order, so `sparsepilot audit verify` covers them too; a unique index on prev_hash lets only one
  row follow each row;
- pilots.spec_version: the spec version a pilot runs under (existing pilots: their use case's current
  version at upgrade time, the version their gates read until now);
- triggers: approvals are append-only; gate_decisions may only record an open decision's resolution
  and flow run; alias_history may only move a non-committed move to its outcome; none of the four
  tables can be deleted from or truncated; on SQLite an INSERT OR REPLACE that would overwrite an
  existing row (same id or unique key) is refused, because REPLACE deletes without firing triggers.
  On PostgreSQL the trigger functions belong to the role that runs the migration (the owner role).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_GUARDED = ("audit_log", "approvals", "gate_decisions", "alias_history")
# Columns of a decision / alias move that never change once written.
_DECISION_FIXED = (
    "id", "idempotency_key", "use_case_id", "pilot_id", "pilot_step_id", "kind", "look_index", "outcome",
    "awaiting", "evidence", "explanation", "data_fingerprint", "created_at",
)  # fmt: skip
_MOVE_FIXED = (
    "id", "idempotency_key", "use_case_id", "alias", "from_version", "to_version", "actor", "reason",
    "created_at",
)  # fmt: skip
# Unique keys an INSERT OR REPLACE could hit (SQLite): id plus each table's own unique columns.
_UNIQUE_KEYS = {
    "audit_log": ("id", "prev_hash"),
    "approvals": ("id",),
    "gate_decisions": ("id", "idempotency_key"),
    "alias_history": ("id", "idempotency_key"),
}

_SQLITE_TRIGGERS = (
    "approvals_no_update", "approvals_no_delete", "gate_decisions_guard", "gate_decisions_no_delete",
    "alias_history_guard", "alias_history_no_delete",
)  # fmt: skip


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("os_user", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spec_version", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE pilots SET spec_version = "
        "(SELECT current_spec_version FROM use_cases WHERE use_cases.id = pilots.use_case_id)"
    )
    _chain_existing_rows()
    op.create_index("uq_audit_log_prev_hash", "audit_log", ["prev_hash"], unique=True)
    if _pg():
        _create_pg_guards()
    else:
        _create_sqlite_guards()


def downgrade() -> None:
    if _pg():
        for t in _GUARDED:
            op.execute(f"DROP TRIGGER IF EXISTS {t}_no_truncate ON {t}")
        op.execute("DROP TRIGGER IF EXISTS approvals_append_only ON approvals")
        op.execute("DROP TRIGGER IF EXISTS gate_decisions_guard ON gate_decisions")
        op.execute("DROP TRIGGER IF EXISTS alias_history_guard ON alias_history")
        for fn in ("sp_refuse_change", "gate_decisions_guard", "alias_history_guard"):
            op.execute(f"DROP FUNCTION IF EXISTS {fn}()")
    else:
        for t in _GUARDED:
            op.execute(f"DROP TRIGGER IF EXISTS {t}_no_replace")
        for name in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("uq_audit_log_prev_hash", table_name="audit_log")
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.drop_column("spec_version")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_column("row_hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("host")
        batch_op.drop_column("os_user")


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _chain_existing_rows() -> None:
    """Hash the rows written before this revision, in id order (0001's update trigger is lifted for
    the duration and put back exactly as 0001 made it)."""
    from rollout.audit import GENESIS, entry_hash

    bind = op.get_bind()
    log = sa.table(
        "audit_log",
        sa.column("id", sa.Integer),
        sa.column("ts", sa.DateTime(timezone=True)),
        sa.column("actor", sa.String),
        sa.column("action", sa.String),
        sa.column("use_case_id", sa.Integer),
        sa.column("entity", sa.String),
        sa.column("entity_id", sa.String),
        sa.column("details", sa.JSON),
        sa.column("prev_hash", sa.String),
        sa.column("row_hash", sa.String),
    )
    rows = bind.execute(sa.select(log).order_by(log.c.id)).mappings().all()
    if not rows:
        return
    if _pg():
        op.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
    else:
        op.execute("DROP TRIGGER audit_log_no_update")
    prev = GENESIS
    for r in rows:
        h = entry_hash({**r, "prev_hash": prev, "os_user": None, "host": None})
        bind.execute(sa.update(log).where(log.c.id == r["id"]).values(prev_hash=prev, row_hash=h))
        prev = h
    if _pg():
        op.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update")
    else:
        op.execute(
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
            "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
        )


def _changed(cols: tuple[str, ...], *, distinct: str, cast: dict[str, str]) -> str:
    return " OR ".join(f"NEW.{c}{cast.get(c, '')} {distinct} OLD.{c}{cast.get(c, '')}" for c in cols)


def _create_sqlite_guards() -> None:
    for table, keys in _UNIQUE_KEYS.items():
        match = " OR ".join(f"{k} = NEW.{k}" for k in keys)
        op.execute(
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
            f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {match}) "
            f"BEGIN SELECT RAISE(ABORT, '{table}: a row with this key exists and cannot be replaced'); END"
        )
    for verb in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER approvals_no_{verb.lower()} BEFORE {verb} ON approvals "
            "BEGIN SELECT RAISE(ABORT, 'approvals are append-only'); END"
        )
    fixed = _changed(_DECISION_FIXED, distinct="IS NOT", cast={})
    op.execute(
        "CREATE TRIGGER gate_decisions_guard BEFORE UPDATE ON gate_decisions "
        f"WHEN {fixed} OR (OLD.resolution IS NOT NULL AND "
        "(NEW.resolution IS NOT OLD.resolution OR NEW.flow_run_id IS NOT OLD.flow_run_id)) "
        "BEGIN SELECT RAISE(ABORT, 'gate_decisions: only an open decision''s resolution and flow run "
        "may change'); END"
    )
    fixed = _changed(_MOVE_FIXED, distinct="IS NOT", cast={})
    op.execute(
        "CREATE TRIGGER alias_history_guard BEFORE UPDATE ON alias_history "
        f"WHEN {fixed} OR (OLD.status = 'committed' AND NEW.status IS NOT OLD.status) "
        "BEGIN SELECT RAISE(ABORT, 'alias_history: only an uncommitted move''s outcome may change'); END"
    )
    for table in ("gate_decisions", "alias_history"):
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} rows cannot be deleted'); END"
        )


def _create_pg_guards() -> None:
    op.execute(
        """
        CREATE FUNCTION sp_refuse_change() RETURNS trigger AS $$
        BEGIN
          RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    for table in _GUARDED:
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION sp_refuse_change()"
        )
    op.execute(
        "CREATE TRIGGER approvals_append_only BEFORE UPDATE OR DELETE ON approvals "
        "FOR EACH ROW EXECUTE FUNCTION sp_refuse_change()"
    )
    # The line break inside gate_decisions' condition stays where 0003 was released with it: a function's
    # stored body is part of the schema.
    _create_pg_guard(
        "gate_decisions",
        _changed(_DECISION_FIXED, distinct="IS DISTINCT FROM", cast={"evidence": "::text"}),
        "OLD.resolution IS NOT NULL AND (NEW.resolution IS DISTINCT FROM OLD.resolution\n"
        "              OR NEW.flow_run_id IS DISTINCT FROM OLD.flow_run_id)",
        "only an open decision''s resolution and flow run may change",
    )
    _create_pg_guard(
        "alias_history",
        _changed(_MOVE_FIXED, distinct="IS DISTINCT FROM", cast={}),
        "OLD.status = 'committed' AND NEW.status IS DISTINCT FROM OLD.status",
        "only an uncommitted move''s outcome may change",
    )


def _create_pg_guard(table: str, fixed: str, settled: str, refusal: str) -> None:
    """`table`_guard(): rows cannot be deleted; an update that changes a `fixed` column, or any update
    once `settled` holds, is refused with `refusal`."""
    op.execute(
        f"""
        CREATE FUNCTION {table}_guard() RETURNS trigger AS $$
        BEGIN
          IF TG_OP = 'DELETE' THEN
            RAISE EXCEPTION '{table} rows cannot be deleted';
          END IF;
          IF {fixed} OR ({settled}) THEN
            RAISE EXCEPTION '{table}: {refusal}';
          END IF;
          RETURN NEW;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        f"CREATE TRIGGER {table}_guard BEFORE UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {table}_guard()"
    )
