"""The multi-service path of docker-compose.yml, run natively on loopback (Docker has no engine here):
PostgreSQL + `sparsepilot init` + MLflow server + Prefect server + stack setup + a process worker, all
from the scripts the containers run (tests/fixtures/stack.py). One sample use case on a tiny local
model goes calibrate -> evaluate -> pilot -> gate through the worker; then a worker is killed in the
middle of a flow run, and the run is marked Crashed with no duplicate rows and no alias moved, and a
re-run on a fresh worker completes it.

Marked `stack` (and `postgres`): `.ci/run` runs it; `pytest -m stack tests/stack` runs it alone.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from rollout.db.roles import INSERT_ONLY, UPDATABLE
from tests.fixtures.stack import NativeStack

pytestmark = [pytest.mark.stack, pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
USE_CASE = "stack-chat"
CYCLE = f"use-case-cycle/sparsepilot-{USE_CASE}"
# Every table the pipeline writes except the audit log (rollout.db.roles names them all)
STATE_TABLES = (*UPDATABLE, *INSERT_ONLY, "approvals")


def _rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def counts(url: str) -> dict[str, int]:
    return {t: _rows(url, f"SELECT count(*) FROM {t}")[0][0] for t in STATE_TABLES}


def duplicates(url: str) -> dict[str, int]:
    """Rows that repeat a natural key (what a retried or re-run task must never add)."""
    checks = {
        "observations": "SELECT count(*) FROM (SELECT pilot_step_id, request_id, arm FROM observations "
        "GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
        "model_versions": "SELECT count(*) FROM (SELECT use_case_id, plan_hash FROM model_versions "
        "GROUP BY 1, 2 HAVING count(*) > 1) d",
        "calibration_runs": "SELECT count(*) FROM (SELECT use_case_id, spec_version FROM calibration_runs "
        "WHERE status = 'succeeded' GROUP BY 1, 2 HAVING count(*) > 1) d",
        "gate_decisions": "SELECT count(*) FROM (SELECT pilot_step_id, look_index, kind FROM gate_decisions "
        "GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
        "alias_history": "SELECT count(*) FROM (SELECT alias, to_version FROM alias_history "
        "WHERE status = 'committed' GROUP BY 1, 2 HAVING count(*) > 1) d",
    }
    return {k: _rows(url, sql)[0][0] for k, sql in checks.items()}


QUESTIONS = [
    ("abs", "the absolute value of a number"),
    ("len", "the number of items in a container"),
    ("max", "the largest item"),
    ("min", "the smallest item"),
    ("sum", "the total of the items"),
    ("sorted", "a new sorted list"),
    ("round", "a number rounded to some digits"),
    ("repr", "a printable representation of an object"),
    ("iter", "an iterator object"),
    ("next", "the next item from an iterator"),
    ("zip", "tuples of items from several iterables"),
    ("enumerate", "pairs of a count and an item"),
]


@pytest.fixture(scope="module")
def use_case_spec(native_stack: NativeStack) -> Path:
    """The support-chat sample pointed at a tiny local HF model, with short prompts so the whole cycle
    stays small (the stack, not the model, is under test here)."""
    from sparse_core.testing import make_tiny_model_dir

    d = native_stack.root / "usecase"
    d.mkdir()
    model_dir = make_tiny_model_dir(d / "tiny-model", max_positions=256)
    spec = yaml.safe_load((REPO / "examples" / "usecases" / "support-chat.yaml").read_text())
    spec["name"] = USE_CASE
    spec["model"] = str(model_dir)
    spec["dataset"]["path"] = "data.jsonl"
    spec["traffic"]["prompt_tokens"] = {"p50": 40, "p90": 60, "p99": 80}
    spec["traffic"]["output_tokens"] = {"p50": 4, "p90": 8}
    spec["quality_budget"]["calibration"] = {"max_texts": 4, "max_seq_len": 256, "holdout_fraction": 0.25}
    spec["rollout"] = {
        "shadow": {"min_samples": 8},
        "steps": [{"traffic_pct": 10, "min_samples": 8}, {"traffic_pct": 50, "min_samples": 8}],
        "batch_size": 8,
    }
    rows = [
        {
            "id": f"q{i}-{name}",
            "prompt": f"Customer ({i}): which Python built-in gives {what}?\nAgent: The built-in you need is",
            "reference": name,
        }
        for i in range(2)
        for name, what in QUESTIONS
    ]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = d / "usecase.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def deployed(native_stack: NativeStack, use_case_spec: Path) -> str:
    """The use case added with the CLI and the stack set up (deploy-flows): returns the setup's output."""
    from rollout.auth import hash_password

    operator = {
        "SPARSEPILOT_ACCOUNTS": f"ops:operator:{hash_password('ops-password')}",
        "SPARSEPILOT_USER": "ops",
    }
    native_stack.sparsepilot("usecase", "add", str(use_case_spec), "--password-stdin", extra_env=operator,
                             stdin="ops-password\n")  # fmt: skip
    return native_stack.run_setup().stdout


