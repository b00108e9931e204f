"""The selection power (`sharpen`): the estimate raised to a power before selection, chosen per layer by
calibration. Older plans keep their dict and hash; a plan that carries a power round-trips and runs."""

from __future__ import annotations

import pytest
import torch

from sparse_core import sparsify, unsparsify
from sparse_core.calibration import (
    CalibrationLimits,
    Sensitivity,
    allocate_choice,
    calibrate_many,
    measure_sensitivities,
    sharpen_powers,
    variant_key,
    variant_of,
)
from sparse_core.corpus import pack_token_windows
from sparse_core.kernels import estimate_and_select
from sparse_core.plan import PlanError, SparsePlan, load_plan, save_plan
from sparse_core.selection import select_blocks, sharpen

LOOSE = "kl=1,agree=0.3"


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(1, 2, n, n, generator=g) ** 4
    return torch.tril(s)


def test_sharpen_keeps_each_rows_order_and_moves_only_how_many_blocks_a_row_takes():
    s = _rows(12)
    assert sharpen(s, 1.0) is s
    for p in (0.5, 1.4, 2.0):
        sp = sharpen(s, p)
        assert torch.equal(sp > 0, s > 0)
        # the same order in every row (ties aside), so the same blocks for the same count
        assert torch.equal(torch.argsort(sp, dim=-1, stable=True), torch.argsort(s, dim=-1, stable=True))
    base = select_blocks(s, block_size=64, seq_len=12 * 64, tau=0.9)
    sharp = select_blocks(sharpen(s, 2.0), block_size=64, seq_len=12 * 64, tau=0.9)
    flat = select_blocks(sharpen(s, 0.5), block_size=64, seq_len=12 * 64, tau=0.9)
    # at one tau a sharper estimate reaches its share with fewer blocks in every row, a flatter with more
    assert (sharp.kv_counts <= base.kv_counts).all() and (flat.kv_counts >= base.kv_counts).all()
    assert sharp.density < base.density < flat.density


def test_a_plan_without_a_power_keeps_its_dict_and_hash_and_one_with_it_round_trips(tmp_path):
    plan = SparsePlan(estimator="pooled", tau=0.9)
    assert "sharpen" not in plan.to_dict() and plan.layer_params(0).sharpen == 1.0
    before = plan.content_hash()
    assert SparsePlan(estimator="pooled", tau=0.9, sharpen=1.0).content_hash() == before
    sharp = SparsePlan(estimator="pooled", tau=0.9, sharpen=1.5, layer_overrides={1: {"sharpen": 2}})
    assert sharp.content_hash() != before
    assert sharp.layer_params(0).sharpen == 1.5 and sharp.layer_params(1).sharpen == 2.0
    save_plan(sharp, tmp_path / "p")
    back = load_plan(tmp_path / "p")
    assert back.content_hash() == sharp.content_hash() and back.layer_params(1).sharpen == 2.0
    for bad in (0, -1.0, float("nan"), float("inf"), 9.0, True, "2"):
        with pytest.raises(PlanError, match=r"sharpen must be a number in \(0, 8\]"):
            SparsePlan(sharpen=bad)
        with pytest.raises(PlanError, match=r"layer_overrides\[3\]\.sharpen"):
            SparsePlan(layer_overrides={3: {"sharpen": bad}})


