"""A spec's task bound (`quality_budget.task_delta`) through the real calibrate flow, on the tiny model: the
flow scores every row of the calibration split that has a reference (it scored 8 at most, and a valid
bound needs more: 0.3 at the tests' 2-step search needs 12 rows, so no spec could be certified), a
spec's `calibration.task_rows` caps them, and `usecase add` warns when the dataset's rows cannot certify
the bound, counting exactly the rows the flow then scores."""

from __future__ import annotations

from pathlib import Path

import yaml
from sqlalchemy import select

from tests.fixtures.flows import QUICK_CAL, tiny_spec


def _task_of_plan(name: str) -> dict:
    from rollout.db.models import ModelVersion, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        versions = s.scalars(select(ModelVersion).where(ModelVersion.use_case_id == uc.id)).all()
        (plan,) = [v.plan for v in versions if "task" in v.plan["metadata"]]  # not the dense baseline's
        return {**plan["metadata"]["task"], "dense_layers": len(plan["dense_layers"])}


def _spec_file(tmp_path: Path, model_dir: Path, dataset: Path, name: str, **calibration: object) -> Path:
    spec = tiny_spec(model_dir, name, dataset_file=dataset)
    spec["quality_budget"]["task_delta"] = 0.3
    spec["quality_budget"]["calibration"].update(calibration)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_flow_scores_every_calibration_row_and_certifies_the_bound(
    mlflow_home, prefect_harness, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    from flows.calibrate import calibrate_flow, task_rows_of
    from flows.common import load_context
    from rollout.task_budget import task_rows_at_most
    from rollout.usecases import add_usecase, check_spec_file
    from sparse_core.task_bound import rows_to_certify

    path = _spec_file(tmp_path, tiny_model_dir, pilot_dataset, "task-bound")
    checked = check_spec_file(path)
    assert not [w for w in checked.validation.warnings if w.startswith("quality_budget.task_delta")]
    add_usecase(path, actor="test-owner")
    result = calibrate_flow("task-bound", limits=QUICK_CAL)

    ctx = load_context("task-bound")
    hf, seed = ctx.spec.quality_budget.calibration.holdout_fraction, ctx.spec.quality_budget.calibration.seed
    scored = task_rows_of(ctx.split()[0], hf, seed)
    assert len(scored) == task_rows_at_most(ctx.spec, checked.validation.stats)  # what `usecase add` counted
    task = _task_of_plan("task-bound")
    need = rows_to_certify(0.3, alpha=0.05 / 2)  # QUICK_CAL's 2-step search
    assert task["n_rows"] == len(scored) > 8 and len(scored) >= need == 12
    assert task["certifiable"] is True and task["rows_needed"] == need
    assert result["met_budget"] and task["task_delta_upper"] < 0.3
    # the returned plan's check stopped once its bound was certified: about the rows a plan that loses
    # nothing needs, not all 243
    assert need <= task["rows_scored"] < 3 * need
    assert task["dense_layers"] < 2  # the tiny model's two layers: not the all-dense plan


def test_a_capped_task_bound_is_told_at_add_and_keeps_the_plan_dense(
    mlflow_home, prefect_harness, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    from flows.calibrate import calibrate_flow
    from rollout.usecases import add_usecase

    path = _spec_file(tmp_path, tiny_model_dir, pilot_dataset, "task-capped", task_rows=10)
    added = add_usecase(path, actor="test-owner")
    (warning,) = [w for w in added.validation["warnings"] if w.startswith("quality_budget.task_delta")]
    assert warning.startswith(
        "quality_budget.task_delta: 0.3 cannot be certified from this dataset: the calibrate flow scores at "
        "most 10 rows (calibration.task_rows caps them), and a valid bound of 0.3 needs 16 even when no row "
        "drops (its 7-step search tests each plan at 0.05 / 7): every plan will stay dense; raise "
        "calibration.task_rows to 16 or more, or raise task_delta to "
    )
    calibrate_flow("task-capped", limits=QUICK_CAL)
    task = _task_of_plan("task-capped")
    assert task["n_rows"] == 10 and task["certifiable"] is False and task["rows_needed"] == 12
    assert task["dense_layers"] == 2
