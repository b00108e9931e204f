"""The scheduled flow of one use case (one cron schedule per use case, see flows.deployments): it does
what the use case's phase calls for — calibrate + evaluate a new use case, one pilot batch + gate while
piloting, make sure an approval run waits while a decision needs a person, monitor after promotion."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from rollout import pilots


def _phase(use_case: str) -> str:
    from rollout.db.session import session_scope

    with session_scope() as session:
        return pilots.get_use_case(session, use_case).phase


def _waiting_decision(use_case: str) -> int | None:
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        pending = pilots.pending_decisions(session, uc)
        return pending[-1].id if pending else None


def _latest_plan_met_budget(use_case: str) -> bool:
    from sqlalchemy import select

    from rollout.db.models import CalibrationRun
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        run = session.scalar(
            select(CalibrationRun)
            .where(CalibrationRun.use_case_id == uc.id, CalibrationRun.status == "succeeded")
            .order_by(CalibrationRun.id.desc())
        )
        return bool(run and (run.metrics or {}).get("met_budget", True))


def request_approval_run(decision_id: int) -> str | None:
    """Start the approval flow for a decision as its own flow run: through the `approval` deployment
    when one exists (a runner or worker executes it and it pauses there), else nothing — the CLI's
    `approve` starts one itself. Returns the flow run id created, if any."""
    from prefect.deployments import run_deployment

    from rollout.approvals import flow_is_waiting
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is None or flow_is_waiting(d.flow_run_id):
            return None
    try:
        fr = run_deployment(
            "approval/sparsepilot-approval", parameters={"decision_id": decision_id}, timeout=0
        )
    except Exception:  # noqa: BLE001 - no approval deployment registered: approvals start their own run
        return None
    return str(fr.id)


@flow(name="use-case-cycle", log_prints=True)
def cycle_flow(use_case: str, batches: int = 1) -> dict[str, Any]:
    from flows.calibrate import calibrate_flow
    from flows.evaluate import evaluate_flow
    from flows.gate import gate_flow
    from flows.monitor import monitor_flow
    from flows.pilot import pilot_flow

    logger = get_run_logger()
    phase = _phase(use_case)
    out: dict[str, Any] = {"use_case": use_case, "phase_before": phase}
    if phase in ("registered", "calibrated"):
        out["calibration"] = calibrate_flow(use_case)
        out["evaluation"] = evaluate_flow(use_case)
        phase = _phase(use_case)
    if phase == "evaluated" and not _latest_plan_met_budget(use_case):
        logger.info("%s: no sparse plan met the quality budget; it stays dense and no pilot runs", use_case)
        out["phase_after"] = phase
        return out
    if phase in ("evaluated", "piloting"):
        out["pilot"] = pilot_flow(use_case, batches=batches)
        out["gate"] = gate_flow(use_case)
        phase = _phase(use_case)
    if phase == "awaiting_approval":
        did = _waiting_decision(use_case)
        if did is not None:
            out["approval_run"] = request_approval_run(did)
    elif phase == "promoted":
        out["monitor"] = monitor_flow(use_case)
    elif phase in ("stopped", "rolled_back"):
        logger.info("%s is %s: add a new spec version and calibrate to start again", use_case, phase)
    out["phase_after"] = _phase(use_case)
    return out
