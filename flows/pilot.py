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
import uuid
from dataclasses import replace
from typing import Any

from prefect import get_run_logger

from flows.arms import answer_with_arms
from flows.common import (
    UseCaseContext,
    catch_up_logs,
    flow_task,
    load_context,
    log_run,
    sparsepilot_flow,
    stable_key,
    under_lease,
    use_case_lease,
)
from rollout import audit, decisions, pilot_batches, run_links, tracking
from rollout.pilots import PilotStateError
from rollout.spec import has_visible_text
from rollout.validation import ARMS
from sparse_core.errors import SparsePilotError


class PilotError(SparsePilotError, RuntimeError):
    pass


def default_max_new_tokens(spec: Any, cap: int = 64) -> int:
    """Pilot answers are as long as the traffic profile's typical answer, capped for CPU pilots."""
    return max(1, min(cap, math.ceil(spec.traffic.output_tokens.mean())))


@flow_task("pilot-ensure")
def ensure_pilot(
    use_case: str, pilot_anyway: bool = False, actor: str = audit.SYSTEM_ACTOR
) -> dict[str, Any]:
    """The active pilot (started at its shadow step for the current challenger if none runs, and only
    where it is worth piloting unless `pilot_anyway`: rollout.pilot_batches.ensure_pilot_in), started by
    `actor` in the audit log."""
    return pilot_batches.ensure_pilot(use_case, pilot_anyway=pilot_anyway, actor=actor)


def abort(use_case: str, actor: str, reason: str) -> dict[str, Any]:
    """Stop the active pilot (rollout.pilots.abort_pilot) and cancel the paused approval runs of the
    decisions it closed, so nothing waits for a decision that can no longer be approved."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    text = (reason or "").strip()
    if not has_visible_text(text):  # zero-width and other invisible characters alone say nothing
        raise PilotError("--abort needs a --reason (kept in the audit log)")
    pilot_id, pilot, closed, runs = pilot_batches.abort(use_case, actor=actor, reason=text)
    out = {"pilot_id": pilot_id, "pilot": pilot, "closed_decisions": closed, "cancelled_runs": []}
    for rid in runs:
        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(
                    uuid.UUID(rid), Cancelled(message=f"pilot aborted: {text}"), force=True
                )
            out["cancelled_runs"].append(rid)
        except Exception:  # noqa: BLE001, S112 - the decision is closed either way; a stale run cannot act
            continue
    return out


def import_observations(
    use_case: str,
    path: str,
    *,
    external_assignment: bool = False,
    actor: str | None = None,
    pilot_anyway: bool = False,
) -> dict[str, Any]:
    """`sparsepilot pilot NAME --observations FILE`: a database import (no model work), so the CLI runs
    it directly rather than as a flow run; `pilot_flow(observations_file=...)` calls it too. Under the use
    case's lease, taken as a flow run takes it (`flows.common.use_case_lease`: named by the flow run where
    there is one, and what a dead holder left running in Prefect marked Crashed)."""
    with use_case_lease(use_case, "observations import"):
        return _import_observations(
            use_case, path, external_assignment=external_assignment, actor=actor, pilot_anyway=pilot_anyway
        )


def _import_observations(
    use_case: str, path: str, *, external_assignment: bool, actor: str | None, pilot_anyway: bool = False
) -> dict[str, Any]:
    from rollout.traffic import importable

    # the pilot's own spec version (a running pilot keeps the version it started under) and its dataset
    version = pilot_batches.pilot_spec_version(use_case)
    ctx = load_context(use_case, version)
    # the requests the pilot's own traffic would be: never one calibration read, nor a prompt twice
    known, refused = importable(ctx.traffic("import"), ctx.rows)
    done = pilot_batches.import_file(
        use_case,
        path,
        known,
        refused_ids=refused,
        external_assignment=external_assignment,
        actor=actor,
        spec_version=version,
        pilot_anyway=pilot_anyway,
    )
    info = done["info"]
    log_missing_batches.fn(ctx)  # an earlier batch whose log failed, and this one (when it stored rows)
    if not done["stored"]["inserted"]:  # an identical re-import stores no batch; its run says so
        log_batch.fn(ctx, info, done["rows"], done["stored"], done["source"], done["batch_id"])
    return _run_summary(
        use_case,
        info,
        [
            {
                "batch_id": done["batch_id"],
                "inserted": done["stored"]["inserted"],
                "already_present": done["stored"]["already_present"],
                "passed": True,
            }
        ],
    )


def _run_summary(use_case: str, info: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
    """What a pilot run or an import returns (the CLI prints it): the use case, the pilot and step that
    `info` (`ensure_pilot`'s, `pilot_batches.import_file`'s) names, and its batches."""
    return {
        "use_case": use_case,
        "pilot_id": info["pilot_id"],
        "pilot": info["pilot"],
        "step_index": info["step_index"],
        "step_kind": info["kind"],
        "traffic_pct": info["traffic_pct"],
        "batches": batches,
    }


def next_requests(ctx: UseCaseContext, used: set[str], salt: str, n: int) -> list[tuple[str, dict]]:
    """The next (up to) n requests of the pilot's traffic source, each used once per pilot (the ids are
    added to `used`). Fewer, or none, when the source is exhausted: a replayed request would be the same
    evidence counted twice (the gate then says "traffic exhausted")."""
    requests = ctx.traffic(salt).take(n, used)
    used.update(r.id for r in requests)
    return [(r.id, r.as_row()) for r in requests]


# Run the requests through the step's two arms and score them: the model in this process (default) or the
# endpoints of the spec's `pilot.arms` (flows.arms, rollout.arms).
answer_batch = flow_task("pilot-answer-batch", retries=1)(answer_with_arms)


def answer_measured(
    ctx: UseCaseContext,
    info: dict[str, Any],
    requests: list[tuple[str, dict]],
    max_new_tokens: int,
    max_prompt_tokens: int | None,
) -> tuple[list[dict[str, Any]], dict[str, str], Any]:
    """answer_batch with torch threads chosen from the CPUs really free (sparse_core.host) and the host's
    load recorded while it ran: (rows, void requests, load). Each row of an arm on this host (in-process,
    or an endpoint served here) is flagged `overloaded` when its own answer was timed while the CPU was
    oversubscribed (rollout.arms.host_load); an endpoint elsewhere does its work on its own host. The
    load's `endpoint_note` names the arms whose endpoint process could not be seen (each answer's note,
    once: "control, treatment: endpoint process not visible: ..."). The thread count is the batch's: the
    caller's is restored after it (sparse_core.host.threads_restored)."""
    from sparse_core.host import HostLoadMeter, apply_thread_policy, threads_restored

    with threads_restored():
        policy = apply_thread_policy()
        with HostLoadMeter(threads=policy["threads"]) as meter:
            rows, void, notes = answer_batch(ctx, info, requests, max_new_tokens, max_prompt_tokens)
    assert meter.load is not None
    # the batch's record carries its arms' notes (an endpoint's server not visible), said per answer
    return rows, void, meter.load if notes is None else replace(meter.load, endpoint_note=notes)


