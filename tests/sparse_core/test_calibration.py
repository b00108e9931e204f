"""Budget calibration on a tiny model: the returned plan meets the budget on held-out data (checked
again independently), the search is deterministic for a seed, an unreachable budget yields a dense
plan that says so, and malformed budgets are refused."""

from __future__ import annotations

import pytest

from sparse_core import sparsify, unsparsify
from sparse_core.calibration import Budget, BudgetError, CalibrationLimits, calibrate, split_texts
from sparse_core.corpus import pack_token_windows
from sparse_core.fidelity import dense_reference, measure_fidelity
from sparse_core.fidelity_bound import min_blocks

LIMITS = CalibrationLimits(max_texts=4, max_seq_len=768, taus=(0.5, 0.7, 0.9), max_joint_checks=4)


@pytest.fixture(scope="module")
def calibrated(quality_tiny, quality_texts):
    model, tok = quality_tiny
    budget = Budget(kl=0.002, agree=0.99, nll_delta=0.01)
    plan, report = calibrate(model, tok, quality_texts, budget, estimator="pooled", seed=3, limits=LIMITS)
    return budget, plan, report


def test_plan_meets_budget_on_heldout(quality_tiny, quality_texts, calibrated):
    model, tok = quality_tiny
    budget, plan, report = calibrated
    assert report.met_budget, report.search
    assert plan.metadata["met_budget"] is True
    assert report.fidelity["kl"] <= budget.kl and report.fidelity["agree"] >= budget.agree
    assert report.density < 1.0, "a tiny random model has sparsity to offer at this budget"
    # at least one joint check failed, so the budget was binding and the search stopped short of it
    assert any(not s.passed for s in report.search)
    # re-measure the held-out fidelity independently of the search code
    _, held = split_texts(quality_texts, LIMITS.holdout_fraction, 3)
    n_held = max(1, round(LIMITS.max_texts * LIMITS.holdout_fraction))
    windows = pack_token_windows(tok, held, LIMITS.max_seq_len, n_held, seed=4, min_length=128)
    ref = dense_reference(model, windows)
    sparsify(model, plan)
    try:
        fid = measure_fidelity(model, ref)
    finally:
        unsparsify(model)
    assert budget.met_by(fid), fid
    assert abs(fid.kl - report.fidelity["kl"]) < 1e-6


def test_metadata_records_budget_data_and_density(quality_tiny, quality_texts, calibrated):
    model, _ = quality_tiny
    budget, plan, report = calibrated
    md = plan.metadata
    assert md["budget"] == budget.to_dict()
    assert len(md["data_fingerprint"]) == 64
    assert md["model_shape"]["num_hidden_layers"] == model.config.num_hidden_layers
    assert len(md["layer_density"]) == model.config.num_hidden_layers
    assert all(0 < d <= 1 for d in md["layer_density"])
    assert md["fidelity"] == report.fidelity
    plan.validate_for(model.config)


def test_deterministic_for_a_seed(quality_tiny, quality_texts, calibrated):
    model, tok = quality_tiny
    budget, plan, report = calibrated
    plan2, report2 = calibrate(model, tok, quality_texts, budget, estimator="pooled", seed=3, limits=LIMITS)
    assert plan2.content_hash() == plan.content_hash()
    assert report2.fidelity == report.fidelity


def test_unreachable_budget_gives_a_dense_plan(quality_tiny, quality_texts):
    model, tok = quality_tiny
    lim = CalibrationLimits(max_texts=2, max_seq_len=512, taus=(0.5,), max_joint_checks=2)
    plan, report = calibrate(model, tok, quality_texts, "kl=0.0000001,agree=1.0", seed=0, limits=lim)
    assert not report.met_budget
    assert plan.dense_layers == tuple(range(model.config.num_hidden_layers))
    assert report.density == 1.0


@pytest.mark.parametrize(
    "text, match",
    [
        ("kl", "name=value"),
        ("kl=abc", "non-numeric"),
        ("foo=1", "unknown budget item"),
        ("agree=1.5", "agree"),
    ],
)
def test_bad_budget_is_refused(text, match):
    with pytest.raises(BudgetError, match=match):
        Budget.parse(text)


