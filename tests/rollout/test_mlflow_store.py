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


def _runs(db: Path) -> int:
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT COUNT(*) FROM runs").scalar_one()
    finally:
        engine.dispose()


@pytest.mark.parametrize("runs", [2, 0])
def test_an_upgrade_of_a_store_that_holds_runs_keeps_a_copy_of_it_from_before(
    sp_home, behind_templates, runs: int
) -> None:
    """A store an older MLflow made was upgraded in place by MLflow's migrations, which are
    not atomic: a failed or killed one could lose its runs and models. One that holds them is copied first
    (SQLite's backup API) to mlflow.db.pre-<revision>-<UTC time>.bak beside it, which `init` says once,
    its log file too, and keeps; one that holds nothing needs no copy. (fix-n: `init` set no logging up,
    so Python's last-resort handler also printed the log record on stderr, a second bare line naming the
    copy.)"""
    import logging
    import re

    from typer.testing import CliRunner

    from sparsepilot.cli import app

    template, behind = behind_templates[runs]
    db = sp_home.home / "mlflow.db"
    shutil.copyfile(template, db)
    root = logging.getLogger()
    kept = root.handlers[:]
    # as in a real `sparsepilot init`, no handler on the root logger: pytest's would take a record that
    # reaches the console there
    root.handlers.clear()
    try:
        res = CliRunner().invoke(app, ["init"])
    finally:
        root.handlers[:] = kept
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and f"upgraded from {behind}" in said, said
    assert _state(db)[0] == _head() and _runs(db) == runs
    copies = [p for p in db.parent.iterdir() if p.name.startswith("mlflow.db.")]
    if not runs:
        assert copies == [] and "its copy" not in said and "copied to" not in res.output, (copies, said)
        return
    [copy] = copies
    assert re.fullmatch(rf"mlflow\.db\.pre-{behind}-\d{{8}}T\d{{6}}Z\.bak", copy.name), copy
    assert (_state(copy)[0], _runs(copy)) == (behind, 2)
    assert f"its copy from before the upgrade: {copy} (kept; delete it once" in res.output, res.output
    assert res.output.count(copy.name) == 1, res.output
    [log_file] = (sp_home.home / "logs").glob("init-*.log")
    logged = log_file.read_text()
    assert f"at revision {behind}, behind MLflow's head {_head()}: copied to {copy} (kept)" in logged, logged


def test_an_upgrade_whose_copy_cannot_be_written_is_refused_and_leaves_the_store_untouched(
    sp_home, behind_templates
) -> None:
    """No room for the copy (a file-size limit under the store's size: the disk full for it): `init`
    says so, exit 2, nothing upgraded, no partial copy left."""
    import resource
    import signal

    from typer.testing import CliRunner

    from sparsepilot.cli import app

    template, behind = behind_templates[2]
    db = sp_home.home / "mlflow.db"
    shutil.copyfile(template, db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (db.stat().st_size // 2, limits[1]))
    try:
        res = CliRunner().invoke(app, ["init"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert f"error: the MLflow store at {db} holds runs or models and is at revision {behind}" in said, said
    assert "its copy before the upgrade could not be written to" in said and "nothing was upgraded" in said
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith("mlflow.db.")) == []