def arms_on_this_host(ctx: UseCaseContext) -> list[str]:
    """The pilot's arms that answer on this host (in-process, or an endpoint served here:
    rollout.arms.host_load.runs_here), whose answers are measured for its load."""
    from rollout.arms.host_load import runs_here

    return [arm for arm in ARMS if runs_here(getattr(ctx.spec.pilot.arms, arm))]


def latency_judged(rows: list[dict[str, Any]], arms_here: list[str]) -> dict[str, Any]:
    """What the batch gives the gate's latency checks (its p95s, the latency guardrail): the rows they
    judge, those they leave out (an answer of an arm on this host timed under overload), and the arms
    measured here. An arm on another host is never left out: the pilot host's load reaches its latency
    only client-side (sending the request, reading the answer), small beside the answer's own work."""
    left_out = sum(1 for r in rows if r.get("overloaded"))
    return {"rows_judged": len(rows) - left_out, "rows_left_out": left_out, "arms_measured_here": arms_here}


def warn_if_overloaded(
    logger: Any, use_case: str, rows: list[dict[str, Any]], load: Any, arms_here: list[str]
) -> None:
    """Say in the run's log that the host was overloaded during the batch (`load`, the whole batch's) or
    during some of its answers (the rows flagged), and what that does to the rows (`arms_here`: the arms
    answering on this host, `arms_on_this_host`)."""
    flagged = sum(1 for r in rows if r.get("overloaded"))
    if not flagged and not load.overloaded:
        return
    if flagged:
        what = (
            f"{flagged} of {len(rows)} rows were timed under overload: they count for quality, not for the "
            "latency guardrail"
        )
    elif arms_here:
        here = ", ".join(arms_here)
        what = (
            f"no row was timed under overload (it fell between the answers of the arms on this host: {here})"
        )
    else:
        what = (
            "both arms answer from other hosts, where the load is their own: every row counts for the "
            "latency guardrail"
        )
    waited = (
        "" if load.wait_share is None else f", our threads waited {100 * load.wait_share:.0f}% of the time"
    )
    logger.warning(
        "%s: host overloaded during the batch (others busy on %s of %s CPUs%s): %s",
        use_case,
        load.others_busy_cores,
        load.cpus,
        waited,
        what,
    )


