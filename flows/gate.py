"""`gate(use_case)`: run `rollout.gate.decide` on the current step (all its observations plus the
history of earlier looks), record the decision with its evidence, and act on it: GO advances to the next
step, or at the last step asks a person for promotion; NO-GO stops the pilot; EXTEND waits for more data;
INVALID waits for the data problem to be fixed. A retried or repeated gate on unchanged data returns the
decision already recorded (keyed by step + data fingerprint)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select

from flows.common import FLOW_ACTOR, log_run
from rollout import pilots
from rollout.traffic import exhaustion_note
from sparse_core.errors import SparsePilotError


class GateError(SparsePilotError, RuntimeError):
    pass


def _summary(d: Any, step: Any, created: bool) -> dict[str, Any]:
    q = (d.evidence or {}).get("quality") or {}
    return {
        "decision_id": d.id,
        "outcome": d.outcome,
        "awaiting": d.awaiting,
        "created": created,
        "step_index": step.index if step is not None else None,
        "step_kind": step.kind if step is not None else None,
        "look_index": d.look_index,
        "interval_low": q.get("interval_low"),
        "interval_high": q.get("interval_high"),
        "estimate": q.get("estimate"),
        "explanation": d.explanation,
        "reasons": (d.evidence or {}).get("reasons", []),
        "n_control": (d.evidence or {}).get("n_control"),
        "n_treatment": (d.evidence or {}).get("n_treatment"),
        "n_pairs": (d.evidence or {}).get("n_pairs"),
        "projected_requests": (d.evidence or {}).get("projected_requests"),
    }


@task(cache_policy=NO_CACHE, name="gate-current-step", retries=2, retry_delay_seconds=1)
def current_step_id(use_case: str) -> int:
    """The step this gate run decides, fixed before any write so a retried decide task looks at the
    same step (and data) even after its first attempt advanced the pilot."""
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        pilot = pilots.active_pilot(session, uc)
        if pilot is None:
            raise GateError(f"{use_case}: no active pilot; run `sparsepilot pilot {use_case}` first")
        return pilots.current_step(session, pilot).id


@task(cache_policy=NO_CACHE, name="gate-traffic-status", retries=2, retry_delay_seconds=1)
def traffic_status(use_case: str, step_id: int) -> dict[str, Any]:
    """How much of the pilot's traffic source is used: distinct requests so far and what is left."""
    from flows.common import load_context
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    ctx = load_context(use_case)
    with session_scope() as session:
        pilot = session.get(Pilot, session.get(PilotStep, step_id).pilot_id)
        used, salt = pilots.seen_request_ids(session, pilot), pilot.salt
    source = ctx.traffic(salt)
    return {"source": source.name, "distinct_used": len(used), "remaining": source.remaining(used)}


