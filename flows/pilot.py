"""`pilot(use_case)`: one or more pilot batches in the pilot's current step.

Shadow step: both arms answer every request (dense = control, the sparse challenger = treatment) and only
the dense answer would be served. Split steps: sha256(salt:request_id) assigns each request to one arm at
the step's traffic %. The arms run in this process or behind the endpoints of the spec's `pilot.arms`
(docs/serving.md); latency is the model's own time in-process, the client's for an endpoint. Quality is
the use case's task score against the reference, or against the dense answer where a request has none.
Each batch is validated with Great Expectations before it counts; a failed batch is not stored and leaves
an INVALID decision.
Observations from a real serving system can be imported instead (`observations_file`)."""

from __future__ import annotations

import math
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import (
    FLOW_ACTOR,
    UseCaseContext,
    load_context,
    log_run,
    stable_key,
)
from rollout import pilots


class PilotError(RuntimeError):
    pass


def default_max_new_tokens(spec: Any, cap: int = 64) -> int:
    """Pilot answers are as long as the traffic profile's typical answer, capped for CPU pilots."""
    return max(1, min(cap, math.ceil(spec.traffic.output_tokens.mean())))


@task(cache_policy=NO_CACHE, name="pilot-ensure", retries=2, retry_delay_seconds=1)
def ensure_pilot(use_case: str) -> dict[str, Any]:
    """The active pilot (started at its shadow step for the current challenger if none runs)."""
    from sqlalchemy import select

    from rollout.db.models import CalibrationRun, ModelVersion
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        spec, _ = pilots.load_current_spec(session, uc)
        run = session.scalar(
            select(CalibrationRun)
            .where(
                CalibrationRun.use_case_id == uc.id,
                CalibrationRun.status == "succeeded",
                CalibrationRun.model_version_id.is_not(None),
            )
            .order_by(CalibrationRun.id.desc())
        )
        if run is None:
            raise PilotError(
                f"{use_case}: no calibrated challenger yet; run `sparsepilot calibrate {use_case}` first"
            )
        if (run.metrics or {}).get("met_budget") is False:
            raise PilotError(
                f"{use_case}: calibration run {run.id} found no sparse plan within the quality budget; "
                "the challenger is the dense model and there is nothing to pilot"
            )
        mv = session.get(ModelVersion, run.model_version_id)
        last = pilots.latest_pilot(session, uc)
        if (
            last is not None
            and last.model_version_id == mv.id
            and last.status in ("stopped", "promoted", "rolled_back")
        ):
            raise PilotError(
                f"{use_case}: pilot {last.id} of this challenger has ended ({last.status}); "
                "calibrate a new challenger (or add a new spec version) to pilot again"
            )
        pilot = pilots.active_pilot(session, uc)
        if pilot is None or pilot.model_version_id != mv.id:
            if pilot is not None and pilot.status == "awaiting_approval":
                raise PilotError(
                    f"{use_case}: pilot {pilot.id} is waiting for approval; approve or reject it first"
                )
            pilot = pilots.start_pilot(session, uc, mv, spec, actor=FLOW_ACTOR)
        if pilot.status != "running":
            raise PilotError(
                f"{use_case}: pilot {pilot.id} is {pilot.status}; no pilot traffic is collected now"
            )
        step = pilots.current_step(session, pilot)
        return {
            "pilot_id": pilot.id,
            "salt": pilot.salt,
            "step_id": step.id,
            "step_index": step.index,
            "kind": step.kind,
            "traffic_pct": step.traffic_pct,
            "min_samples": step.min_samples,
            "model_version_id": mv.id,
            "base_model_ref": mv.base_model_ref,
            "plan": mv.plan,
            "mlflow_model": mv.mlflow_model_name,
            "mlflow_version": mv.mlflow_version,
            "used_request_ids": sorted(pilots.seen_request_ids(session, pilot)),
        }


