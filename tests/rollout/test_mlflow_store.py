"""rollout.mlflow_store on real SQLite MLflow stores (review s46 R1): a fresh store is created at MLflow's
head, a store a killed first creation left half-migrated is rebuilt when it holds nothing and refused,
untouched, when it holds runs; MLflow's own client opens what `ensure_store` leaves."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import sqlalchemy


def _state(db: Path) -> tuple[str | None, list[str]]:
    from mlflow.store.db.utils import _get_schema_version

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        return _get_schema_version(engine), sorted(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def test_a_fresh_store_is_created_at_mlflows_head_and_then_left_as_it_is(sp_home) -> None:
    from rollout.mlflow_store import ensure_store

    db = sp_home.home / "mlflow.db"
    assert not db.exists()
    first = ensure_store()
    assert (first.action, first.revision) == ("created", _head())
    assert _state(db)[0] == _head()
    assert ensure_store().action == "ok"


def test_a_half_migrated_store_that_holds_nothing_is_rebuilt_and_mlflow_opens_it(
    sp_home, half_migrated_templates
) -> None:
    import mlflow

    from rollout import tracking
    from rollout.mlflow_store import ensure_store

    db = sp_home.home / "mlflow.db"
    shutil.copyfile(half_migrated_templates[0], db)
    done = ensure_store()
    assert done.action == "repaired" and done.before == "4465047574b1", done
    assert "_alembic_tmp_tags" in done.detail
    revision, tables = _state(db)
    assert revision == _head()
    assert not [t for t in tables if t.startswith("_alembic_tmp_")], tables
    with tracking.start_run("tiny-chat", run_name="calibrate"):
        mlflow.log_metric("density", 0.5)
    assert len(tracking.client().search_runs([tracking.experiment_for("tiny-chat")])) == 1


def test_a_half_migrated_store_that_holds_runs_is_refused_and_left_untouched(
    sp_home, half_migrated_templates
) -> None:
    from rollout.mlflow_store import StoreError, ensure_store

    db = sp_home.home / "mlflow.db"
    shutil.copyfile(half_migrated_templates[2], db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(StoreError) as err:
        ensure_store()
    msg = str(err.value)
    assert msg.startswith(f"the MLflow store at {db} is half-migrated ("), msg
    assert "_alembic_tmp_tags" in msg and "runs: 2 rows" in msg and "4465047574b1" in msg, msg
    assert msg.endswith("; move it away and rerun"), msg
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_tracking_server_is_left_to_migrate_its_own_store(sp_home, monkeypatch) -> None:
    from rollout.mlflow_store import ensure_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert ensure_store().action == "skipped"
    assert not (sp_home.home / "mlflow.db").exists()


def test_a_store_whose_rebuild_was_killed_midway_is_rebuilt_again(sp_home) -> None:
    from rollout.mlflow_store import ensure_store

    db = sp_home.home / "mlflow.db"
    ensure_store()
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # a rebuild killed after some of its drops
        conn.exec_driver_sql("DROP TABLE tags")
    engine.dispose()
    done = ensure_store()
    assert done.action == "repaired" and "tables missing" in done.detail, done
    assert _state(db)[0] == _head() and "tags" in _state(db)[1]


def test_a_half_migrated_store_whose_only_rows_are_in_a_leftover_copy_is_refused_and_left_untouched(
    sp_home,
) -> None:
    """Review s46 T3-3: a kill after Alembic's batch copy dropped a table and before it renamed
    `_alembic_tmp_<table>` leaves that table's rows only in the copy; `_look` did not count them, so a
    store holding a registered model there and nothing else was "repaired" and the model was dropped."""
    import mlflow

    from rollout import tracking
    from rollout.mlflow_store import StoreError, ensure_store

    db = sp_home.home / "mlflow.db"
    ensure_store()
    tracking.configure()
    mlflow.MlflowClient().create_registered_model("sparsepilot-keepme")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # the kill window: the original dropped, its copy not yet renamed
        conn.exec_driver_sql("ALTER TABLE registered_models RENAME TO _alembic_tmp_registered_models")
    engine.dispose()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(StoreError) as err:
        ensure_store()
    msg = str(err.value)
    assert msg.startswith(f"the MLflow store at {db} is half-migrated (leftover table "), msg
    assert "it holds _alembic_tmp_registered_models: 1 rows" in msg, msg
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
