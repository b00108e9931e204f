"""What the gate recommends a person do with a decision (`recommended_action`: acting otherwise is an
override, two approvers; `recommendation_in_words`, as the Approvals card says it), and what a promotion
on it skips of the spec's ramp (`ramp_steps_skipped`, in words for the approver: `skip_note`). Pure:
read from the decision and its evidence."""

from __future__ import annotations

from typing import Any

from rollout.db.models import GateDecision


def recommended_action(decision: Any) -> str:
    """'approve' when the evidence supports what approving does, else 'reject'. `decision`: a
    GateDecision, or anything with its `awaiting`, `outcome` and `evidence`."""
    if decision.awaiting == "rollback_approval":
        return "approve"  # the monitor recommends the rollback
    # A GO asks for promotion (awaiting "approval") at the plan's last step, or at an earlier one where a
    # short pilot asks early (`promote_after_step`, the main job's step 1). Promoting on a GO before the
    # last step skips the remaining ramp steps: an override like promoting on EXTEND (docs/operations.md).
    ok = decision.outcome == "GO" and decision.awaiting == "approval"
    return "approve" if ok and not ramp_steps_skipped(decision.evidence) else "reject"


def recommendation_in_words(decision: Any, recommended: str, pilot_waits: str | None = None) -> str:
    """What an Approvals card says the gate recommends (markdown). A running pilot's decision that
    asked nobody (`awaiting` "none": EXTEND, INVALID, an earlier step's GO) recommends no action of a
    person's: the pilot goes on (what the use case waits for, `pilot_waits`: the portfolio's words,
    "more samples (120/300 in the smaller arm)"), and promoting now is an override; `recommended_action`
    reads "reject" there only as the single-signature side, a button such a card does not have."""
    if decision.awaiting != "none":
        return f"The gate recommends: **{recommended}**."
    then = f" (the use case waits for {pilot_waits})" if pilot_waits else ""
    # more samples do not cure an INVALID look (rollout.decisions.invalid_remedy)
    keep = (
        "no promotion on data it does not trust"
        if decision.outcome == "INVALID"
        else "keep the pilot collecting"
    )
    return f"The gate recommends: **{keep}**{then}; promoting now is an override."


def ramp_steps_skipped(evidence: Any) -> list[dict[str, Any]]:
    """The ramp steps a promotion on this gate decision skips, [{"index", "traffic_pct"}]: the plan's
    steps after the decision's own (`later_steps`, recorded by the gate; for a decision recorded before
    it, the indexes from `step_index` and `plan_steps`, the shares unknown). [] at the last step, for a
    monitor's or a person's decision, or where the evidence cannot say."""
    ev = evidence or {}
    if "later_steps" in ev:
        return [dict(s) for s in ev["later_steps"]]
    index, steps = ev.get("step_index"), ev.get("plan_steps")
    if not isinstance(index, int) or not isinstance(steps, int):
        return []
    return [{"index": i, "traffic_pct": None} for i in range(index + 1, steps)]


def skipped_in_words(steps: list[dict[str, Any]]) -> str:
    """'ramp step 2 (70%)', 'ramp steps 2 (70%) and 3 (90%)': what `ramp_steps_skipped` returned."""
    named = [
        f"{s['index']}" + (f" ({s['traffic_pct']:g}%)" if s.get("traffic_pct") is not None else "")
        for s in steps
    ]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"ramp step{'s' if len(named) > 1 else ''} {listed}"


def skip_note(evidence: Any, *, waits_for_approval: bool) -> str:
    """The sentence an approver reads before promoting on a GO before the plan's last step; '' where a
    promotion skips nothing. Only a GO that waits for approval can continue the ramp (`check_continuable`):
    a middle step's GO that asked nobody has already moved the pilot on, and promoting on it is the
    override alone; nor one whose plan the current spec version left uncalibrated (`continue_held`: the
    Approvals card passes `waits_for_approval` False for it, its continue button disabled, where the note
    said "One approver may instead continue the ramp")."""
    steps = ramp_steps_skipped(evidence)
    if not steps:
        return ""
    note = (
        f"Promoting on this decision skips {skipped_in_words(steps)} of the spec's plan: that goes against "
        "the plan, so it takes effect only when two different approvers sign it."
    )
    if not waits_for_approval:
        return note
    nxt = steps[0]
    share = f" ({nxt['traffic_pct']:g}%)" if nxt.get("traffic_pct") is not None else ""
    return (
        f"{note} One approver may instead continue the ramp to step {nxt['index']}{share}, as the plan "
        "would, and the gate looks again there."
    )


def explanation_shown(explanation: str, evidence: Any) -> str:
    """A decision's stored explanation as the Approvals card shows it: as recorded, less a final GO's skip
    note (`skip_note`, written into it by `decisions.gate_step` when the GO asked for approval), which the
    card's warning says beside it, in the words that hold now (no continuing of the ramp offered where
    continuing is refused: `continue_held`). The stored row is a record and is never rewritten; before, the
    card said the note twice, in its warning and in its info box."""
    offered = skip_note(evidence, waits_for_approval=True)
    if not offered or offered not in explanation:
        return explanation
    return explanation.replace(f" {offered}", "").replace(offered, "").strip()


def _skips(d: GateDecision) -> str:
    """'; promoting now skips ramp steps 2 (70%) and 3 (90%)' for a GO before the plan's last step (the
    remaining ramp steps, unnamed, for a GO that asked nobody recorded without the plan's steps)."""
    if d.outcome != "GO":
        return ""
    steps = ramp_steps_skipped(d.evidence)
    if steps:
        return f"; promoting now skips {skipped_in_words(steps)}"
    # a GO that asked nobody is an intermediate step's even where its evidence cannot name the rest
    return "; promoting now skips the remaining ramp steps" if d.awaiting == "none" else ""
