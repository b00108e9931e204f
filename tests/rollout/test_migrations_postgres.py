from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text

from rollout.db import migrate

pytestmark = pytest.mark.postgres


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_postgres(pg_url: str) -> None:
    migrate.upgrade(pg_url)
    assert {"use_cases", "spec_versions", "observations", "audit_log", "alias_history"} <= _tables(pg_url)
    head = migrate.current_revision(pg_url)
    migrate.downgrade(pg_url)
    assert _tables(pg_url) <= {"alembic_version"}
    migrate.upgrade(pg_url)
    assert migrate.current_revision(pg_url) == head
    assert "audit_log" in _tables(pg_url)


def test_audit_log_triggers_refuse_changes_on_postgres(pg_url: str) -> None:
    migrate.upgrade(pg_url)
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO audit_log (ts, actor, action, details) VALUES (now(), 'a', 'x', '{}')")
            )
        for stmt in ("UPDATE audit_log SET actor = 'b'", "DELETE FROM audit_log"):
            with pytest.raises(Exception, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(text(stmt))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT actor FROM audit_log")).scalars().all() == ["a"]
    finally:
        engine.dispose()


def test_models_match_the_migrations_on_postgres(pg_url: str) -> None:
    """Alembic is the only way the schema is made: the migrated schema must equal the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from rollout.db.models import Base

    migrate.upgrade(pg_url)
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
