"""Review s46 A12: with a password in MLFLOW_TRACKING_URI and MLflow down when a calibration logs its run,
MLflow's error text (the request URL, password included) was stored in the run's `error`, in the
append-only `calibration.failed` audit row (the anonymous Audit page) and in the flows' warnings. The
failure is real: a closed port on loopback, the real MLflow client, the real flow."""

from __future__ import annotations

import logging
import socket

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
    assert PASSWORD in str(raised.value)  # MLflow's own text carries it: the failure is the real one
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
