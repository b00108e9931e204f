"""`monitor(use_case)`: after promotion, sample the use case's traffic on the champion (the sparse model
answers; the dense model answers the same requests offline so quality stays measurable), or check
observations exported by the serving system. A guardrail breach, or a failed data check of the monitor's
own sampled answers, rolls the champion back automatically when the rollback policy is `auto`, else
leaves a rollback decision waiting for a person. The monitor keeps the spec version the champion was
promoted under (`pilot_batches.monitor_target`): a later version applies from the next promotion. An
imported file that fails its checks, or conflicts with the rows stored, is refused as the pilot's import
is (nothing stored, no look); one whose every row an earlier look judged stores nothing new and records no
look ("nothing new"). Every look is a
GateDecision of kind `monitor` (idempotent per step + data); a look that cannot be taken (traffic
exhausted) is logged as a warning and kept in the audit log (`monitor.skipped`). A sampling run whose
control arm is a served endpoint warns what its quality checks then compare
(`champion.monitor_control_caveat`: the champion with the champion's own server, which can hardly breach)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from flows.common import (
    catch_up_logs,
    flow_task,
    load_context,
    log_run,
    sparsepilot_flow,
    stable_key,
    under_lease,
)
from rollout import audit, champion, decisions, pilot_batches, run_links, tracking


def require_file(path: str) -> None:
    """A file of observations given to the monitor exists, or the refusal naming it (`sparsepilot monitor
    NAME --observations FILE` asks before its flow starts, the flow again for any other caller): not
    found, or a directory (`rollout.observations_io.not_a_file`)."""
    from rollout.observations_io import ObservationImportError, not_a_file

    if why := not_a_file(path):
        raise ObservationImportError(f"{why}; nothing was imported")


@flow_task("monitor-target")
def monitor_target(use_case: str, used_request_ids: bool) -> dict[str, Any] | None:
    return pilot_batches.monitor_target(use_case, used_request_ids=used_request_ids)


@flow_task("monitor-store-import")
def store_import(
    info: dict[str, Any], files: list[tuple[str, list[tuple[int, dict]]]], batch_id: str
) -> dict[str, Any]:
    return pilot_batches.store_monitor_import(info, files, batch_id)


@flow_task("monitor-note-skip")
def note_skip(use_case: str, info: dict[str, Any], reason: str, explanation: str) -> bool:
    return pilot_batches.note_monitor_skip(use_case, info, reason, explanation)


def _batch_id(info: dict[str, Any], rows: list[dict], void: dict[str, str] | None = None) -> str:
    """The look's batch: its (request, arm) pairs, and its void requests (no arm). Their values need not
    enter it: an import whose pairs are stored with other values is refused (`store_monitor_import`), so
    the same pairs are the same rows. Other pairs, all judged already (a page of an earlier look's files
    given again alone), are another batch with nothing new: no look (`store_monitor_import`)."""
    pairs = [(r["request_id"], r["arm"]) for r in rows] + [(rid, "void") for rid in void or {}]
    return f"m-{info['step_id']}-{stable_key(sorted(pairs))[:24]}"


@flow_task("monitor-decide")
def decide_monitor(
    use_case: str, info: dict[str, Any], rows: list[dict], check: dict[str, Any], batch_id: str
) -> dict:
    return decisions.monitor_look(use_case, info, rows, check, batch_id)


@sparsepilot_flow("monitor")
@under_lease("monitor")
def monitor_flow(
    use_case: str,
    observations_file: str | list[str] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    from flows.pilot import (
        answer_measured,
        arms_on_this_host,
        default_max_new_tokens,
        latency_judged,
        next_requests,
        store_batch,
        validate_batch,
        warn_if_overloaded,
    )
    from flows.promote import finish_unfinished, rollback_flow

    logger = get_run_logger()
    # several files (the pages of one export) are ONE look, their rows in stream-key order together
    files = [observations_file] if isinstance(observations_file, str) else list(observations_file or [])
    files = pilot_batches.distinct_paths(files)  # a file given twice is one file, checked as one alone
    observations_file = ", ".join(files) or None  # how the refusals below name them
    for path in files:  # whatever the state: a file that is not there is never a quiet success
        require_file(path)
    # a rollback decided earlier comes before any new look; the monitor is its finisher
    finished = finish_unfinished(use_case, by=audit.MONITOR_ACTOR)
    if finished is not None:
        catch_up_logs(log_missing_looks, use_case)
        if observations_file:  # the file's rows were served before that decision took effect: not imported
            raise pilot_batches.finished_before_import(use_case, finished["finished"], observations_file)
        return {"status": "finished", **finished}
    info = monitor_target(use_case, used_request_ids=observations_file is None)  # ids to draw fresh requests
    if info is None:
        catch_up_logs(log_missing_looks, use_case)
        if observations_file:  # a file given to a monitor with no champion: an error, the file not imported
            raise pilot_batches.nothing_to_monitor(use_case, observations_file)
        return {"status": "skipped", "explanation": f"{use_case}: nothing promoted, nothing to monitor"}
    if observations_file:
        from rollout.observations_io import read_numbered

        read = [(path, read_numbered(path, require_arm="treatment")) for path in files]  # refusals: path:LINE
        rows = [row for _, numbered in read for _, row in numbered]
        batch_id = _batch_id(info, rows)
        # a file that fails its checks, or conflicts with what is stored, is refused: nothing stored, no look
        stored = store_import(info, read, batch_id)
        if stored["nothing_new"]:  # every row judged by an earlier look (a page of it given again): no look
            explanation = f"{use_case}: {stored['nothing_new']}"
            logger.info("%s", explanation)
            catch_up_logs(log_missing_looks, use_case)
            return {"status": "nothing-new", "explanation": explanation, "rows": len(rows)}
        check = stored["check"]
        source = "imported"
        latency, caveat = None, None  # an import's rows carry no host load of ours, nor our arms' answers
    else:
        # the promoted pilot's spec version: its traffic source, arms and batch size, not a later version's
        ctx = load_context(use_case, info["spec_version"])
        # a control arm on a served endpoint: what the quality checks then compare, said once per run
        caveat = champion.monitor_control_caveat(use_case, ctx.spec.to_dict())
        if caveat:
            logger.warning("%s", caveat)
        requests = next_requests(
            ctx, set(info["used_request_ids"]), info["salt"], batch_size or ctx.spec.rollout.batch_size
        )
        if not requests:
            explanation = (
                f"{use_case}: traffic exhausted: every request of the source was used once, so the monitor "
                "did not look; import production observations with --observations to keep monitoring"
            )
            logger.warning("%s", explanation)
            note_skip(use_case, info, "traffic-exhausted", explanation)
            return {"status": "skipped", "explanation": explanation, **_said(caveat)}
        rows, void, load = answer_measured(
            ctx, info, requests, max_new_tokens or default_max_new_tokens(ctx.spec), max_prompt_tokens
        )
        arms_here = arms_on_this_host(ctx)
        warn_if_overloaded(logger, use_case, rows, load, arms_here)
        latency = latency_judged(rows, arms_here)  # the rows the latency guardrail judges, those left out
        source = "monitor"
        batch_id = _batch_id(info, rows, void)
        if not rows:  # every request void: the dense model gave no reference; nothing of the champion seen
            store_batch(info["step_id"], rows, batch_id, source, void)
            explanation = (
                f"{use_case}: every sampled request ({len(void)}) is void: the control arm gave no reference "
                "to score against, so the monitor did not look"
            )
            logger.warning("%s", explanation)
            note_skip(use_case, info, "no-reference", explanation)
            return {"status": "skipped", "explanation": explanation, "void": len(void), **_said(caveat)}
        check = validate_batch(rows, [rid for rid, _ in requests], "monitor")
        if check["passed"]:  # the monitor's own answers failing their check: the look is INVALID (fail-safe)
            store_batch(info["step_id"], rows, batch_id, source, void)
    result = decide_monitor(use_case, info, rows, check, batch_id)
    if latency is not None:
        result["latency"] = latency
    result.update(_said(caveat))
    logger.info("%s", result["explanation"])
    if result["automatic_rollback"] and result["resolution"] is None:
        # the fail-safe first: an MLflow log that fails must not keep a breached champion serving
        result["rollback"] = rollback_flow(
            decision_id=result["decision_id"],
            reason=result["explanation"],
            automatic=True,
            actor=audit.MONITOR_ACTOR,
        )
    if result["created"]:  # a retried or repeated look finds its decision (and its run) already there
        log_look(use_case, {**result, "rows": len(rows)}, source)
    # an earlier look whose MLflow log failed: after this look and its fail-safe, never before them (an
    # MLflow client retrying for minutes would delay the alarm)
    catch_up_logs(log_missing_looks, use_case)
    return result


def _said(caveat: str | None) -> dict[str, str]:
    """A sampled run's result's `control_caveat` (`champion.monitor_control_caveat`), where there is one:
    `sparsepilot monitor` prints it as a warning, and its JSON carries it."""
    return {"control_caveat": caveat} if caveat else {}


@flow_task("monitor-log-mlflow")
def log_look(use_case: str, result: dict[str, Any], source: str) -> str:
    """The look's MLflow run, recorded on its decision (one whose log failed is logged by the next
    monitor run: `log_missing_looks`)."""
    run_id = _log_look(use_case, result, {"source": source})
    run_links.decision_logged(result["decision_id"], run_id)
    return run_id


@flow_task("monitor-log-missing")
def log_missing_looks(use_case: str) -> list[str]:
    """Each look of the latest pilot whose MLflow run is not recorded (its log failed), logged from its
    decision and recorded; a run logged before its record failed is found in MLflow, not logged twice."""
    out = []
    for look in run_links.unlogged_monitor_decisions(use_case):
        params = {"decision_id": look["decision_id"]}
        run_id = tracking.find_run(use_case, "monitor", params) or _log_look(use_case, look, {})
        run_links.decision_logged(look["decision_id"], run_id)
        out.append(run_id)
    return out


def _log_look(use_case: str, look: dict[str, Any], params: dict[str, Any]) -> str:
    return log_run(
        use_case,
        run_name="monitor",
        params={"decision_id": look["decision_id"], "rows": look["rows"], **params},
        metrics={"healthy": 1.0 if look["outcome"] == "GO" else 0.0},
        tags={"sparsepilot.flow": "monitor", "sparsepilot.outcome": look["outcome"]},
        json_artifacts={"monitor.json": look},
    )
