"""The scheduled flow of one use case (one cron schedule per use case, see flows.deployments): it does
what the use case's phase calls for — calibrate + evaluate a new use case (or a challenger calibrated
under an earlier spec version whose calibration inputs changed), one pilot batch + gate while piloting,
make sure an approval run waits while a decision needs a person, and monitor the champion serving
production whatever the phase (`pilot_batches.champion_watched`)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from flows.common import sparsepilot_flow
from rollout import approval_runs, decisions, leases, lifecycle, pilot_batches
from rollout.usecases import phase_of


def request_approval_run(decision_id: int) -> str | None:
    """Start the approval flow for a decision as its own flow run: through this state DB's `approval`
    deployment when one exists (a runner or worker executes it and it pauses there), else nothing — the CLI's
    `approve` starts one itself. Returns the flow run id created, if any."""
    from prefect.deployments import run_deployment

    from flows.deployments import APPROVAL_FLOW, approval_deployment_name

    if not approval_runs.needs_run(decision_id):
        return None
    try:  # this state DB's own approval deployment (one per state DB on a shared Prefect server)
        fr = run_deployment(
            f"{APPROVAL_FLOW}/{approval_deployment_name()}",
            parameters={"decision_id": decision_id},
            timeout=0,
        )
    except Exception:  # noqa: BLE001 - no approval deployment registered: approvals start their own run
        return None
    return str(fr.id)


@sparsepilot_flow("use-case-cycle")
def cycle_flow(use_case: str, batches: int = 1, pilot_anyway: bool = False) -> dict[str, Any]:
    """One tick of the use case's schedule, under its lease (rollout.leases): a tick that finds the use
    case busy (the previous cycle still running, or someone's manual run) does nothing and says who
    holds it. `pilot_anyway`: a deployment's (or a run's) explicit override of "not piloted", as
    `sparsepilot pilot NAME --pilot-anyway` (never a missed budget)."""
    from flows.common import use_case_lease

    try:
        with use_case_lease(use_case, "use-case cycle"):
            return _cycle(use_case, batches, pilot_anyway)
    except leases.UseCaseBusy as busy:  # raised on entry only: the subflows run under this lease
        get_run_logger().warning("%s; this cycle does nothing", busy)
        return {"use_case": use_case, "skipped": str(busy)}


def _cycle(use_case: str, batches: int, pilot_anyway: bool = False) -> dict[str, Any]:
    from flows.calibrate import calibrate_flow
    from flows.evaluate import evaluate_flow
    from flows.gate import gate_flow
    from flows.monitor import monitor_flow
    from flows.pilot import pilot_flow
    from flows.promote import finish_unfinished

    logger = get_run_logger()
    out: dict[str, Any] = {"use_case": use_case, "phase_before": phase_of(use_case)}
    finished = finish_unfinished(use_case)  # decided earlier, not in effect: first (rollout.unfinished)
    if finished is not None:
        out["finished"] = finished
    phase = phase_of(use_case)
    # a challenger calibrated for another spec version's budget (or model, data) is not piloted under this
    # one: calibrated again first (rollout.recalibration); its running pilot is stopped when that succeeds
    stale = pilot_batches.not_calibrated(use_case) if lifecycle.can(phase, "pilot") else None
    if stale is not None:
        logger.info(
            "%s: spec v%s is not calibrated (%s): calibrating again", use_case, stale.version, stale.why
        )
        out["calibrated_again"] = stale.why
    if lifecycle.can(phase, "calibrate") or stale is not None:
        out["calibration"] = calibrate_flow(use_case)
        out["evaluation"] = evaluate_flow(use_case)
        phase = phase_of(use_case)
    if lifecycle.can(phase, "pilot"):
        # the rule the pilot itself obeys (ensure_pilot_in); a missed budget among it, whatever pilot_anyway
        skip = pilot_batches.pilot_skip(use_case, pilot_anyway=pilot_anyway)
        if skip is not None:  # the override a scheduled tick has: its flow parameter (no CLI flag)
            said = skip.said("the cycle's flow parameter pilot_anyway: true")
            logger.info("%s: not piloted: %s", use_case, said)
            out["pilot_skipped"] = said
        else:
            # no actor: nobody started a scheduled tick, so its rows name the pipeline (the flows' default)
            out["pilot"] = pilot_flow(use_case, batches=batches, pilot_anyway=pilot_anyway)
            out["gate"] = gate_flow(use_case)
        phase = phase_of(use_case)
    if lifecycle.can(phase, "approve"):
        did = decisions.latest_waiting(use_case)
        if did is not None:
            out["approval_run"] = request_approval_run(did)
    elif lifecycle.phase(phase).ended and not pilot_batches.champion_watched(use_case):
        logger.info("%s is %s: add a new spec version and calibrate to start again", use_case, phase)
    # the champion serving production is watched whatever the phase (another challenger piloting, or a
    # rollback having returned to it: `rollout.champion`)
    if pilot_batches.champion_watched(use_case):
        out["monitor"] = monitor_flow(use_case)
    out["phase_after"] = phase_of(use_case)
    return out
