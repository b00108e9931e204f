"""The embedded MLflow store is made before any flow needs it (review s46 R1): `sparsepilot init` creates
it at MLflow's head; a store a killed first creation left half-migrated is rebuilt by the calibrate
flow's preflight when it holds nothing (and the calibration proceeds), and refused by `calibrate` with
`error:` and exit 2 before any calibration when it holds runs. Real processes, state DB, MLflow, Prefect."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import sqlalchemy
import yaml

from tests.fixtures.env import fresh_cli_env
from tests.fixtures.flows import QUICK_CAL, tiny_spec
from tests.fixtures.trust import sparsepilot_as


def _revision_and_leftovers(db: Path) -> tuple[str | None, list[str]]:
    from mlflow.store.db.utils import _get_schema_version

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        tables = sqlalchemy.inspect(engine).get_table_names()
        return _get_schema_version(engine), [t for t in tables if t.startswith("_alembic_tmp_")]
    finally:
        engine.dispose()


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def test_init_creates_the_mlflow_store_at_mlflows_head(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = fresh_cli_env(home, COLUMNS="300")
    proc = subprocess.run(
        [sys.executable, "-m", "sparsepilot", "init", "--json"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    db = home / "mlflow.db"
    assert db.is_file(), proc.stderr
    assert _revision_and_leftovers(db) == (_head(), [])
    payload = json.loads(proc.stdout)
    assert (payload["mlflow_store"], payload["mlflow_revision"]) == ("created", _head())
    rc, out = sparsepilot_as(["init"], env)
    assert rc == 0 and f"mlflow.db: up to date (revision {_head()})" in out, out


def test_calibrate_refuses_a_half_migrated_store_with_runs_before_calibrating(
    tiny_model_dir: Path, trust_accounts: str, half_migrated_templates, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = fresh_cli_env(home, trust_accounts, COLUMNS="300")
    rc, out = sparsepilot_as(["init"], env)
    assert rc == 0, out
    spec = tmp_path / "tiny-chat.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "tiny-chat")))
    rc, out = sparsepilot_as(["usecase", "add", str(spec)], env, "olga")
    assert rc == 0, out
    db = home / "mlflow.db"
    shutil.copyfile(half_migrated_templates[2], db)

    rc, out = sparsepilot_as(["calibrate", "tiny-chat", "--quick"], env)
    assert rc == 2, out
    assert f"error: the MLflow store at {db} is half-migrated (" in out, out
    assert "move it away and rerun" in out and "Traceback" not in out, out
    with sqlite3.connect(home / "state.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM calibration_runs").fetchone()[0] == 0
    assert _revision_and_leftovers(db) == ("4465047574b1", ["_alembic_tmp_tags"])


def test_a_calibrate_repairs_a_half_migrated_store_that_holds_nothing_and_proceeds(
    flow_use_case, half_migrated_templates
) -> None:
    from flows.calibrate import calibrate_flow
    from rollout.settings import get_settings

    name = flow_use_case()
    db = get_settings().home / "mlflow.db"
    shutil.copyfile(half_migrated_templates[0], db)

    cal = calibrate_flow(name, limits=QUICK_CAL)

    assert cal["reused"] is False and cal["model_version_id"], cal
    assert _revision_and_leftovers(db) == (_head(), [])