def choose_requests(rows: list[dict[str, Any]], used: set[str], salt: str, n: int) -> list[tuple[str, dict]]:
    """The next n requests of the pilot's traffic: dataset rows in a pilot-specific order, each used
    once per pilot; when the dataset is exhausted it is replayed with new request ids (id~r2, ...)."""
    # A separate hash domain from the arm assignment: ordering traffic by the assignment hash itself
    # would put the lowest hashes (all treatment) first and break the split.
    order = sorted(rows, key=lambda r: pilots.hash_unit(r["id"], f"{salt}:traffic-order"))
    out: list[tuple[str, dict]] = []
    rnd = 1
    while len(out) < n:
        for r in order:
            rid = r["id"] if rnd == 1 else f"{r['id']}~r{rnd}"
            if rid not in used:
                out.append((rid, r))
                used.add(rid)
                if len(out) == n:
                    break
        rnd += 1
    return out


@task(cache_policy=NO_CACHE, name="pilot-answer-batch", retries=1, retry_delay_seconds=1)
def answer_batch(
    ctx: UseCaseContext,
    info: dict[str, Any],
    requests: list[tuple[str, dict]],
    max_new_tokens: int,
    max_prompt_tokens: int | None,
) -> list[dict[str, Any]]:
    """Run the requests through the step's two arms and score them: the model in this process (default)
    or the endpoints of the spec's `pilot.arms` (flows.arms, rollout.arms)."""
    from flows.arms import answer_with_arms

    return answer_with_arms(ctx, info, requests, max_new_tokens, max_prompt_tokens)


@task(cache_policy=NO_CACHE, name="pilot-validate-batch", retries=2, retry_delay_seconds=1)
def validate_batch(rows: list[dict[str, Any]], known_ids: list[str], kind: str) -> dict[str, Any]:
    from rollout.observations_io import validate_observation_rows

    return validate_observation_rows(
        rows, known_request_ids=known_ids, require_both_arms=kind in ("shadow", "monitor")
    )


@task(cache_policy=NO_CACHE, name="pilot-store-batch", retries=2, retry_delay_seconds=1)
def store_batch(step_id: int, rows: list[dict[str, Any]], batch_id: str, source: str) -> dict[str, int]:
    from rollout.db.models import PilotStep
    from rollout.db.session import session_scope

    with session_scope() as session:
        step = session.get(PilotStep, step_id)
        res = pilots.record_observations(session, step, rows, batch_id=batch_id, source=source)
    return {"inserted": res.inserted, "already_present": res.already_present}


@task(cache_policy=NO_CACHE, name="pilot-record-failed-check", retries=2, retry_delay_seconds=1)
def record_failed_check(use_case: str, info: dict[str, Any], batch_id: str, check: dict[str, Any]) -> int:
    """A batch that failed its data check does not count; the INVALID decision says why."""
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    with session_scope() as session:
        uc = pilots.get_use_case(session, use_case)
        pilot = session.get(Pilot, info["pilot_id"])
        step = session.get(PilotStep, info["step_id"])
        failures = check.get("failures", [])
        d, _ = pilots.record_decision(
            session,
            idempotency_key=f"datacheck:{step.id}:{batch_id}",
            use_case=uc,
            pilot=pilot,
            step=step,
            outcome="INVALID",
            evidence={"data_check": check, "batch_id": batch_id, "reasons": ["data-check-failed"]},
            explanation=(
                f"Decision: INVALID. Pilot batch {batch_id} of step {step.index} failed its data checks "
                f"({'; '.join(failures[:3])}); its observations were not stored and do not count."
            ),
            data_fingerprint=batch_id[:64],
        )
        return d.id