def test_budget_parse_and_violations():
    b = Budget.parse("kl=0.01, agree=0.99")
    assert (b.kl, b.agree, b.nll_delta) == (0.01, 0.99, None)
    from sparse_core.fidelity import Fidelity

    assert b.violations(Fidelity(0.02, 0.995, 2.0, 2.0, 0.0, 10)) == ["kl 0.02 > 0.01"]
    assert b.met_by(Fidelity(0.005, 0.995, 2.0, 2.1, 0.05, 10))


def test_confidence_judges_the_budget_on_bounds(quality_tiny, quality_texts):
    """With `confidence` a search step passes only if the bounds (agreement's lower, KL's upper) meet
    the budget: a plan whose held-out means meet it can fail, and the plan keeps at least as many
    blocks as the search on the means finds."""
    model, tok = quality_tiny
    budget = Budget(kl=0.004, agree=0.98, nll_delta=None)
    # 3 held-out windows scored whole: 12 blocks, enough for the per-step level (1 - 0.05 / 4)
    lim = dict(
        max_texts=12, max_seq_len=1024, fidelity_fraction=1.0, taus=(0.5, 0.7, 0.9), max_joint_checks=4
    )
    _, on_means = calibrate(model, tok, quality_texts, budget, seed=3, limits=CalibrationLimits(**lim))
    plan, bounded = calibrate(
        model, tok, quality_texts, budget, seed=3, limits=CalibrationLimits(**lim, confidence=0.95)
    )
    assert bounded.met_budget and bounded.n_heldout_windows == 3
    assert bounded.density >= on_means.density
    for s in bounded.search:
        f = s.fidelity
        assert f["confidence"] == 0.95 and f["agree_lower"] <= f["agree"] and f["kl_upper"] >= f["kl"]
        # each step at the level that makes the returned plan's bound hold (eps_search.step_alpha)
        assert f["step_confidence"] == pytest.approx(1 - 0.05 / 4)
        assert s.passed == (f["agree_lower"] >= budget.agree and f["kl_upper"] <= budget.kl)
    assert any(
        not s.passed and s.fidelity["agree"] >= budget.agree and s.fidelity["kl"] <= budget.kl
        for s in bounded.search
    ), "the margin never bound: the test budget is too loose to show it"
    assert plan.metadata["fidelity"]["agree_lower"] >= budget.agree
    with pytest.raises(ValueError, match="confidence"):
        CalibrationLimits(confidence=1.0)


def test_a_window_unit_judges_the_budget_on_the_held_out_windows(quality_tiny, quality_texts):
    """`bound_unit="window"`: each step's bound is taken over the held-out windows (their blocks summed),
    as recomputed here from an independent measurement: a bound over 8 draws instead of their 16
    blocks. Too few windows for the window unit is refused before any work, while the
    same windows' blocks would do."""
    from sparse_core.fidelity_bound import by_window, fidelity_bound

    model, tok = quality_tiny
    budget = Budget(kl=0.004, agree=0.98, nll_delta=None)
    # 8 held-out windows of 512 tokens scored whole: 2 blocks each; 2 steps judged at 0.975 need 7
    lim = dict(
        max_texts=16,
        max_seq_len=512,
        holdout_fraction=0.5,
        fidelity_fraction=1.0,
        taus=(0.5, 0.7, 0.9),
        max_joint_checks=2,
        confidence=0.95,
    )
    plan, rep = calibrate(
        model, tok, quality_texts, budget, seed=3, limits=CalibrationLimits(**lim, bound_unit="window")
    )
    assert rep.met_budget and rep.n_heldout_windows == 8 and rep.density < 1.0, rep.search
    for s in rep.search:
        f = s.fidelity
        assert f["bound_unit"] == "window" and f["bound_units"] == 8
        assert f["step_confidence"] == pytest.approx(0.975)
        assert s.passed == (f["agree_lower"] >= budget.agree and f["kl_upper"] <= budget.kl)
    # re-measure the returned plan on the held-out windows, independently of the search code: its
    # bound is the one over the 8 windows (2 blocks each), not over their 16 blocks
    _, held = split_texts(quality_texts, 0.5, 3)
    windows = pack_token_windows(tok, held, 512, 8, seed=4, min_length=128)
    ref = dense_reference(model, windows, fraction=1.0)
    sparsify(model, plan)
    try:
        fid = measure_fidelity(model, ref)
    finally:
        unsparsify(model)
    f = plan.metadata["fidelity"]
    assert (f["kl"], f["agree"]) == pytest.approx((fid.kl, fid.agree), rel=1e-5)
    win, blocks = fidelity_bound(by_window(fid, [2] * 8), 0.975), fidelity_bound(fid, 0.975)
    assert (f["agree_lower"], f["kl_upper"]) == pytest.approx((win.agree, win.kl), rel=1e-5)
    assert (win.agree, win.kl) != pytest.approx((blocks.agree, blocks.kl), rel=1e-5)
    # 4 held-out windows: even a one-step search (0.95) needs 6; their 8 blocks would do for blocks
    calls: list = []
    few = CalibrationLimits(**{**lim, "holdout_fraction": 0.25}, bound_unit="window")
    with pytest.raises(
        BudgetError, match=r"needs at least 6 held-out windows \(its unit is a window\), got 4"
    ):
        calibrate(model, tok, quality_texts, budget, seed=3, limits=few, progress=lambda *a: calls.append(a))
    assert calls == [], "it refused before any forward"


