"""MLflow set-up and logging helpers, one experiment per use case.

Defaults come from rollout.settings: a SQLite tracking store at SPARSEPILOT_HOME/mlflow.db (MLflow 3
refuses the plain file store) with artifacts under SPARSEPILOT_HOME/mlartifacts/<use case>, or a tracking
server when MLFLOW_TRACKING_URI says so (then the server decides where artifacts go). Metrics are checked
before logging: a NaN/inf metric is a bug upstream and must not land in the record silently.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rollout.settings import Settings, configure_environment, get_settings

if TYPE_CHECKING:
    import mlflow

EXPERIMENT_PREFIX = "sparsepilot"
TAG_USE_CASE = "sparsepilot.use_case"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class MetricError(ValueError):
    """A metric value that cannot be logged (NaN, inf, not a number); the message names the metric."""


def check_use_case_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise ValueError(
            f"use case name {name!r} must be 1-100 characters of letters, digits, '.', '_' or '-'"
        )
    return name


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def configure(settings: Settings | None = None) -> str:
    """Point MLflow (tracking and registry) at our store; returns the URI. Safe to call repeatedly."""
    import mlflow

    s = configure_environment(settings or get_settings())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = s.mlflow_tracking_uri
    if uri.startswith("sqlite:"):
        s.home.mkdir(parents=True, exist_ok=True)
    s.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client(settings: Settings | None = None) -> mlflow.MlflowClient:
    import mlflow

    uri = configure(settings)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_name(use_case: str) -> str:
    return f"{EXPERIMENT_PREFIX}/{check_use_case_name(use_case)}"


def experiment_for(use_case: str, settings: Settings | None = None) -> str:
    """The use case's experiment id, created on first use. On a local store the experiment gets an
    explicit artifact_location under SPARSEPILOT_HOME/mlartifacts so artifacts never land in the CWD."""
    from mlflow.exceptions import MlflowException

    name = experiment_name(use_case)
    s = settings or get_settings()
    c = client(s)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if is_local_store(s.mlflow_tracking_uri):
        location = (s.mlflow_artifact_root / use_case).resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags={TAG_USE_CASE: use_case})
    except MlflowException:  # created concurrently by another task: use theirs
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(use_case: str, flow: str, params: Mapping[str, Any]) -> str | None:
    """The id of a finished run that `flow` logged in the use case's experiment with these params, or
    None: what a rerun asks before it logs a row whose run id the state DB does not have (the log may
    have succeeded and its record failed). A run whose logging failed midway (FAILED) does not count."""
    c = client()
    exp = c.get_experiment_by_name(experiment_name(use_case))
    if exp is None:
        return None
    clauses = [f"tags.`sparsepilot.flow` = '{flow}'", "attributes.status = 'FINISHED'"]
    clauses += [f"params.`{k}` = '{v}'" for k, v in params.items()]
    found = c.search_runs([exp.experiment_id], " and ".join(clauses), max_results=1)
    return found[0].info.run_id if found else None


TAG_NOT_RECORDED = "sparsepilot.not_recorded"


def retire_runs(
    use_case: str, flow: str, *, tags: Mapping[str, Any], keep: str | None, why: str
) -> list[str]:
    """Tag `sparsepilot.not_recorded` (with `why`) every run that `flow` logged in the use case's
    experiment with these tags, except `keep`, and end one still RUNNING as KILLED: the runs of an
    attempt that died after it wrote to MLflow (SIGKILL, OOM: no `except` ran to tag or end them), which
    its retry replaced. Call it only under the use case's lease, so no live run is among them. `keep`
    (the run the state DB records) loses the tag if a failed attempt gave it one. Returns the run ids it
    retired; a run tagged before is left as it is."""
    c = client()
    exp = c.get_experiment_by_name(experiment_name(use_case))
    if exp is None:
        return []
    clauses = [f"tags.`sparsepilot.flow` = '{flow}'"]
    clauses += [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    out = []
    for run in c.search_runs([exp.experiment_id], " and ".join(clauses), max_results=1000):
        rid = run.info.run_id
        if rid == keep:  # recorded now: an earlier failed attempt's tag no longer holds
            if TAG_NOT_RECORDED in run.data.tags:
                c.delete_tag(rid, TAG_NOT_RECORDED)
            continue
        if TAG_NOT_RECORDED in run.data.tags:
            continue
        c.set_tag(rid, TAG_NOT_RECORDED, why[:5000])
        if run.info.status == "RUNNING":
            c.set_terminated(rid, "KILLED")
        out.append(rid)
    return out


@contextmanager
def start_run(
    use_case: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    nested: bool = False,
    settings: Settings | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with run_id) a run in the use case's experiment, tagged with the use case.
    A failing body marks the run FAILED (MLflow's own context manager behaviour)."""
    import mlflow

    exp_id = experiment_for(use_case, settings)
    all_tags = {TAG_USE_CASE: use_case, **{str(k): str(v) for k, v in (tags or {}).items()}}
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=None if run_id else run_name,
        nested=nested,
        tags=all_tags,
    ) as run:
        yield run


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite floats only; raises MetricError naming the first bad metric."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise MetricError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}")
        f = float(value)
        if not math.isfinite(f):
            raise MetricError(f"metric {key!r} is {f} (NaN/inf); refusing to log it")
        out[str(key)] = f
    return out


def log_metrics(
    metrics: Mapping[str, Any], *, step: int | None = None, run_id: str | None = None
) -> dict[str, float]:
    """Log to the active run (or run_id). Nothing is logged if any value is bad."""
    import mlflow

    clean = check_metrics(metrics)
    if run_id is None:
        mlflow.log_metrics(clean, step=step)
    else:
        c = mlflow.MlflowClient()
        for key, value in clean.items():
            c.log_metric(run_id, key, value, step=step or 0)
    return clean


def log_params(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys and log them as params (MLflow params are strings)."""
    import mlflow

    flat: dict[str, str] = {}

    def walk(obj: Mapping[str, Any], pre: str) -> None:
        for k, v in obj.items():
            key = f"{pre}{k}"
            if isinstance(v, Mapping):
                walk(v, f"{key}.")
            else:
                text = str(v)
                flat[key] = text if len(text) <= 6000 else text[:5997] + "..."

    walk(params, prefix)
    if flat:
        mlflow.log_params(flat)
    return flat


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact of the active run. NaN is refused (JSON has none)."""
    import json

    import mlflow

    try:
        json.dumps(obj, allow_nan=False)
    except ValueError as exc:
        raise MetricError(f"artifact {artifact_file!r} contains NaN/inf: {exc}") from None
    mlflow.log_dict(obj, artifact_file)