@task(cache_policy=NO_CACHE, name="pilot-log-mlflow", retries=2, retry_delay_seconds=1)
def log_batch(
    ctx: UseCaseContext, info: dict[str, Any], rows: list[dict[str, Any]], stored: dict[str, int], source: str
) -> str | None:
    metrics: dict[str, float] = {"rows": float(len(rows)), "inserted": float(stored["inserted"])}
    for arm in ("control", "treatment"):
        arm_rows = [r for r in rows if r["arm"] == arm]
        if arm_rows:
            lat = sorted(r["latency_ms"] for r in arm_rows)
            metrics[f"{arm}_n"] = float(len(arm_rows))
            metrics[f"{arm}_quality_mean"] = sum(r["quality"] for r in arm_rows) / len(arm_rows)
            metrics[f"{arm}_latency_p50_ms"] = lat[len(lat) // 2]
            metrics[f"{arm}_error_rate"] = sum(1 for r in arm_rows if r["error"]) / len(arm_rows)
    return log_run(
        ctx.name,
        run_name=f"pilot-step{info['step_index']}",
        params={
            "pilot_id": info["pilot_id"],
            "step_index": info["step_index"],
            "step_kind": info["kind"],
            "traffic_pct": info["traffic_pct"],
            "source": source,
            "model_version_id": info["model_version_id"],
        },
        metrics=metrics,
        tags={"sparsepilot.flow": "pilot"},
    )


def batch_id_for(step_id: int, rows_or_ids: list[str]) -> str:
    return f"b-{step_id}-{stable_key(step_id, sorted(rows_or_ids))[:24]}"


@flow(name="pilot", log_prints=True)
def pilot_flow(
    use_case: str,
    observations_file: str | None = None,
    batches: int = 1,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Collect `batches` batches (or import a file) into the current step. Returns a summary."""
    logger = get_run_logger()
    ctx = load_context(use_case)
    info = ensure_pilot(use_case)
    summary: dict[str, Any] = {
        "use_case": use_case,
        "pilot_id": info["pilot_id"],
        "step_index": info["step_index"],
        "step_kind": info["kind"],
        "traffic_pct": info["traffic_pct"],
        "batches": [],
    }
    if observations_file:
        from rollout.observations_io import ObservationImportError, read_observations

        rows = read_observations(observations_file)
        known = sorted({r["id"] for r in ctx.rows})
        check = validate_batch(rows, known, "shadow")
        if not check["passed"]:
            raise ObservationImportError(
                f"{observations_file}: failed the observation checks; nothing was stored:\n  - "
                + "\n  - ".join(check["failures"])
            )
        bid = batch_id_for(info["step_id"], [f"{r['request_id']}|{r['arm']}" for r in rows])
        stored = store_batch(info["step_id"], rows, bid, "imported")
        log_batch(ctx, info, rows, stored, "imported")
        summary["batches"].append({"batch_id": bid, **stored, "passed": True})
        return summary

    n = batch_size or ctx.spec.rollout.batch_size
    mnt = max_new_tokens or default_max_new_tokens(ctx.spec)
    used = set(info["used_request_ids"])
    for b in range(batches):
        requests = choose_requests(ctx.rows, used, info["salt"], n)
        logger.info(
            "%s: batch %d/%d of step %d (%s), %d requests",
            use_case,
            b + 1,
            batches,
            info["step_index"],
            info["kind"],
            n,
        )
        rows = answer_batch(ctx, info, requests, mnt, max_prompt_tokens)
        bid = batch_id_for(info["step_id"], [rid for rid, _ in requests])
        check = validate_batch(rows, [rid for rid, _ in requests], info["kind"])
        if not check["passed"]:
            did = record_failed_check(use_case, info, bid, check)
            summary["batches"].append(
                {"batch_id": bid, "passed": False, "decision_id": did, "failures": check["failures"]}
            )
            continue
        stored = store_batch(info["step_id"], rows, bid, "pilot-flow")
        log_batch(ctx, info, rows, stored, "pilot-flow")
        summary["batches"].append({"batch_id": bid, **stored, "passed": True})
    return summary