def _flow_run(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _wait_state(flow_run_id: Any, done: Any, timeout_s: float, what: str, stack: NativeStack) -> Any:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        fr = _flow_run(flow_run_id)
        if done(fr.state):
            return fr
        time.sleep(1)
    logs = "\n".join(f"--- {n}\n{s.log_tail(2500)}" for n, s in stack.services.items() if "worker" in n)
    raise AssertionError(f"flow run {flow_run_id} not {what} after {timeout_s:.0f} s: {fr.state!r}\n{logs}")


def test_services_healthy_state_db_migrated_and_mlflow_on_postgres(native_stack: NativeStack) -> None:
    from alembic.script import ScriptDirectory

    from rollout.db import migrate

    head = ScriptDirectory.from_config(migrate.alembic_config(native_stack.state_db_url)).get_current_head()
    assert migrate.current_revision(native_stack.state_db_url) == head
    # the init script made one role per database, each owning only its own
    admin = native_stack.pg.url("postgres")
    owners = dict(
        _rows(
            admin,
            "SELECT d.datname, r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
            "WHERE d.datname IN ('sparsepilot', 'mlflow', 'prefect')",
        )
    )
    assert owners == {"sparsepilot": "sparsepilot", "mlflow": "mlflow", "prefect": "prefect"}
    # the roles log in with the passwords from the environment, and only with them
    wrong = native_stack.state_db_url.replace(native_stack.passwords["sparsepilot_app"], "wrong-password")
    with pytest.raises(OperationalError, match="password authentication failed"):
        _rows(wrong, "SELECT 1")
    # Prefect keeps its state in PostgreSQL (its tables are in the prefect database) and its API wants
    # the login; the health probe stays open
    assert _rows(admin.rsplit("/", 1)[0] + "/prefect", "SELECT count(*) FROM work_pool")[0][0] >= 0
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{native_stack.prefect_api_url}/admin/version", timeout=10)
    assert refused.value.code == 401
    login = urllib.request.Request(
        f"{native_stack.prefect_api_url}/admin/version",
        headers={"Authorization": "Basic " + base64.b64encode(native_stack.prefect_auth.encode()).decode()},
    )
    with urllib.request.urlopen(login, timeout=10) as resp:
        assert resp.status == 200

    # MLflow wants its login too (an alias move is a promotion: nobody else may make one)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{native_stack.mlflow_url}/api/2.0/mlflow/experiments/search", timeout=10)
    assert refused.value.code == 401

    # a run logged through the server lands in PostgreSQL, its artifact in the served artifact store
    import mlflow

    from rollout import tracking

    assert tracking.configure() == native_stack.mlflow_url
    client = mlflow.MlflowClient(native_stack.mlflow_url)
    exp_id = tracking.experiment_for("stack-smoke")
    run = client.create_run(exp_id, run_name="smoke")
    client.log_metric(run.info.run_id, "stack_ok", 1.0)
    note = native_stack.root / "note.json"
    note.write_text('{"ok": true}')
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    mlflow_db = admin.rsplit("/", 1)[0] + "/mlflow"
    assert _rows(
        mlflow_db, "SELECT value FROM metrics WHERE run_uuid = :r AND key = 'stack_ok'", r=run.info.run_id
    )
    stored = list((native_stack.root / "mlartifacts").rglob("note.json"))
    assert len(stored) == 1 and run.info.run_id in str(stored[0])


def test_dashboard_serves_on_the_stack(native_stack: NativeStack) -> None:
    from rollout.auth import hash_password

    svc, _base = native_stack.start_dashboard(f"ann:approver:{hash_password('pw-for-test')}")
    assert svc.alive()
    assert "1 local account(s), approvers: ann" in " ".join(svc.log_tail().split())
    svc.stop()
    assert not svc.alive()


def test_stack_setup_creates_pools_detector_and_deployments(native_stack: NativeStack, deployed: str) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from rollout.settings import state_db_id

    out = deployed
    again = native_stack.run_setup().stdout  # the one-shot may run on every `up`: idempotent
    bad = native_stack.run_setup(check=False, SPARSEPILOT_GPU_USE_CASES=f"{USE_CASE},no-such-case")
    assert bad.returncode != 0 and "SPARSEPILOT_GPU_USE_CASES names no-such-case" in bad.stderr, bad
    assert "crashed-run detector (60 s): created" in out, out
    assert "crashed-run detector (60 s): exists" in again, again
    with get_client(sync_client=True) as client:
        pools = {p.name: p.type for p in client.read_work_pools()}
        assert pools[native_stack.pool] == "process" and pools[native_stack.gpu_pool] == "process"
        dep = client.read_deployment_by_name(CYCLE)
        assert (dep.work_pool_name, dep.work_queue_name) == (native_stack.pool, "default")
        # the stack's state DB's own approval deployment (one per state DB on a shared server)
        approval = client.read_deployment_by_name(
            f"approval/sparsepilot-approval-{state_db_id(native_stack.state_db_url)}"
        )
        assert (approval.work_pool_name, approval.work_queue_name) == (native_stack.pool, "approvals")
        assert dep.parameters == {"use_case": USE_CASE}
        assert [s.schedule.cron for s in dep.schedules] == ["15 4 * * *"]
    detector = Automation.read(name="sparsepilot: crash flow runs whose heartbeats stopped")
    assert detector.trigger.within.total_seconds() == 60


def _mlflow_aliases(client: Any, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).aliases)
    except MlflowException:  # not registered yet
        return {}


