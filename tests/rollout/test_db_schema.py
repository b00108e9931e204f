from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from rollout import audit
from rollout.db import migrate
from rollout.db.models import AppendOnlyError, AuditEntry
from rollout.db.session import get_engine, session_scope


def test_upgrade_downgrade_upgrade_sqlite(sp_home) -> None:
    url = sp_home.database_url
    assert "audit_log" in inspect(get_engine(url)).get_table_names()
    migrate.downgrade(url)
    assert "audit_log" not in inspect(get_engine(url)).get_table_names()
    migrate.upgrade(url)
    assert migrate.current_revision(url) is not None
    assert {"use_cases", "observations", "gate_decisions", "alias_history"} <= set(
        inspect(get_engine(url)).get_table_names()
    )


def test_audit_log_is_append_only(sp_home) -> None:
    with session_scope() as s:
        audit.record(s, "alice", "usecase.add", details={"x": 1})
    with pytest.raises(Exception, match="append-only"):
        with session_scope() as s:
            s.execute(text("DELETE FROM audit_log"))
    with pytest.raises(AppendOnlyError):
        with session_scope() as s:
            entry = s.query(AuditEntry).one()
            entry.action = "rewritten"
    with session_scope() as s:
        assert [e.action for e in s.query(AuditEntry)] == ["usecase.add"]


def test_two_upgrades_at_once_on_a_fresh_sqlite_file_take_turns(tmp_path) -> None:  # noqa: ANN001
    """Review s47: two `sparsepilot init`s at once on a fresh home both ran the first migration and the
    second failed ("duplicate column name: os_user"); now they take turns (`migrate.one_at_a_time`) and
    the second finds the first's work."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'state.db'}"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        found = pool.map(migrate.upgrade, [url, url])
    head = migrate.head_revision(url)
    assert sorted(found, key=str) == sorted([None, head], key=str)  # one made it, the other found it made
    assert migrate.current_revision(url) == head
