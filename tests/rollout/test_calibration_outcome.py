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


def _old_calibration(name: str, decode_budgets: list, tmp_path) -> str:  # noqa: ANN001
    """A use case whose challenger's calibration was recorded as the calibrate flow wrote it before
    `prefill_met_budget`: `met_budget` the prefill's flag alone (False: the prefill stays dense), its
    decode part in the metrics and in its plan's `metadata["decode_calibration"]`. Returns the run's key."""
    from sparse_core import SparsePlan

    from .usecase_helpers import add_calibrated

    sparse = any(b is not None for b in decode_budgets)
    plan = SparsePlan(tau=0.9, dense_layers=(0, 1))
    plan.metadata["decode_calibration"] = {
        "met_budget": True,
        "fidelity": {"kl": 0.001},
        "layer_budgets": decode_budgets,
        "density": 0.35 if sparse else 1.0,
        "prompt_tokens": 1024,
        "whole_model": None,
    }
    key = f"calibrate:{name}-before-the-upgrade"
    metrics = {
        "settings": {"quick": True},
        "density": 1.0,
        "met_budget": False,
        "decode_density": 0.35 if sparse else 1.0,
        "decode_met_budget": 1.0,
    }
    add_calibrated(tmp_path, name, plan, density=1.0, metrics=metrics, key=key)
    return key


def test_a_calibration_recorded_before_the_upgrade_is_read_by_todays_rule(sp_home, tmp_path) -> None:  # noqa: ANN001
    """`calibrate` reuses a run recorded before the decode part counted (its key is unchanged): the
    reused result, the cycle and the pilot read its outcome from its prefill flag and its plan's decode
    section, so a decode-only sparse plan is piloted and a plan dense in both parts is still not."""
    import pytest

    from rollout.db.session import session_scope
    from rollout.pilot_batches import ensure_pilot_in, pilot_skip
    from rollout.pilots import PilotStateError, get_use_case
    from rollout.runs import open_calibration

    key = _old_calibration("decode-only", [512, None], tmp_path)
    # the cycle's check (it asked runs.latest_plan_met_budget too, the same reading: s47 fix-c 4)
    assert pilot_skip("decode-only") is None and pilot_skip("decode-only", pilot_anyway=True) is None
    with session_scope() as s:
        step = ensure_pilot_in(s, "decode-only")
        uc_id = get_use_case(s, "decode-only").id
    assert step["kind"] == "shadow"
    reused = open_calibration(uc_id, 1, key, {"quick": True}, None)
    assert reused["status"] == "succeeded"
    assert reused["metrics"]["met_budget"] is True and reused["metrics"]["prefill_met_budget"] is False

    key = _old_calibration("all-dense", [None, None], tmp_path)  # decode kept dense: met trivially
    missed = "no sparse plan met the quality budget: stays dense, not piloted"
    assert str(pilot_skip("all-dense")) == str(pilot_skip("all-dense", pilot_anyway=True)) == missed
    with (
        session_scope() as s,
        pytest.raises(
            PilotStateError, match=r"all-dense: not piloted: no sparse plan met the quality budget"
        ),
    ):
        ensure_pilot_in(s, "all-dense")
    with session_scope() as s:
        uc_id = get_use_case(s, "all-dense").id
    assert open_calibration(uc_id, 1, key, {"quick": True}, None)["metrics"]["met_budget"] is False
