"""A plan whose prefill search failed but whose decode part came out sparse within the budget read "no
sparse plan met the quality budget" and was never piloted: the calibrate flow recorded the prefill's
flag alone as `met_budget`, which the cycle, the main job and the pilot read. Such a plan saves decode
time and is priced as such (docs/roi.md); it now counts as a sparse plan within the budget. Real
calibration reports (sparse_core's dataclasses), the calibrate flow's own flags."""

from __future__ import annotations

from sparse_core.calibration import CalibrationReport
from sparse_core.decode.calibration import DecodeCalibrationReport


def _report(prefill_met: bool, decode_budgets: list | None, decode_met: bool = True) -> dict:
    rep = CalibrationReport(
        estimator="pooled",
        budget={"kl": 0.01},
        met_budget=prefill_met,
        fidelity={"kl": 0.0},
        density=0.6 if prefill_met else 1.0,
        predicted_density=0.6 if prefill_met else 1.0,
        layer_density=[0.6 if prefill_met else 1.0] * 2,
        head_density=[[1.0]] * 2,
        dense_layers=[] if prefill_met else [0, 1],
        eps=None,
    )
    if decode_budgets is not None:
        rep.decode = DecodeCalibrationReport(
            met_budget=decode_met,
            budget={"kl": 0.01},
            fidelity={"kl": 0.0},
            layer_budgets=decode_budgets,
            density=0.3 if any(b is not None for b in decode_budgets) else 1.0,
            eps=None,
        ).__dict__
    return rep.to_dict()


def test_a_decode_only_sparse_plan_met_the_budget_and_is_piloted() -> None:
    from flows.calibrate import _budget_flags
    from rollout.calibration_outcome import budget_words, met_budget
    from rollout.roi import pilot_skip_reason

    decode_only = _report(prefill_met=False, decode_budgets=[512, None])
    assert _budget_flags(decode_only) == {"met_budget": True, "prefill_met_budget": False}
    assert budget_words(decode_only) == "met by the decode part only: prefill stays dense, decode sparse"
    skip = pilot_skip_reason(
        met_budget=met_budget(decode_only),
        density=1.0,
        saved_usd_month=120.0,
        saved_usd_month_low=40.0,
        saved_usd_month_high=200.0,
        decode_status="measured",
    )
    assert skip is None  # priced by its sparse decode, and piloted

    # no sparse part: still "no sparse plan met the quality budget"
    for dense in (
        _report(prefill_met=False, decode_budgets=None),
        _report(prefill_met=False, decode_budgets=[None, None]),  # decode kept dense: met trivially
        _report(prefill_met=False, decode_budgets=[512, None], decode_met=False),
    ):
        assert _budget_flags(dense) == {"met_budget": False, "prefill_met_budget": False}
        assert budget_words(dense) == "NOT met: plan stays dense"
        assert str(pilot_skip_reason(met_budget=met_budget(dense), density=1.0, saved_usd_month=None)) == (
            "no sparse plan met the quality budget: stays dense, not piloted"
        )
    both = _report(prefill_met=True, decode_budgets=[512, 512])
    assert _budget_flags(both) == {"met_budget": True, "prefill_met_budget": True}
    assert budget_words(both) == "met"
