"""Review s46 A12: with a password in MLFLOW_TRACKING_URI and MLflow down when a calibration logs its run,
MLflow's error text (the request URL, password included) was stored in the run's `error`, in the
append-only `calibration.failed` audit row (the anonymous Audit page) and in the flows' warnings. The
failure is real: a closed port on loopback, the real MLflow client, the real flow.

Review s46 A12, what remained: Prefect's engine logged the flow's exception as raised, password included
(its traceback and "Finished in state Failed('... http://ops:S3cretMlflowPw@...')"), to the console, the
command's log file and, through its API log handler, the Prefect server (the UI), whose flow run kept the
same text as its state message."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.flows import QUICK_CAL

PASSWORD = "S3cretMlflowPw"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_down_with_a_password_in_its_url_stores_and_logs_no_password(
    flow_use_case,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sqlalchemy import select

    from flows.calibrate import calibrate_flow
    from flows.common import mark_not_recorded
    from rollout import queries
    from rollout.db.models import CalibrationRun
    from rollout.db.session import session_scope

    name = flow_use_case()
    url = f"http://ops:{PASSWORD}@127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.INFO)
    with pytest.raises(Exception, match="API request to") as raised:
        calibrate_flow(name, limits=QUICK_CAL)
    # MLflow's own text carried it (the failure is the real one): the flow raised it again redacted, of
    # the same type, with MLflow's as its cause
    assert PASSWORD in str(raised.value.__cause__) and PASSWORD not in str(raised.value)
    assert type(raised.value) is type(raised.value.__cause__)
    mark_not_recorded("0123456789abcdef", raised.value)  # a run to tag: MLflow down again

    with session_scope() as s:
        run = s.scalars(select(CalibrationRun)).one()
        shown = repr(queries.audit_entries(s))
        error = run.error
    assert run.status == "failed" and "API request to http://ops:***@127.0.0.1" in error
    assert "calibration.failed" in shown and "http://ops:***@" in shown
    # SparsePilot's own log lines (Prefect's engine logs the flow's exception as it was raised: not ours)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sparsepilot"))
    assert "could not tag MLflow run 0123456789abcdef: API request to http://ops:***@" in logged
    assert PASSWORD not in error
    assert PASSWORD not in shown
    assert PASSWORD not in logged


def test_a_flow_command_with_mlflow_down_shows_prefect_no_password(
    flow_use_case,  # noqa: ANN001
    prefect_harness: str,
) -> None:
    """`sparsepilot calibrate NAME` in a real process, MLflow down with a password in its URL: the
    password is on neither the console nor the command's log file, nor in what the Prefect server keeps
    of the flow run (its logs, the UI's; its state message and its task runs'), nor in the exception it
    stored as the flow's result. The MLflow error is still told, redacted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from sqlalchemy import select

    from rollout.db.models import CalibrationRun
    from rollout.db.session import session_scope

    name = flow_use_case()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://ops:{PASSWORD}@127.0.0.1:{_closed_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "PREFECT_API_URL": prefect_harness,
        "COLUMNS": "160",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sparsepilot", "calibrate", name, "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0, console
    assert "API request to http://ops:***@127.0.0.1" in console, console  # the failure, told
    assert PASSWORD not in console, console
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", console).group(1)).read_text()
    assert "Encountered exception during execution" in log and "Traceback" in log, log
    assert "http://ops:***@127.0.0.1" in log and PASSWORD not in log, log

    with session_scope() as s:
        flow_run_id = uuid.UUID(s.scalars(select(CalibrationRun.flow_run_id)).one())
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert run.state.is_failed() and "API request to http://ops:***@127.0.0.1" in run.state.message
    assert PASSWORD not in run.state.message
    assert tasks and all(PASSWORD not in (t.state.message or "") for t in tasks)
    stored = "\n".join(entry.message for entry in logs)
    assert "Encountered exception during execution" in stored and "http://ops:***@" in stored, stored
    assert PASSWORD not in stored
    # the flow's result, the exception Prefect pickled, without its cause (pickling keeps none)
    result = run.state.result(raise_on_failure=False)
    assert isinstance(result, Exception) and PASSWORD not in repr(result) and result.__cause__ is None