@flow_task("pilot-validate-batch")
def validate_batch(rows: list[dict[str, Any]], known_ids: list[str], kind: str) -> dict[str, Any]:
    from rollout.observations_io import validate_observation_rows

    return validate_observation_rows(
        rows, known_request_ids=known_ids, require_both_arms=kind in ("shadow", "monitor")
    )


# A validated batch stored in its step (rollout.pilot_batches.store_batch), and why the step takes no batch
# now (its pilot aborted, stopped, moved on: rollout.pilot_batches.step_refusal), or None, as tasks.
store_batch = flow_task("pilot-store-batch")(pilot_batches.store_batch)
step_refusal = flow_task("pilot-step-refusal")(pilot_batches.step_refusal)


@flow_task("pilot-record-failed-check")
def record_failed_check(
    use_case: str, info: dict[str, Any], batch_id: str, check: dict[str, Any], actor: str = audit.SYSTEM_ACTOR
) -> int:
    """A batch that failed its data check does not count; the INVALID decision says why."""
    return decisions.failed_batch(use_case, info, batch_id, check, actor=actor)


@flow_task("pilot-log-missing")
def log_missing_batches(ctx: UseCaseContext) -> list[str]:
    """Log each stored batch of the latest pilot whose MLflow run is not recorded (its log failed: a rerun
    draws new requests, so nothing else would log it), from its stored rows, and record its run. A run
    logged before its record failed is found in MLflow (by batch id), not logged twice."""
    out = []
    for b in run_links.unlogged_batches(ctx.name):
        found = tracking.find_run(ctx.name, "pilot", {"batch_id": b["batch_id"]})
        if found is not None:
            run_links.batch_logged(b["info"]["step_id"], b["batch_id"], found)
        out.append(found or log_batch.fn(ctx, b["info"], b["rows"], b["stored"], b["source"], b["batch_id"]))
    return out


