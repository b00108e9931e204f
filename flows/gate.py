"""`gate(use_case)`: run `rollout.gate.decide` on the current step (all its observations plus the
history of earlier looks), record the decision with its evidence, and act on it: GO advances to the next
step, or at the last step asks a person for promotion; NO-GO stops the pilot; EXTEND waits for more data;
INVALID waits for the data problem to be fixed. A retried or repeated gate on unchanged data returns the
decision already recorded (keyed by step + data fingerprint). Each decision is logged to MLflow once, and a
decision whose log failed is logged by the next gate run (its run id is kept on the decision)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from flows.common import catch_up_logs, flow_task, load_context, log_run, sparsepilot_flow, under_lease
from rollout import audit, decisions, pilot_batches, run_links, tracking
from sparse_core.errors import SparsePilotError


class GateError(SparsePilotError, RuntimeError):
    pass


@flow_task("gate-current-step")
def current_step_id(use_case: str) -> int:
    """The step this gate run decides, fixed before any write so a retried decide task looks at the
    same step (and data) even after its first attempt advanced the pilot."""
    step = pilot_batches.current_step(use_case)
    if step is None:
        raise GateError(f"{use_case}: no active pilot; run `sparsepilot pilot {use_case}` first")
    return step["step_id"]


@flow_task("gate-traffic-status")
def traffic_status(use_case: str, step_id: int) -> dict[str, Any]:
    """How much of the pilot's traffic source is used: distinct requests so far and what is left."""
    ctx = load_context(use_case)
    salt, used = pilot_batches.step_traffic_use(step_id)
    source = ctx.traffic(salt)
    return {"source": source.name, "distinct_used": len(used), "remaining": source.remaining(used)}


# The look itself, every rule and write of it in the domain (rollout.decisions.gate_step), as a task.
decide_and_record = flow_task("gate-decide-and-record")(decisions.gate_step)


@flow_task("gate-log-mlflow")
def log_decisions(use_case: str) -> list[str]:
    """Log each gate decision of the latest pilot whose MLflow run is not recorded (the one just made, or
    one whose log failed before: a retried or repeated gate finds its decision already recorded, and a
    NO-GO's pilot has ended), and record its run. A run logged before its record failed is found in
    MLflow (by decision id), not logged twice. Returns the run ids."""
    out = []
    for summary in run_links.unlogged_gate_decisions(use_case):
        params = {"decision_id": summary["decision_id"]}
        run_id = tracking.find_run(use_case, "gate", params) or log_decision(use_case, summary)
        run_links.decision_logged(summary["decision_id"], run_id)
        out.append(run_id)
    return out


def log_decision(use_case: str, summary: dict[str, Any]) -> str:
    evidence = decisions.evidence(summary["decision_id"])
    metrics = {
        "n_control": summary.get("n_control"),
        "n_treatment": summary.get("n_treatment"),
        "quality_delta": summary.get("estimate"),
        "interval_low": summary.get("interval_low"),
        "interval_high": summary.get("interval_high"),
        "srm_p_value": evidence.get("srm_p_value"),
        "go": 1.0 if summary["outcome"] == "GO" else 0.0,
    }
    return log_run(
        use_case,
        run_name=f"gate-step{summary['step_index']}-look{summary['look_index']}",
        params={
            "decision_id": summary["decision_id"],
            "step_index": summary["step_index"],
            "outcome": summary["outcome"],
        },
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        tags={"sparsepilot.flow": "gate", "sparsepilot.outcome": summary["outcome"]},
        json_artifacts={"decision_evidence.json": evidence},
    )


@sparsepilot_flow("gate")
@under_lease("gate")
def gate_flow(
    use_case: str, promote_after_step: int | None = None, actor: str = audit.SYSTEM_ACTOR
) -> dict[str, Any]:
    """Decide the current step. `promote_after_step` ends a short pilot early (the main job runs shadow +
    the first split step and asks for promotion there); None follows the spec's full ramp. `actor`: who
    runs the look, the audit log's actor of the decision and of the step and phase changes it makes: the
    operator signed in for `gate` or `run`, the pipeline (default) for the scheduled cycle."""
    catch_up_logs(log_decisions, use_case)  # one whose log failed before (its pilot may have ended since)
    step_id = current_step_id(use_case)
    summary = decide_and_record(
        use_case,
        step_id,
        promote_after_step=promote_after_step,
        traffic=traffic_status(use_case, step_id),
        actor=actor,
    )
    log_decisions(use_case)
    get_run_logger().info(
        "%s: %s at step %s (look %s)%s",
        use_case,
        summary["outcome"],
        summary["step_index"],
        summary["look_index"],
        " - waiting for approval" if summary["awaiting"] == "approval" else "",
    )
    return summary
