from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text

from rollout.db import migrate
from tests.fixtures.postgres import SUPERUSER

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


def test_a_database_that_is_not_utf8_is_refused_before_migrating(pg_cluster) -> None:  # noqa: ANN001
    """A database made without ENCODING on a LANG=C cluster is SQL_ASCII: psycopg hands its text back as
    bytes and Alembic failed with "cannot use a string pattern on a bytes-like object". It is refused
    first, with the database's name and the fix, and nothing is created in it."""
    import psycopg

    name = f"ascii_{id(pg_cluster) % 10_000}"
    params = {"host": pg_cluster.host, "port": pg_cluster.port, "user": SUPERUSER, "autocommit": True}
    with psycopg.connect(dbname="postgres", **params) as conn:
        conn.execute(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    pg_cluster.databases.append(name)

    with pytest.raises(migrate.DatabaseEncodingError) as err:
        migrate.upgrade(pg_cluster.url(name))
    assert f"database '{name}' uses encoding SQL_ASCII; SparsePilot needs UTF8" in str(err.value)
    assert "ENCODING 'UTF8' TEMPLATE template0" in str(err.value)
    with psycopg.connect(dbname=name, client_encoding="utf8", **params) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