@flow_task("pilot-log-mlflow")
def log_batch(
    ctx: UseCaseContext,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    stored: dict[str, int],
    source: str,
    batch_id: str,
) -> str:
    """Log the stored batch's MLflow run and record it on the batch (a batch not stored, an identical
    re-import's, has no row to record it on)."""
    # an import passes a sample of its rows (the arm metrics below) and its total count in `stored`
    metrics: dict[str, float] = {
        "rows": float(stored.get("rows", len(rows))),
        "inserted": float(stored["inserted"]),
    }
    if stored.get("void"):  # requests with no row: the control arm gave no reference (rollout.arms.step)
        metrics["void"] = float(stored["void"])
    for arm in ARMS:
        arm_rows = [r for r in rows if r["arm"] == arm]
        if arm_rows:
            # the latencies the gate judges: a row timed while the host was overloaded is left out, counted
            lat = sorted(r["latency_ms"] for r in arm_rows if not r.get("overloaded"))
            metrics[f"{arm}_n"] = float(len(arm_rows))
            metrics[f"{arm}_quality_mean"] = sum(r["quality"] for r in arm_rows) / len(arm_rows)
            if lat:  # none where every row was left out (MLflow refuses NaN)
                metrics[f"{arm}_latency_p50_ms"] = lat[len(lat) // 2]
            metrics[f"{arm}_latency_rows_left_out"] = float(len(arm_rows) - len(lat))
            metrics[f"{arm}_error_rate"] = sum(1 for r in arm_rows if r["error"]) / len(arm_rows)
    run_id = log_run(
        ctx.name,
        run_name=f"pilot-step{info['step_index']}",
        params={
            "pilot_id": info["pilot_id"],
            "step_index": info["step_index"],
            "step_kind": info["kind"],
            "traffic_pct": info["traffic_pct"],
            "source": source,
            "model_version_id": info["model_version_id"],
            "batch_id": batch_id,
        },
        metrics=metrics,
        tags={"sparsepilot.flow": "pilot"},
    )
    run_links.batch_logged(info["step_id"], batch_id, run_id)
    return run_id


def _stop(summary: dict[str, Any], logger: Any, use_case: str, refused: dict[str, str], then: str) -> None:
    """The run ends early because its pilot step takes no more observations (`step_refusal`): said in the
    log and in the summary (`stopped`: "pilot aborted" or "pilot step closed"; `explanation`)."""
    explanation = refused["explanation"] + then
    logger.warning("%s: %s", use_case, explanation)
    summary["stopped"], summary["explanation"] = refused["stopped"], explanation


def batch_id_for(step_id: int, rows_or_ids: list[str]) -> str:
    return f"b-{step_id}-{stable_key(step_id, sorted(rows_or_ids))[:24]}"


@sparsepilot_flow("pilot")
@under_lease("pilot")
def pilot_flow(
    use_case: str,
    observations_file: str | None = None,
    batches: int = 1,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    external_assignment: bool = False,
    pilot_anyway: bool = False,
    actor: str = audit.SYSTEM_ACTOR,
) -> dict[str, Any]:
    """Collect `batches` batches (or import a file) into the current step. Returns a summary. A new
    pilot starts only where the challenger is worth piloting, unless `pilot_anyway`
    (rollout.pilot_batches.ensure_pilot_in). `actor`: who runs it, the audit log's actor of the pilot's
    start (and an import's, a failed batch's INVALID): the operator signed in for `pilot` or `run`, the
    pipeline (default) for the scheduled cycle."""
    if observations_file:
        return import_observations(
            use_case,
            observations_file,
            external_assignment=external_assignment,
            actor=actor,
            pilot_anyway=pilot_anyway,
        )
    logger = get_run_logger()
    ctx = load_context(use_case)
    catch_up_logs(log_missing_batches, ctx)  # a batch an earlier run stored and did not log
    info = ensure_pilot(use_case, pilot_anyway, actor)
    if info["spec_version"] is not None and info["spec_version"] != ctx.spec_version:
        # a running pilot keeps the version it started under: its batch size, traffic and arms (docs/flows.md)
        ctx = load_context(use_case, info["spec_version"])
    summary = _run_summary(use_case, info, [])
    n = batch_size or ctx.spec.rollout.batch_size
    mnt = max_new_tokens or default_max_new_tokens(ctx.spec)
    used = set(info["used_request_ids"])
    for b in range(batches):
        # an operator's `pilot --abort` (or a gate look that moved the pilot on) while this run answered:
        # no more requests go to the arms
        refused = step_refusal(info["step_id"])
        if refused is not None:
            _stop(summary, logger, use_case, refused, f"; batch {b + 1} of {batches} was not answered")
            break
        requests = next_requests(ctx, used, info["salt"], n)
        if not requests:
            logger.info(
                "%s: traffic exhausted: %d distinct requests used in %s; no batch",
                use_case,
                len(used),
                info["pilot"],
            )
            summary["traffic_exhausted"] = True
            break
        logger.info(
            "%s: batch %d/%d of step %d (%s), %d requests",
            use_case,
            b + 1,
            batches,
            info["step_index"],
            info["kind"],
            len(requests),
        )
        rows, void, load = answer_measured(ctx, info, requests, mnt, max_prompt_tokens)
        arms_here = arms_on_this_host(ctx)
        warn_if_overloaded(logger, use_case, rows, load, arms_here)
        bid = batch_id_for(info["step_id"], [rid for rid, _ in requests])
        # every request void (the control arm gave no reference): no rows to check, the voids are kept
        check = validate_batch(rows, [rid for rid, _ in requests], info["kind"]) if rows else {"passed": True}
        if not check["passed"]:
            did = record_failed_check(use_case, info, bid, check, actor)
            summary["batches"].append(
                {"batch_id": bid, "passed": False, "decision_id": did, "failures": check["failures"]}
            )
            continue
        try:
            stored = store_batch(info["step_id"], rows, bid, "pilot-flow", void)
        except PilotStateError as exc:  # the step changed while the arms answered: the batch is discarded
            summary["batches"].append({"batch_id": bid, "passed": False, "stored": False})
            refused = step_refusal(info["step_id"]) or {"stopped": "pilot step closed"}
            _stop(summary, logger, use_case, {**refused, "explanation": str(exc)}, "; the run stops")
            break
        log_batch(ctx, info, rows, stored, "pilot-flow", bid)
        summary["batches"].append(
            {
                "batch_id": bid,
                **stored,
                "passed": True,
                "host_load": load.to_dict(),
                "latency": latency_judged(rows, arms_here),
            }
        )
    return summary
