"""`monitor(use_case)`: after promotion, sample the use case's traffic on the champion (the sparse model
answers; the dense model answers the same requests offline so quality stays measurable), or check
observations exported by the serving system. A guardrail breach or a failed data check rolls the champion
back automatically when the spec's rollback policy is `auto`, else leaves a rollback decision waiting for
a person. Every look is a GateDecision of kind `monitor` (idempotent per step + data)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import load_context, log_run, stable_key
from rollout import pilots
from sparse_core.errors import SparsePilotError


class MonitorError(SparsePilotError, RuntimeError):
    pass


@task(cache_policy=NO_CACHE, name="monitor-target", retries=2, retry_delay_seconds=1)
def monitor_target(use_case: str) -> dict[str, Any] | None:
    from sqlalchemy import select

    from rollout.db.models import ModelVersion, Pilot
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        if uc.phase != "promoted":
            return None
        spec, _ = pilots.load_current_spec(session, uc)
        pilot = session.scalar(
            select(Pilot)
            .where(Pilot.use_case_id == uc.id, Pilot.status == "promoted")
            .order_by(Pilot.id.desc())
        )
        if pilot is None:
            return None
        step = pilots.open_monitor_step(session, pilot, min_samples=spec.rollout.batch_size)
        mv = session.get(ModelVersion, pilot.model_version_id)
        return {
            "pilot_id": pilot.id,
            "salt": pilot.salt,
            "step_id": step.id,
            "step_index": step.index,
            "kind": "shadow",  # both arms answer each sampled request (dense offline, for quality)
            "traffic_pct": 100.0,
            "model_version_id": mv.id,
            "base_model_ref": mv.base_model_ref,
            "plan": mv.plan,
            "mlflow_model": mv.mlflow_model_name,
            "mlflow_version": mv.mlflow_version,
            "rollback_policy": spec.rollback,
            "used_request_ids": sorted(pilots.seen_request_ids(session, pilot)),
        }


@task(cache_policy=NO_CACHE, name="monitor-decide", retries=2, retry_delay_seconds=1)
def decide_monitor(
    use_case: str, info: dict[str, Any], rows: list[dict], check: dict[str, Any], batch_id: str
) -> dict:
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        spec, _ = pilots.load_pilot_spec(session, session.get(Pilot, info["pilot_id"]))
        guard = pilots.monitor_guardrails(rows, spec) if check["passed"] else {"checks": [], "breached": []}
        if not check["passed"]:
            outcome = "INVALID"
            why = "the sampled traffic failed its data checks (" + "; ".join(check["failures"][:3]) + ")"
        elif guard["breached"]:
            outcome = "NO-GO"
            why = "guardrail breached: " + ", ".join(
                f"{c['name']} {c['value']:.4g} > {c['threshold']:.4g} "
                f"(at least {c['lower_bound']:.4g} with {100 * (1 - spec.gate.alpha):.0f}% confidence)"
                for c in guard["checks"]
                if c["breached"]
            )
        else:
            outcome = "GO"
            why = "no guardrail shown breached: " + ", ".join(
                f"{c['name']} {c['value']:.4g} (limit {c['threshold']:.4g})" for c in guard["checks"]
            )
        bad = outcome != "GO"
        auto = bad and info["rollback_policy"] == "auto"
        awaiting = "rollback_approval" if bad and not auto else "none"
        action = (
            "The champion is rolled back automatically (rollback policy: auto)."
            if auto
            else "A rollback waits for a person's approval (rollback policy: manual)."
            if bad
            else "The champion keeps serving."
        )
        explanation = f"Monitor: {outcome}. {why}. {action}"
        d, created = pilots.record_decision(
            session,
            idempotency_key=f"monitor:{info['step_id']}:{batch_id}",
            use_case=uc,
            pilot=session.get(Pilot, info["pilot_id"]),
            step=session.get(PilotStep, info["step_id"]),
            kind="monitor",
            outcome=outcome,
            evidence={
                "guardrails": guard,
                "data_check": check["report"],
                "batch_id": batch_id,
                "rows": len(rows),
            },
            explanation=explanation,
            data_fingerprint=batch_id[:64],
            awaiting=awaiting,
        )
        if created and awaiting == "rollback_approval":
            pilots.set_phase(
                session, uc, "awaiting_approval", actor="sparsepilot-monitor", reason=explanation
            )
        return {
            "decision_id": d.id,
            "outcome": d.outcome,
            "awaiting": d.awaiting,
            "resolution": d.resolution,
            "automatic_rollback": auto,
            "explanation": d.explanation,
            "created": created,
        }


@flow(name="monitor", log_prints=True)
def monitor_flow(
    use_case: str,
    observations_file: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    from flows.pilot import (
        answer_measured,
        default_max_new_tokens,
        next_requests,
        store_batch,
        validate_batch,
    )
    from flows.promote import rollback_flow

    logger = get_run_logger()
    ctx = load_context(use_case)
    info = monitor_target(use_case)
    if info is None:
        return {"status": "skipped", "explanation": f"{use_case}: nothing promoted, nothing to monitor"}
    if observations_file:
        from rollout.observations_io import read_observations

        rows = read_observations(observations_file)
        known = sorted({r["id"] for r in ctx.rows} | {r["request_id"] for r in rows})
        check = validate_batch(rows, known, "import")
        source = "imported"
    else:
        requests = next_requests(
            ctx, set(info["used_request_ids"]), info["salt"], batch_size or ctx.spec.rollout.batch_size
        )
        if not requests:
            return {
                "status": "skipped",
                "explanation": f"{use_case}: traffic exhausted: every request of the source was used once; "
                "import production observations with --observations to keep monitoring",
            }
        rows, _ = answer_measured(
            ctx, info, requests, max_new_tokens or default_max_new_tokens(ctx.spec), max_prompt_tokens
        )
        check = validate_batch(rows, [rid for rid, _ in requests], "monitor")
        source = "monitor"
    batch_id = f"m-{info['step_id']}-{stable_key(sorted((r['request_id'], r['arm']) for r in rows))[:24]}"
    if check["passed"]:
        store_batch(info["step_id"], rows, batch_id, source)
    result = decide_monitor(use_case, info, rows, check, batch_id)
    log_run(
        use_case,
        run_name="monitor",
        params={"decision_id": result["decision_id"], "source": source, "rows": len(rows)},
        metrics={"healthy": 1.0 if result["outcome"] == "GO" else 0.0},
        tags={"sparsepilot.flow": "monitor", "sparsepilot.outcome": result["outcome"]},
        json_artifacts={"monitor.json": result},
    )
    logger.info("%s", result["explanation"])
    if result["automatic_rollback"] and result["resolution"] is None:
        result["rollback"] = rollback_flow(
            decision_id=result["decision_id"],
            reason=result["explanation"],
            automatic=True,
            actor="sparsepilot-monitor",
        )
    return result
