"""PostgreSQL: the app connects as a role that owns nothing.

Two roles (docs/operations.md, deploy/postgres/init-databases.sh):
- the owner role owns the database objects and runs the migrations (``sparsepilot init`` with
  SPARSEPILOT_OWNER_DATABASE_URL); the append-only triggers and their functions belong to it;
- the app role (the user in SPARSEPILOT_DATABASE_URL, what every other command, flow and the dashboard
  use) may SELECT and INSERT everywhere, UPDATE only the tables whose rows move through states (the
  decision, alias-history and batch updates are further limited by the owner's triggers), and never DELETE,
  TRUNCATE, ALTER or DROP: it owns no table, so it cannot disable or drop a trigger either.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

APPEND_ONLY = ("audit_log", "approvals")
# observations, void requests and spec_versions are only ever inserted: UPDATE on them would let any process
# rewrite a pilot's evidence or the spec its gate applies (they are in APPEND_ONLY's grant: SELECT, INSERT)
INSERT_ONLY = ("spec_versions", "observations", "void_requests")
UPDATABLE = (
    "use_cases",
    "model_versions",
    "calibration_runs",
    "evaluation_runs",
    "pilots",
    "pilot_steps",
    "observation_batches",  # guarded: its MLflow run id, once (migration 0010)
    "gate_decisions",  # guarded: gate_decisions_guard
    "alias_history",  # guarded: alias_history_guard
    "use_case_leases",  # released by clearing the holder, never deleted
)


def _ident(conn: Connection, name: str) -> str:
    return conn.execute(text("SELECT quote_ident(:n)"), {"n": name}).scalar_one()


def grant_app_role(conn: Connection, role: str) -> list[str]:
    """Give ``role`` exactly the app's privileges on the current database (idempotent: everything is
    revoked first). Run as the owner role. Returns the statements executed."""
    r = _ident(conn, role)
    tables = ", ".join((*APPEND_ONLY, *INSERT_ONLY, *UPDATABLE))
    statements = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {r}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {r}",
        f"GRANT USAGE ON SCHEMA public TO {r}",
        f"GRANT SELECT ON alembic_version TO {r}",
        f"GRANT SELECT, INSERT ON {tables} TO {r}",
        f"GRANT UPDATE ON {', '.join(UPDATABLE)} TO {r}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {r}",
    ]
    for s in statements:
        conn.execute(text(s))
    return statements


def may_migrate(conn: Connection) -> bool:
    """Whether the connection's user may run the migrations itself: a superuser, the owner of the tables
    (``audit_log``: one role for every process), or, before the first init, the owner of the database.
    The app role of two is none of these (docs/operations.md, "Database roles")."""
    return bool(
        conn.execute(
            text(
                "SELECT r.rolsuper OR EXISTS (SELECT 1 FROM pg_tables t WHERE t.schemaname = 'public' "
                "AND t.tablename = 'audit_log' AND t.tableowner = current_user) OR EXISTS (SELECT 1 "
                "FROM pg_database d WHERE d.datname = current_database() AND d.datdba = r.oid) "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
        ).scalar_one()
    )


def may_disable_triggers(conn: Connection) -> bool:
    """Whether the connection's user could switch the append-only triggers off: it owns ``audit_log``
    (one role for every process: the app connects as the owner) or is a superuser. The app role of
    two never can (docs/operations.md, "Database roles")."""
    return bool(
        conn.execute(
            text(
                "SELECT r.rolsuper OR EXISTS (SELECT 1 FROM pg_tables t WHERE t.schemaname = 'public' "
                "AND t.tablename = 'audit_log' AND t.tableowner = current_user) "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
        ).scalar_one()
    )
