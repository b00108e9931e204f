"""rollout.approvals' pure rules: what the gate recommends a person does with a decision, and which ramp
steps a promotion on it skips."""

from __future__ import annotations

from types import SimpleNamespace

from rollout.approvals import ramp_steps_skipped, recommended_action


def _decision(outcome: str, awaiting: str, evidence: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(outcome=outcome, awaiting=awaiting, evidence=evidence or {})


def test_approving_is_recommended_only_for_a_go_that_asks_for_promotion_at_its_last_step() -> None:
    """Approve is the recommendation for a GO that asks for promotion and skips no ramp step (and for a
    rollback the monitor asks for); a GO that asked nobody, a GO before the plan's last step, and every
    other outcome recommend reject: approving them is an override."""
    last = {"step_index": 2, "plan_steps": 3}
    assert recommended_action(_decision("GO", "approval", last)) == "approve"
    assert recommended_action(_decision("GO", "none", last)) == "reject"
    early = {"later_steps": [{"index": 2, "traffic_pct": 50.0}]}
    assert recommended_action(_decision("GO", "approval", early)) == "reject"
    assert recommended_action(_decision("GO", "approval", {"step_index": 0, "plan_steps": 3})) == "reject"
    for outcome in ("EXTEND", "NO-GO", "INVALID"):
        assert recommended_action(_decision(outcome, "approval", last)) == "reject"
    assert recommended_action(_decision("NO-GO", "rollback_approval")) == "approve"


def test_a_decision_recorded_before_later_steps_skips_every_step_after_its_own() -> None:
    """Evidence without `later_steps` (recorded before the gate kept them): the steps after the decision's
    own index up to the plan's count, shares unknown; none at the last step or where it cannot say."""
    assert ramp_steps_skipped({"step_index": 0, "plan_steps": 3}) == [
        {"index": 1, "traffic_pct": None},
        {"index": 2, "traffic_pct": None},
    ]
    assert ramp_steps_skipped({"step_index": 1, "plan_steps": 3}) == [{"index": 2, "traffic_pct": None}]
    assert ramp_steps_skipped({"step_index": 2, "plan_steps": 3}) == []
    assert ramp_steps_skipped({"step_index": "1", "plan_steps": 3}) == [] and ramp_steps_skipped(None) == []
    kept = {"later_steps": [{"index": 2, "traffic_pct": 50.0}], "step_index": 0, "plan_steps": 9}
    assert ramp_steps_skipped(kept) == [{"index": 2, "traffic_pct": 50.0}]