def test_a_margin_too_few_blocks_can_give_is_refused_before_any_work(quality_tiny, quality_texts):
    """2 held-out windows of 512 tokens, the last half scored: 2 blocks of 256 positions, where a 95%
    bound needs 6 (t^2 < B - 1): every step would fail, so calibration says why instead of searching."""
    model, tok = quality_tiny
    lim = CalibrationLimits(max_texts=8, max_seq_len=512, taus=(0.5,), max_joint_checks=2, confidence=0.95)
    calls = []
    with pytest.raises(BudgetError, match=r"at least 6 blocks of 256 .* give 2\. Use more or longer"):
        calibrate(model, tok, quality_texts, "kl=1", seed=3, limits=lim, progress=lambda *a: calls.append(a))
    assert calls == [], "it refused before any forward"
    assert min_blocks(0.95) == 6 and min_blocks(1 - 0.05 / 7) == 11


def test_output_measure_is_the_sparse_kernels_own_error(quality_tiny, quality_texts):
    """`measure="output"`: layer 0's sensitivity at a tau equals the relative error of the attention
    output the sparsified model computes there (layer 0 sees the same input in both forwards)."""
    import math

    import torch

    from sparse_core.calibration import measure_sensitivities
    from sparse_core.capture import capture_attention
    from sparse_core.plan import SparsePlan

    model, tok = quality_tiny
    window = pack_token_windows(tok, quality_texts, 640, 1, seed=1, min_length=640)[0]
    taus = (0.5, 0.9)
    base = SparsePlan(estimator="pooled", block_size=64, group_heads=True)
    sens = measure_sensitivities(model, [window], base, taus, ("pooled",), measure="output")["pooled"]
    mass = measure_sensitivities(model, [window], base, taus, ("pooled",))["pooled"]
    assert sens.err.shape == mass.err.shape and bool((sens.err[:, 0] >= sens.err[:, 1]).all())

    def layer0_output():
        got = {}

        def on_layer(call):
            got["out"] = call.output[0].float().clone()  # [S, Hq, D]

        with torch.no_grad(), capture_attention(model, on_layer, layers={0}):
            model(input_ids=torch.tensor([window]))
        return got["out"]

    dense = layer0_output()
    rms = dense.pow(2).sum(-1).mean(0).sqrt()  # [Hq]
    nb = math.ceil(len(window) / 64)
    rows = torch.arange(len(window)) // 64
    for ti, tau in enumerate(taus):
        sparsify(model, base.with_(tau=tau))
        try:
            sparse = layer0_output()
        finally:
            unsparsify(model)
        e = (sparse - dense).norm(dim=-1) / rms  # [S, Hq]
        per_block = torch.stack([e[rows == i].mean(0) for i in range(nb)])  # [nb, Hq]
        want = per_block.mean(0).view(sens.heads, sens.group).mean(-1)
        torch.testing.assert_close(sens.err[0, ti], want, atol=2e-4, rtol=2e-3)


def test_calibration_by_output_error_meets_the_budget_and_says_so(quality_tiny, quality_texts):
    model, tok = quality_tiny
    budget = Budget(kl=0.002, agree=0.99, nll_delta=0.01)
    lim = CalibrationLimits(**{**LIMITS.__dict__, "drop_measure": "output"})
    plan, report = calibrate(model, tok, quality_texts, budget, estimator="pooled", seed=3, limits=lim)
    assert report.met_budget and report.density < 1.0, report.search
    assert plan.metadata["calibration"]["drop_measure"] == "output"
    with pytest.raises(ValueError, match="drop_measure"):
        CalibrationLimits(drop_measure="entropy")