def _wait_rows(url: str, sql: str, timeout_s: float, stack: NativeStack, **params: Any) -> list[Any]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        rows = _rows(url, sql, **params)
        if rows:
            return rows
        time.sleep(0.25)
    logs = "\n".join(f"--- {n}\n{s.log_tail(2500)}" for n, s in stack.services.items() if "worker" in n)
    raise AssertionError(f"no rows for {sql!r} after {timeout_s:.0f} s\n{logs}")


def test_worker_killed_mid_run_then_pipeline_completes_on_a_fresh_worker(
    native_stack: NativeStack, deployed: str
) -> None:
    """The cycle's calibration (which ends by moving the `challenger` alias) loses its worker half-way:
    the run is marked Crashed by the heartbeat detector, nothing is duplicated and no alias moved. A fresh
    worker then runs the whole cycle, calibrate -> evaluate -> pilot -> gate, reusing the half-done row."""
    import mlflow
    import psutil
    from prefect.deployments import run_deployment

    url = native_stack.state_db_url
    client = mlflow.MlflowClient(native_stack.mlflow_url)
    model_name = f"sparsepilot-{USE_CASE}"
    worker = native_stack.start_worker("worker-1")

    # --- 1. the worker dies while the plan is being calibrated ------------------------------------
    fr = run_deployment(CYCLE, timeout=0)
    _wait_rows(url, "SELECT id FROM calibration_runs WHERE status = 'running'", 240, native_stack)
    flow_procs = psutil.Process(worker.pid).children(recursive=True)
    assert flow_procs, "the worker has no flow-run subprocess"
    t_kill = time.monotonic()
    worker.kill_hard()
    for proc in flow_procs:  # the flow-run subprocess runs in its own session: it goes too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    native_stack.start_worker("worker-2")  # the replacement comes up while the detector waits
    crashed = _wait_state(
        fr.id, lambda s: not s.is_running(), native_stack.crash_after_s + 90, "marked crashed", native_stack
    )
    native_stack.timings["crash_detected_after_kill"] = round(time.monotonic() - t_kill, 1)
    assert crashed.state.is_crashed(), crashed.state
    assert "heartbeat" in (crashed.state.message or ""), crashed.state.message
    after_crash = counts(url)
    assert after_crash["calibration_runs"] == 1, after_crash
    assert _rows(url, "SELECT status FROM calibration_runs")[0][0] == "running"  # visibly unfinished
    assert after_crash["model_versions"] == 0 and after_crash["alias_history"] == 0, after_crash
    assert _mlflow_aliases(client, model_name) == {}
    assert duplicates(url) == dict.fromkeys(duplicates(url), 0)

    # --- 2. the fresh worker runs the whole cycle: calibrate -> evaluate -> pilot -> gate ------------
    t = time.monotonic()
    # the tiny plan on a CPU saves nothing: the cycle would say "not piloted" (review s46 D13), so this
    # run overrides it, as an operator may for a deployment
    fr2 = run_deployment(CYCLE, parameters={"pilot_anyway": True}, timeout=0)
    fr2 = _wait_state(fr2.id, lambda s: s.is_final(), 300, "finished", native_stack)
    native_stack.timings["cycle"] = round(time.monotonic() - t, 1)
    assert fr2.state.is_completed(), fr2.state
    final = counts(url)
    assert final["calibration_runs"] == 1, final  # the half-done row was reused, not duplicated
    assert _rows(url, "SELECT status FROM calibration_runs")[0][0] == "succeeded"
    for table in ("evaluation_runs", "pilots", "pilot_steps", "observations", "gate_decisions"):
        assert final[table] >= 1, (table, final)
    assert duplicates(url) == dict.fromkeys(duplicates(url), 0)
    (phase,) = _rows(url, "SELECT phase FROM use_cases WHERE name = :n", n=USE_CASE)[0]
    assert phase in ("piloting", "awaiting_approval", "stopped"), phase

    # the model versions (the plan's, and the dense baseline registered once), the challenger alias and
    # the metrics are in the MLflow server
    for name, version in _rows(url, "SELECT mlflow_model_name, mlflow_version FROM model_versions"):
        assert name == model_name and client.get_model_version(name, version).status == "READY"
    (mlflow_version, calib_run) = _rows(
        url,
        "SELECT mv.mlflow_version, mv.mlflow_run_id FROM model_versions mv "
        "JOIN calibration_runs c ON c.model_version_id = mv.id",
    )[0]
    assert _mlflow_aliases(client, model_name) == {"challenger": mlflow_version}
    moves = _rows(url, "SELECT alias, to_version, status FROM alias_history ORDER BY id")
    assert moves == [("challenger", mlflow_version, "committed")]
    (eval_run,) = _rows(url, "SELECT mlflow_run_id FROM evaluation_runs WHERE status = 'succeeded'")[0]
    for run_id in (calib_run, eval_run):
        metrics = client.get_run(run_id).data.metrics
        assert metrics and all(v == v for v in metrics.values()), (run_id, metrics)
    assert client.get_run(eval_run).info.artifact_uri.startswith("mlflow-artifacts:")
    print("stack timings (s):", json.dumps(native_stack.timings))
