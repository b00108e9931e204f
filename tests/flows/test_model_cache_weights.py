"""Review T6: the per-process model cache (flows.common.get_model) kept a model by its path, so weights
changed on disk under a long-running process (a fine-tune updated in place, the main job or a runner
still up) were calibrated under the new weights' key with the old weights, the plan stamped with the old
fingerprint. The cache now loads again when the fingerprint of the weights at the path changed."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from tests.fixtures.flows import QUICK_CAL, use_case_factory


def _plan_fingerprints(name: str) -> list[str]:
    from rollout.db.models import ModelVersion, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        versions = s.scalars(
            select(ModelVersion).where(ModelVersion.use_case_id == uc.id).order_by(ModelVersion.id)
        ).all()
        return [v.plan["metadata"].get("model_fingerprint") for v in versions if v.plan["metadata"]]


def test_weights_changed_in_place_are_calibrated_as_themselves(
    mlflow_home, prefect_harness, pilot_dataset: Path, tmp_path: Path
) -> None:
    from flows.calibrate import calibrate_flow
    from flows.common import _MODELS, get_model
    from sparse_core.fingerprint import weights_fingerprint
    from sparse_core.testing import make_tiny_model_dir

    a = make_tiny_model_dir(tmp_path / "a", seed=0, layers=2, max_positions=2048)
    b = make_tiny_model_dir(tmp_path / "b", seed=1, layers=2, max_positions=2048)
    name = use_case_factory(a, pilot_dataset, tmp_path)("in-place")
    try:
        first, _ = get_model(str(a))
        old = first.config.weights_fingerprint
        assert get_model(str(a))[0] is first  # cached while the weights stay
        calibrate_flow(name, limits=QUICK_CAL)

        shutil.copy(b / "model.safetensors", a / "model.safetensors")  # a fine-tune updated in place
        new = weights_fingerprint(a)
        assert new != old and new == weights_fingerprint(b)
        again, _ = get_model(str(a))
        assert again is not first and again.config.weights_fingerprint == new
        calibrate_flow(name, limits=QUICK_CAL)  # a new key (the weights are in it): calibrated again

        stamped = [fp for fp in _plan_fingerprints(name) if fp]
        assert stamped[0] == old and stamped[-1] == new  # the new plan on the new weights, not the old
    finally:
        _MODELS.pop(str(a), None)
