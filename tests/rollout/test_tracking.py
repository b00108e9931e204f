"""Tracking helpers against a real MLflow SQLite store."""

from __future__ import annotations

import math
import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from rollout import tracking
from rollout.settings import Settings, get_settings


def test_run_is_tagged_and_logged_under_home(mlflow_home: Settings) -> None:
    assert tracking.configure() == f"sqlite:///{mlflow_home.home / 'mlflow.db'}"
    assert tracking.configure().startswith("sqlite:////")  # absolute path: four slashes
    with tracking.start_run("support-chat", run_name="evaluate", tags={"flow_run_id": "abc"}) as run:
        tracking.log_metrics({"speedup": 1.8, "density": 0.25}, step=1)
        tracking.log_params({"plan": {"tau": 0.9, "estimator": "pooled"}})
        tracking.log_json({"rows": [1, 2]}, "report.json")
    r = MlflowClient().get_run(run.info.run_id)
    assert r.data.tags[tracking.TAG_USE_CASE] == "support-chat" and r.data.tags["flow_run_id"] == "abc"
    assert r.data.metrics == {"speedup": 1.8, "density": 0.25}
    assert r.data.params == {"plan.tau": "0.9", "plan.estimator": "pooled"}
    assert r.info.artifact_uri.startswith((mlflow_home.mlflow_artifact_root / "support-chat").as_uri())
    assert (
        mlflow_home.mlflow_artifact_root / "support-chat" / run.info.run_id / "artifacts" / "report.json"
    ).is_file()
    assert r.info.status == "FINISHED"


def test_bad_metric_is_refused_by_name_and_nothing_is_logged(mlflow_home: Settings) -> None:
    with tracking.start_run("support-chat") as run:
        for bad in (math.nan, math.inf, -math.inf, "0.5", None, True):
            with pytest.raises(tracking.MetricError, match="metric 'quality_delta'"):
                tracking.log_metrics({"speedup": 1.5, "quality_delta": bad})
    assert MlflowClient().get_run(run.info.run_id).data.metrics == {}


def test_nan_in_a_json_artifact_is_refused(mlflow_home: Settings) -> None:
    with tracking.start_run("support-chat"):
        with pytest.raises(tracking.MetricError, match="report.json"):
            tracking.log_json({"x": math.nan}, "report.json")


def test_failed_body_marks_the_run_failed(mlflow_home: Settings) -> None:
    with pytest.raises(RuntimeError):
        with tracking.start_run("support-chat") as run:
            raise RuntimeError("calibration crashed")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_mlflow_tracking_uri_from_the_environment_wins(
    mlflow_home: Settings, mlflow_template_db, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    other = tmp_path / "elsewhere.db"
    shutil.copyfile(mlflow_template_db, other)  # a migrated store, as a server would have
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.configure() == f"sqlite:///{other}"
    exp_id = tracking.experiment_for("docs-qa")
    assert other.is_file() and mlflow.get_tracking_uri() == f"sqlite:///{other}"
    assert MlflowClient().get_experiment(exp_id).name == "sparsepilot/docs-qa"
    # A tracking server decides where artifacts go; a local store gets an explicit location under home.
    assert not tracking.is_local_store("http://mlflow:5000") and tracking.is_local_store(
        get_settings().mlflow_tracking_uri
    )


def test_bad_use_case_name() -> None:
    with pytest.raises(ValueError, match="use case name"):
        tracking.experiment_for("../etc")
