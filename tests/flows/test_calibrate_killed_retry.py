"""A calibrate whose process died after it logged to MLflow (review W1), on a real state DB, MLflow
store and Prefect API: its retry reuses the calibrate run the first attempt logged (the model version
that attempt registered points at it) instead of logging a second one, and ends the `register` run the
dead attempt left RUNNING, tagged so nobody mistakes it for a result."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.flows import QUICK_CAL


class Killed(BaseException):
    """The process dies here (SIGKILL, OOM): no `except Exception` runs."""


def _runs(name: str) -> list[Any]:
    from rollout import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.experiment_name(name))
    return c.search_runs([exp.experiment_id], "", max_results=100)


def test_a_calibrate_killed_after_its_mlflow_log_is_not_logged_twice(flow_use_case, monkeypatch) -> None:
    import mlflow

    from flows.calibrate import calibrate_flow
    from rollout import tracking
    from rollout.db.models import CalibrationRun, ModelVersion
    from rollout.db.session import session_scope

    name = flow_use_case()
    real = mlflow.pyfunc.log_model
    died_in: list[str] = []

    def die_in_the_baselines_log(*args: Any, **kwargs: Any) -> Any:
        active = mlflow.active_run()
        if active is not None and active.info.run_name == "register":  # the dense baseline's own run
            died_in.append(active.info.run_id)
            raise Killed
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(mlflow.pyfunc, "log_model", die_in_the_baselines_log)
        with pytest.raises(Killed):
            calibrate_flow(name, limits=QUICK_CAL)
    # a SIGKILL ends no run: MLflow's context manager marked it FAILED on the way out, undo that
    tracking.client().update_run(died_in[0], status="RUNNING")

    cal = calibrate_flow(name, limits=QUICK_CAL)

    runs = _runs(name)
    calibrates = [r for r in runs if r.info.run_name == "calibrate"]
    assert len(calibrates) == 1, [(r.info.run_id, r.info.status) for r in calibrates]
    [stale] = [r for r in runs if r.info.run_id == died_in[0]]
    assert stale.info.status == "KILLED"
    assert "sparsepilot.not_recorded" in stale.data.tags
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    with session_scope() as s:
        row = s.get(CalibrationRun, cal["calibration_run_id"])
        mv = s.get(ModelVersion, cal["model_version_id"])
        assert row.mlflow_run_id == mv.mlflow_run_id == calibrates[0].info.run_id
    recorded = {r.info.run_id for r in runs if "sparsepilot.not_recorded" not in r.data.tags}
    assert calibrates[0].info.run_id in recorded
