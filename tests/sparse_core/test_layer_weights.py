"""Per-layer weights on the allocation's error (`layer_weights="kl"`): a layer whose error costs more
output KL gets a larger scale and so a denser allocation at the same eps; the weights come from one
sensitivity window and are recorded in the plan; bad modes are refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_core import sparsify, unsparsify
from sparse_core.calibration import CalibrationLimits, Sensitivity, allocate, calibrate_many, scale_errors
from sparse_core.layer_weights import CLIP, REFERENCE_DENSITY, layer_scales, reference_eps
from sparse_core.plan import load_plan, save_plan

LOOSE = "kl=1,agree=0.3"


def test_scales_follow_the_square_root_of_each_layers_kl_around_their_geometric_mean():
    s = layer_scales([1e-4, 4e-4, None, 0.0])
    # sqrt: 0.01 and 0.02 around their geometric mean 0.01414; unmeasured and zero-KL layers keep 1
    assert s[0] == pytest.approx(1 / math.sqrt(2)) and s[1] == pytest.approx(math.sqrt(2))
    assert s[2:] == [1.0, 1.0]
    # a noisy quiet layer cannot take the whole budget: scales are clipped
    assert layer_scales([1e-10, 1.0]) == [1 / CLIP, CLIP]
    assert layer_scales([None, None]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="clip must be >= 1"):
        layer_scales([1.0], clip=0.5)


def test_the_reference_plan_is_the_one_nearest_the_reference_density():
    assert REFERENCE_DENSITY == 0.5
    assert reference_eps([0.01, 0.02, 0.05, 0.1], [0.9, 0.62, 0.45, 0.3]) == 0.05
    assert reference_eps([0.01, 0.02], [0.6, 0.4]) == 0.01  # a tie goes to the denser plan
    with pytest.raises(ValueError, match="one predicted density per candidate"):
        reference_eps([0.01], [])


def test_a_layer_whose_error_costs_more_is_allocated_denser_at_the_same_eps():
    taus = (0.5, 0.7, 0.9, 0.99)
    # two identical layers: error falls and density rises with tau, one selection head each
    err = torch.tensor([0.08, 0.04, 0.02, 0.005]).view(1, 4, 1).repeat(2, 1, 1)
    dens = torch.tensor([0.2, 0.35, 0.55, 0.8]).view(1, 4, 1).repeat(2, 1, 1)
    sens = Sensitivity(taus, err, dens, heads=1, group=1)
    assert allocate(sens, 0.04, per_head=True)[4][:, 0].tolist() == pytest.approx([0.35, 0.35])
    weighted = scale_errors(sens, [2.0, 0.5])
    dm = allocate(weighted, 0.04, per_head=True)[4][:, 0]
    assert dm.tolist() == pytest.approx([0.55, 0.2])  # the costly layer denser, the cheap one sparser
    with pytest.raises(ValueError, match="3 layer scales for 2 layers"):
        scale_errors(sens, [1.0, 1.0, 1.0])


def test_calibration_with_layer_weights_records_them_and_its_plan_runs(quality_tiny, quality_texts, tmp_path):
    model, tok = quality_tiny
    lim = CalibrationLimits(
        max_texts=4, max_seq_len=512, taus=(0.5, 0.8, 0.9), max_joint_checks=2, layer_weights="kl"
    )
    ((plan, rep),) = calibrate_many(
        model, tok, quality_texts, LOOSE, estimators=("pooled",), limits=lim
    ).values()
    n = model.config.num_hidden_layers
    lw = plan.metadata["calibration"]["layer_weights"]
    assert rep.layer_weights == lw and len(lw["layer_kl"]) == len(lw["scales"]) == n
    measured = [k for k in lw["layer_kl"] if k is not None]
    assert measured and all(k >= 0 for k in measured)
    assert all(1 / CLIP <= s <= CLIP for s in lw["scales"]) and rep.seconds["layer_weights"] > 0
    assert lw["scales"] == layer_scales(lw["layer_kl"])
    assert rep.met_budget
    save_plan(plan, tmp_path / "plan")
    back = load_plan(tmp_path / "plan")
    assert back.content_hash() == plan.content_hash()
    ids = torch.tensor([tok("def f(x):\n    return x + 1\n" * 40)["input_ids"][:256]])
    sparsify(model, back)
    try:
        assert torch.isfinite(model(input_ids=ids).logits).all()
    finally:
        unsparsify(model)


def test_an_unknown_layer_weighting_is_refused_by_name():
    with pytest.raises(ValueError, match=r"layer_weights must be one of \('none', 'kl'\), got 'output'"):
        CalibrationLimits(layer_weights="output")