@task(cache_policy=NO_CACHE, name="gate-decide-and-record", retries=2, retry_delay_seconds=1)
def decide_and_record(
    use_case: str, step_id: int, promote_after_step: int | None = None, traffic: dict[str, Any] | None = None
) -> dict[str, Any]:
    import pandas as pd

    from rollout.db.models import GateDecision, Pilot, PilotStep
    from rollout.db.session import session_scope
    from rollout.gate import decide
    from rollout.observations_io import validate_observation_rows

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        spec, _ = pilots.load_step_spec(session, step_id)
        step = session.get(PilotStep, step_id)
        pilot = session.get(Pilot, step.pilot_id)
        rows = pilots.step_observations(session, step)
        plan = pilots.step_plan_for(spec, step)
        # no rows, or rows decide() cannot judge, are recorded as INVALID with the reason (never a crash)
        check = (
            validate_observation_rows(
                rows,
                known_request_ids={r["request_id"] for r in rows},
                # a split step at a small traffic % may have no treatment row yet: that is "too few
                # samples" (EXTEND), judged by decide, not a broken batch
                require_both_arms=step.kind == "shadow",
                source=f"{use_case} step {step.index} observations",
            )
            if rows
            else {"passed": True, "failures": [], "report": {"rows": 0}}
        )
        settings = pilots.gate_settings(spec, step)
        history = pilots.gate_history(session, step)
        decision = decide(
            pd.DataFrame(rows, columns=list(pilots.OBSERVATION_FIELDS)),
            settings,
            history,
            mode="paired" if step.kind == "shadow" else "split",
            planned_treatment_share=plan.planned_treatment_share,
            data_check_passed=check["passed"],
            data_check_failures=check["failures"],
            elapsed_days=pilots.elapsed_days(step),
            min_samples_per_arm=step.min_samples,
        )
        key = f"gate:{step.id}:{decision.data_fingerprint}"
        found = session.scalar(select(GateDecision).where(GateDecision.idempotency_key == key))
        if found is not None:  # a retry, or a re-run on unchanged data
            return _summary(found, step, False)
        if pilot.status != "running" or pilot.current_step_index != step.index:
            raise GateError(
                f"{use_case}: pilot {pilot.id} is {pilot.status} at step {pilot.current_step_index}"
            )
        final = pilots.is_last_step(spec, step) or (
            promote_after_step is not None and step.index >= promote_after_step
        )
        awaiting = "approval" if decision.outcome == "GO" and final else "none"
        evidence = decision.to_dict()
        evidence.update(
            {
                "pilot_id": pilot.id,
                "step_index": step.index,
                "step_kind": step.kind,
                "traffic_pct": step.traffic_pct,
                "data_check": check["report"],
                "final_step": final,
                "plan_steps": len(pilots.plan_steps(spec)),
                "promote_after_step": promote_after_step,
                "traffic": traffic,
            }
        )
        explanation = decision.explanation
        exhausted = exhaustion_note(decision.outcome, traffic, decision.projected_requests)
        if exhausted:
            evidence["reasons"] = [*evidence["reasons"], "traffic-exhausted"]
            explanation = f"{explanation} {exhausted}"
        d, created = pilots.record_decision(
            session,
            idempotency_key=key,
            use_case=uc,
            pilot=pilot,
            step=step,
            outcome=decision.outcome,
            evidence=evidence,
            explanation=explanation,
            data_fingerprint=decision.data_fingerprint,
            look_index=decision.look_index,
            awaiting=awaiting,
        )
        if created:
            _act(session, uc, pilot, spec, step, d, final)
        return _summary(d, step, created)


def _act(session: Any, uc: Any, pilot: Any, spec: Any, step: Any, d: Any, final: bool) -> None:
    if d.outcome == "GO" and not final:
        pilots.advance(session, pilot, spec, actor=FLOW_ACTOR, decision_id=d.id)
    elif d.outcome == "GO":
        step.status = "passed"
        step.ended_at = pilots.now()
        pilots.stop_pilot(
            session, pilot, status="awaiting_approval", actor=FLOW_ACTOR, reason=f"decision {d.id}: GO"
        )
        pilots.set_phase(
            session,
            uc,
            "awaiting_approval",
            actor=FLOW_ACTOR,
            reason=f"decision {d.id}: GO at step {step.index}",
        )
    elif d.outcome == "NO-GO":
        pilots.stop_pilot(
            session, pilot, status="stopped", actor=FLOW_ACTOR, reason=f"decision {d.id}: NO-GO"
        )
        pilots.set_phase(session, uc, "stopped", actor=FLOW_ACTOR, reason=f"decision {d.id}: NO-GO")


@task(cache_policy=NO_CACHE, name="gate-log-mlflow", retries=2, retry_delay_seconds=1)
def log_decision(use_case: str, summary: dict[str, Any]) -> str | None:
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    with session_scope() as session:
        d = session.get(GateDecision, summary["decision_id"])
        evidence = dict(d.evidence)
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


@flow(name="gate", log_prints=True)
def gate_flow(use_case: str, promote_after_step: int | None = None) -> dict[str, Any]:
    """Decide the current step. `promote_after_step` ends a short pilot early (the main job runs shadow +
    the first split step and asks for promotion there); None follows the spec's full ramp."""
    step_id = current_step_id(use_case)
    summary = decide_and_record(use_case, step_id, promote_after_step, traffic_status(use_case, step_id))
    if summary["created"]:
        log_decision(use_case, summary)
    get_run_logger().info(
        "%s: %s at step %s (look %s)%s",
        use_case,
        summary["outcome"],
        summary["step_index"],
        summary["look_index"],
        " - waiting for approval" if summary["awaiting"] == "approval" else "",
    )
    return summary