def test_the_kernels_select_from_the_sharpened_estimate():
    torch.manual_seed(0)
    u = torch.randn(16)
    q = torch.randn(1, 4, 512, 16) + 2 * u
    # each key block a step further along the queries' direction: block scores that differ
    k = torch.randn(1, 2, 512, 16) + (torch.arange(512) // 64).float()[:, None] * 0.4 * u / u.norm()
    plan = SparsePlan(block_size=64, estimator="pooled", tau=0.9, local_blocks=1)
    sharp = plan.with_(layer_overrides={0: {"sharpen": 3.0}})
    a = estimate_and_select(q, k, plan, plan.layer_params(0), compiled=False)
    b = estimate_and_select(q, k, sharp, sharp.layer_params(0), compiled=False)
    assert b.density < a.density
    assert (b.kv_counts <= a.kv_counts).all()


def test_powers_are_checked_and_one_comes_first():
    assert sharpen_powers([2, 1.4, 2.0]) == (1.0, 1.4, 2.0)
    assert sharpen_powers([]) == (1.0,) and CalibrationLimits().sharpen == (1.0,)
    assert CalibrationLimits(sharpen=(2.0, 1.0)).sharpen == (1.0, 2.0)
    for bad in ((0.0,), (9.0,), (float("nan"),), (True,)):
        with pytest.raises(ValueError, match=r"calibration\.sharpen must be a number in \(0, 8\]"):
            CalibrationLimits(sharpen=bad)
    assert variant_key("gate_v2", 1.0) == "gate_v2" and variant_key("gate_v2", 1.4) == "gate_v2^1.4"
    assert variant_of("gate_v2^1.4") == ("gate_v2", 1.4) and variant_of("pooled") == ("pooled", 1.0)


def _sens(err: list[list[float]], dens: list[list[float]]) -> Sensitivity:
    """Two layers, two taus, one head."""
    e = torch.tensor(err).view(2, 2, 1)
    d = torch.tensor(dens).view(2, 2, 1)
    return Sensitivity((0.5, 0.9), e, d, heads=1, group=1)


def test_a_layer_takes_a_power_as_it_takes_an_estimator():
    own = _sens([[0.01, 0.001], [0.01, 0.001]], [[0.4, 0.6], [0.3, 0.5]])
    sharp = _sens([[0.01, 0.001], [0.05, 0.001]], [[0.2, 0.5], [0.2, 0.6]])  # better in layer 0 only
    other = _sens([[0.01, 0.001], [0.01, 0.001]], [[0.5, 0.6], [0.25, 0.5]])
    sens = {"pooled": own, "pooled^2": sharp, "quest": other, "quest^2": sharp}
    lo, _, dense, pred, _, chosen = allocate_choice(sens, 0.02, per_head=True)
    assert chosen == ["pooled^2", "quest"] and dense == ()
    assert lo[0] == {"tau": 0.5, "sharpen": 2.0}
    assert lo[1] == {"tau": 0.5, "estimator": "quest"}
    assert pred == pytest.approx((0.2 + 0.25) / 2)


def test_sensitivities_at_each_power_come_from_the_same_scores(quality_tiny, quality_texts):
    model, tok = quality_tiny
    windows = pack_token_windows(tok, quality_texts, 512, 1, seed=0)
    base = SparsePlan(block_size=64, estimator="pooled", local_blocks=1)
    taus = (0.5, 0.9)
    plain = measure_sensitivities(model, windows, base, taus, ("pooled",))
    both = measure_sensitivities(model, windows, base, taus, ("pooled",), sharpen=(1.0, 2.0))
    assert set(both) == {"pooled", "pooled^2"}
    assert torch.equal(both["pooled"].err, plain["pooled"].err)
    # raised to 2 the same estimate keeps fewer blocks at each tau and drops at least as much mass
    assert (both["pooled^2"].density <= both["pooled"].density + 1e-6).all()
    assert both["pooled^2"].density.sum() < both["pooled"].density.sum()
    out = measure_sensitivities(model, windows, base, taus, ("pooled",), measure="output", sharpen=(2.0,))
    assert set(out) == {"pooled", "pooled^2"} and torch.isfinite(out["pooled^2"].err).all()


def test_calibration_with_powers_is_never_sparser_on_paper_without_them_and_its_plan_runs(
    quality_tiny, quality_texts, tmp_path
):
    model, tok = quality_tiny
    lim = dict(max_texts=4, max_seq_len=512, taus=(0.5, 0.8, 0.9), max_joint_checks=2, gate_steps=3)
    plain = calibrate_many(
        model, tok, quality_texts, LOOSE, estimators=("pooled",), limits=CalibrationLimits(**lim)
    )
    sharp = calibrate_many(
        model,
        tok,
        quality_texts,
        LOOSE,
        estimators=("pooled",),
        limits=CalibrationLimits(**lim, sharpen=(2.0,)),
    )
    (p0, r0), (p1, r1) = plain["pooled"], sharp["pooled"]
    assert r1.met_budget and p1.metadata["calibration"]["sharpen"] == [1.0, 2.0]
    assert "sharpen" not in p0.metadata["calibration"]
    assert r1.predicted_density <= r0.predicted_density + 1e-6
    powers = [p1.layer_params(i).sharpen for i in range(model.config.num_hidden_layers)]
    assert set(powers) <= {1.0, 2.0}
    assert r1.layer_estimators == [
        "dense" if i in p1.dense_layers else variant_key("pooled", p) for i, p in enumerate(powers)
    ]
    save_plan(p1, tmp_path / "plan")
    back = load_plan(tmp_path / "plan", config=model.config)
    assert back.content_hash() == p1.content_hash()
    sparsify(model, back)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1] * 300]))
        assert torch.isfinite(out.logits).all()
    finally:
        unsparsify(model)
