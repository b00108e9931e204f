"""Promotion, rejection, continued-ramp, keep and rollback flows: thin wrappers over rollout.approvals'
effects, which move aliases through rollout.registry (pending -> committed alias history + audit,
idempotent per decision) and update the pilot and the use case's phase. The acting person is read back
from the Approval row."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger

from flows.common import flow_task, log_run, sparsepilot_flow
from rollout import audit, decisions
from rollout.approvals import apply_continue, apply_keep, apply_promotion, apply_rejection, apply_rollback

# rollout.approvals' effects, as tasks; a flow's `finished_by` "" (nobody finishes) is passed on as None
promote_task = flow_task("promote-move-aliases")(apply_promotion)
reject_task = flow_task("reject-stop-pilot")(apply_rejection)
continue_task = flow_task("continue-ramp")(apply_continue)
keep_task = flow_task("keep-champion")(apply_keep)
rollback_task = flow_task("rollback-move-alias")(apply_rollback)


@flow_task("alias-log-mlflow")
def log_alias_event(decision_id: int, result: dict[str, Any], action: str, actor: str) -> str:
    from rollout import registry

    name = decisions.use_case_of(decision_id)
    return log_run(
        name,
        run_name=action,
        params={"decision_id": decision_id, "actor": actor},
        tags={
            "sparsepilot.flow": action,
            **{f"alias.{k}": v for k, v in registry.current_aliases(name).items()},
        },
        json_artifacts={f"{action}.json": result},
    )


@sparsepilot_flow("promote")
def promote_flow(
    decision_id: int, approval_id: int, reason: str, actor: str = "", finished_by: str = ""
) -> dict[str, Any]:
    """`finished_by` (every effect flow's): who finishes a decision another signed, whose effect did not
    complete; the moves stay the signer's, their reason too, and an `approval.finished` entry names them
    with `reason` (rollout.approvals.effects)."""
    result = promote_task(decision_id, approval_id, reason=reason, finished_by=finished_by or None)
    log_alias_event(decision_id, result, "promote", actor)
    if result.get("action") == "superseded":  # measured against a champion no longer serving
        get_run_logger().warning("decision %s: not promoted: %s", decision_id, result["reason"])
        return result
    get_run_logger().info("decision %s: promoted (%s)", decision_id, result.get("alias_moves"))
    if result.get(
        "champion_changed"
    ):  # a rollback came between the GO and its move (approvals.promotion_moves)
        get_run_logger().warning("decision %s: %s", decision_id, result["champion_changed"])
    return result


@sparsepilot_flow("reject")
def reject_flow(
    decision_id: int, approval_id: int, reason: str, actor: str = "", finished_by: str = ""
) -> dict[str, Any]:
    return reject_task(decision_id, approval_id, reason=reason, finished_by=finished_by or None)


@sparsepilot_flow("continue-ramp")
def continue_flow(decision_id: int, approval_id: int, reason: str, actor: str = "") -> dict[str, Any]:
    """A person continued the ramp from a GO before the plan's last step: the pilot runs at its next
    step (done when they signed, rollout.approvals; this reports where)."""
    result = continue_task(decision_id, approval_id, reason=reason)
    get_run_logger().info(
        "decision %s: ramp continued, %s at step %s", decision_id, result["pilot"], result["step_index"]
    )
    return result


@sparsepilot_flow("keep")
def keep_flow(
    decision_id: int, approval_id: int, reason: str, actor: str = "", finished_by: str = ""
) -> dict[str, Any]:
    """A person kept the champion through the monitor's alarm: promoted again, the monitor resumes."""
    return keep_task(decision_id, approval_id, reason=reason, finished_by=finished_by or None)


@sparsepilot_flow("rollback")
def rollback_flow(
    decision_id: int,
    approval_id: int | None = None,
    reason: str = "",
    automatic: bool = False,
    actor: str = "",
    finished_by: str = "",
) -> dict[str, Any]:
    result = rollback_task(
        decision_id, approval_id, reason=reason, automatic=automatic, finished_by=finished_by or None
    )
    log_alias_event(decision_id, result, "rollback", actor or (audit.MONITOR_ACTOR if automatic else ""))
    get_run_logger().info("decision %s: rolled back (%s)", decision_id, result.get("alias_move"))
    return result


def finish_unfinished(use_case: str, by: str = audit.SYSTEM_ACTOR) -> dict[str, Any] | None:
    """Carry out the use case's decision that was decided but is not in effect (rollout.unfinished: its
    run died, or MLflow was down) through the effect its own run would have run, under the same keys;
    None when there is none, or the run that is to carry it out still runs. `by`: the finisher the
    `approval.finished` entry names (the cycle's `sparsepilot-pipeline`, the monitor's own actor)."""
    from rollout import unfinished

    # None while its approval run, or (no run) the dashboard or the CLI that signed it a moment ago, is
    # carrying it out (finishing it at once made every move twice): a later tick finishes one whose
    # process died. Claimed from a run that has not taken it up, which then declines it
    u = unfinished.claim_to_finish(use_case, by)
    if u is None:
        return None
    reason = "decided, but its effect did not complete"
    logging.getLogger("sparsepilot.flows").warning(
        "%s: finishing decision %s: %s", use_case, u.decision_id, reason
    )
    if u.action == "rollback":
        result = rollback_flow(
            decision_id=u.decision_id,
            approval_id=u.approval_id,
            reason=reason,
            automatic=u.automatic,
            actor=audit.MONITOR_ACTOR if u.automatic else "",
            finished_by=by,  # the finisher, in `approval.finished`; the moves stay the signer's
        )
    else:
        assert u.approval_id is not None  # a person's signature carries every other effect
        effect = {"promote": promote_flow, "keep": keep_flow, "reject": reject_flow}[u.action]
        result = effect(u.decision_id, u.approval_id, reason, finished_by=by)
    return {"finished": u.to_dict(), "result": result}
