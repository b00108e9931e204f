"""Whether a calibration found a sparse plan within the quality budget, and how to say it.

A plan has two parts, each calibrated against the budget: its prefill part (`CalibrationReport.met_budget`:
the eps search found a sparse prefill plan) and, with `quality_budget.decode`, its decode part
(`report["decode"]`: a sparse decode section that met the same budget on generated tokens). Either one
saves time, and the ROI prices each (docs/roi.md: a plan that keeps every prefill block but decodes
sparsely is not the dense model). The flows used to record the prefill's flag alone as the
calibration's `met_budget`, so a plan whose prefill search failed but whose decode met its budget read
"no sparse plan met the quality budget" and was never piloted. Pure functions; the calibrate
flow records `met_budget` from `met_budget` (and the prefill's flag as `prefill_met_budget`), and the main
job, the cycle and the pilot read it back through `recorded_flags` (rollout.runs.calibration_metrics).

A run recorded before `prefill_met_budget` existed stored the prefill's flag alone as `met_budget`; its
calibrate key is unchanged, so `calibrate` reuses it as it is. `recorded_flags` reads such a run by the
rule above, from its prefill flag and the decode section its plan keeps
(`metadata["decode_calibration"]`: the decode part's flag and layer budgets, recorded before and since).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def decode_met_budget(report: Mapping[str, Any]) -> bool:
    """Did the plan's decode part come out sparse within the budget? (A decode search that kept every
    layer dense, as when the cache never reaches the break-even, met it trivially and saves nothing.)"""
    dec = report.get("decode") or {}
    return bool(dec.get("met_budget")) and any(b is not None for b in dec.get("layer_budgets") or ())


def met_budget(report: Mapping[str, Any]) -> bool:
    """A sparse plan met the quality budget: its prefill part, or its decode part (`decode_met_budget`)."""
    return bool(report.get("met_budget")) or decode_met_budget(report)


def budget_words(report: Mapping[str, Any]) -> str:
    """The calibrate flow's words for the outcome: which part met the budget and which stays dense."""
    prefill, decode = bool(report.get("met_budget")), decode_met_budget(report)
    if prefill:
        return "met"
    if decode:
        return "met by the decode part only: prefill stays dense, decode sparse"
    return "NOT met: plan stays dense"


def decodes_densely(plan: Mapping[str, Any] | None) -> bool:
    """Does the registered plan (its dict) decode densely: no decode section, and no decode part met the
    budget by its calibration's record (`decode_met_budget` of `metadata["decode_calibration"]`, which a
    plan recorded before the decode part counted may carry alone)? With a prefill density of 1.000 such a
    plan is the dense model: what judges a challenger that has no evaluation yet
    (`rollout.runs.pilot_skip`)."""
    plan = plan or {}
    decode = (plan.get("metadata") or {}).get("decode_calibration") or {}
    return plan.get("decode") is None and not decode_met_budget({"decode": decode})


MISSED_BUDGET = "no sparse plan met the quality budget"  # neither part: the plan is the dense model
STAYS_DENSE = "stays dense, not piloted"


def missed_budget_refusal(use_case: str, run_id: int) -> str:
    """What starting a pilot of a challenger whose calibration missed the budget (`met_budget` false) is
    told, in the words the cycle logs and the portfolio shows (`rollout.roi.pilot_skip_reason`'s first
    case): `sparsepilot pilot NAME` before its flow starts, an import, the pilot flow itself.
    --pilot-anyway does not waive it: there is no sparse plan to pilot."""
    return (
        f"{use_case}: not piloted: {MISSED_BUDGET} (calibration run {run_id}): {STAYS_DENSE}; nothing was "
        "started, --pilot-anyway included (the challenger is the dense model)"
    )


def recorded_flags(
    metrics: Mapping[str, Any], decode_calibration: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A calibration run's metrics with `met_budget` and `prefill_met_budget` by the rule above. A run
    that records `prefill_met_budget` is returned as it is; one recorded before stored the prefill's flag
    alone as `met_budget`, read here with `decode_calibration` (its plan's decode section; None: the
    plan has no decode part). A run that never said (`met_budget` absent) is returned as it is."""
    if "met_budget" not in metrics or "prefill_met_budget" in metrics:
        return dict(metrics)
    prefill = bool(metrics["met_budget"])
    report = {"met_budget": prefill, "decode": dict(decode_calibration or {})}
    return {**metrics, "met_budget": met_budget(report), "prefill_met_budget": prefill}


__all__ = [
    "MISSED_BUDGET",
    "STAYS_DENSE",
    "budget_words",
    "decode_met_budget",
    "decodes_densely",
    "met_budget",
    "missed_budget_refusal",
    "recorded_flags",
]
