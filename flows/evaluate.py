"""`evaluate(use_case)`: quality and speed of the challenger vs dense on the use case's own data
(sparse_core.evaluate: fidelity, long-context probes, task scores, prefill speed at the dataset's length
mix, pictures), the ROI projection with its interval (rollout.roi), on CUDA when present else CPU — the
device is recorded. Idempotent per (model version, suite settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger

from flows.common import (
    UseCaseContext,
    flow_run_id,
    flow_task,
    get_model,
    load_context,
    log_run,
    mark_not_recorded,
    sparsepilot_flow,
    stable_key,
    under_lease,
    version_plan,
)
from rollout import audit, leases, runs
from sparse_core.errors import SparsePilotError


class EvaluationFailed(SparsePilotError, RuntimeError):
    pass


def suite_settings(ctx: UseCaseContext, quick: bool, overrides: dict[str, Any] | None) -> dict[str, Any]:
    # every row kept apart from calibration (a quarter of the dataset: 16-18 for the samples), whose
    # bounds on the task-score change are then as tight as those rows allow; quick scores 2
    s: dict[str, Any] = {"task": ctx.task, "max_new_tokens": 32, "max_dataset_rows": None}
    if quick:
        s.update(
            {
                "n_fidelity_texts": 1,
                "fidelity_seq_len": 1024,
                "probe_lengths": [1024],
                "probe_kinds": ["passkey"],
                "probe_depths": [0.5],
                "max_dataset_rows": 2,
                "max_new_tokens": 16,
                "speed_repeats": 3,
                "max_speed_buckets": 1,
                "layer_errors": False,
            }
        )
    s.update(overrides or {})
    return s


@flow_task("evaluation-target")
def target_version(ctx: UseCaseContext) -> dict[str, Any]:
    target = runs.latest_calibrated_version(ctx.use_case_id)
    if target is None:
        raise EvaluationFailed(f"{ctx.name}: nothing calibrated yet; run `sparsepilot calibrate {ctx.name}`")
    return target


@flow_task("evaluation-run-open")
def open_run(ctx: UseCaseContext, mv_id: int, key: str, actor: str) -> dict[str, Any]:
    return runs.open_evaluation(ctx.use_case_id, mv_id, key, flow_run_id(), actor)


@flow_task("evaluate-model", retries=0)
def run_evaluation(
    ctx: UseCaseContext, target: dict[str, Any], settings: dict[str, Any], pictures_dir: str
) -> dict:
    from rollout.dataset_split import nothing_to_score
    from sparse_core.evaluation import EvalSuite, evaluate
    from sparse_core.tasks import TaskRow

    logger = get_run_logger()
    model, tok = get_model(target["base_model_ref"])
    plan = version_plan(target["plan"], target["mlflow_model"], target["mlflow_version"])

    def task_row(r: dict[str, Any]) -> TaskRow:
        return TaskRow(r["prompt"], r.get("reference") or "", None, r["id"])

    _, held = ctx.split()  # rows calibration never read (rollout.dataset_split)
    rows = [task_row(r) for r in held if r.get("reference")]
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    # the speed's length mix comes from every row (the use case's traffic sample): lengths fit nothing
    speed_rows = [task_row(r) for r in ctx.rows]
    suite = EvalSuite(dataset_rows=rows or None, speed_rows=speed_rows, pictures_dir=pictures_dir, **kw)

    def progress(stage: str, done: int, total: int) -> None:
        logger.info("%s: evaluation %s %d/%d", ctx.name, stage, done, total)
        leases.check_held()  # a run that lost its use case stops here, not after the whole evaluation

    report = evaluate(model, tok, plan, suite, progress=progress)
    unscored = nothing_to_score(len(ctx.rows), len(held), len(rows))
    if report.tasks is not None:  # which rows: the evaluation's own, out of how many
        report.tasks["rows_from"] = {"split": "evaluation", "rows": len(held), "dataset_rows": len(ctx.rows)}
    # dense decode tokens/s, timed by the evaluation at the use case's lengths on the served cache
    dec = (report.decode or {}).get("summary") or {}
    decode_tps = dec.get("weighted_dense_tokens_per_s")
    out = report.to_dict()
    if unscored:  # recorded with the run (rollout.runs.evaluation_summary), said in the flow's last line
        out["tasks_not_scored"] = unscored
    return {"report": out, "metrics": report.metrics(), "decode_tps": decode_tps}


def _rounds(
    rows: list[dict[str, Any]], dense: str, sparse: str
) -> tuple[int, tuple[float, float, float] | None]:
    """A length mix's rounds as pairs (round i's weighted dense and sparse totals) and the ROI's
    (estimate, low, high) over them (rollout.roi.speedup_interval); None below 2 rounds."""
    from rollout.roi import speedup_interval
    from sparse_core.speedup import weighted_pairs

    d, s = weighted_pairs([(r["weight"], r[dense], r[sparse]) for r in rows])
    return len(d), speedup_interval(d, s) if len(d) >= 2 else None


def roi_from_report(spec: Any, report: dict[str, Any], decode_tps: float | None) -> dict[str, Any]:
    """ROI at the use case's traffic, from the measured weighted throughputs. The prefill speed-up and
    the sparse decode throughput, with their intervals, come from the paired rounds (prefills back to
    back; decode runs), at the ROI's confidence; the estimate from the same pairs, so it lies inside.
    Output tokens are priced at the sparse decode throughput when the plan decodes sparsely."""
    from rollout.roi import decode_outcome, roi_for_spec

    rows = report.get("speed") or []
    summ = report.get("speed_summary") or {}
    if not rows or not summ.get("weighted_dense_tokens_per_s"):
        raise EvaluationFailed("the evaluation measured no speed; ROI needs prefill timings")
    n, paired = _rounds(rows, "dense_seconds", "sparse_seconds")
    interval = None
    sparse_tps = summ["weighted_sparse_tokens_per_s"]
    if paired:
        est, lo, hi = paired
        interval = (lo, hi)
        sparse_tps = summ["weighted_dense_tokens_per_s"] * est
    # Output tokens at the decode throughputs the evaluation measured at the use case's lengths
    # (report["decode"]); for a plan that decodes sparsely, the sparse arm's side by side, with its
    # interval over the runs; for one without a decode section, the dense figure in both arms.
    dec = (report.get("decode") or {}).get("summary")
    sparse_decode = decode_interval = None
    if dec:
        decode_tps = dec["weighted_dense_tokens_per_s"]
    if dec and dec.get("sparse_decode", True):
        sparse_decode = dec["weighted_sparse_tokens_per_s"]
        decode_interval = (dec["weighted_sparse_tokens_per_s_low"], dec["weighted_sparse_tokens_per_s_high"])
        _, runs = _rounds(report["decode"]["rows"], "dense_seconds_per_token", "sparse_seconds_per_token")
        if runs and decode_tps:
            sparse_decode = decode_tps * runs[0]
            decode_interval = (decode_tps * runs[1], decode_tps * runs[2])
    roi = roi_for_spec(
        spec,
        dense_tps=summ["weighted_dense_tokens_per_s"],
        sparse_tps=sparse_tps,
        speedup_interval=interval,
        decode_tps=decode_tps,
        sparse_decode_tps=sparse_decode,
        sparse_decode_interval=decode_interval,
    )
    out = roi.to_dict()
    out["speedup_interval_from"] = f"{n} paired rounds" if interval else "point estimate only"
    # threads, the host's load, pairs retimed for overload: of the prefill timings and of the decode runs
    # and of the calibration's break-even timings behind the decode line
    out["timing_host"] = {
        "prefill": summ.get("host"),
        "decode": (dec or {}).get("host"),
        "break_even": (dec or {}).get("break_even_host"),
        # the contexts the decode runs timed: where a break-even moved by overload would change the ROI
        "decode_context": (dec or {}).get("context_tokens"),
    }
    sparse = bool(dec) and dec.get("sparse_decode", True)
    out["decode_from"] = "sparse decode measured side by side" if sparse else "dense decode in both arms"
    out["decode"] = decode_outcome(report.get("decode"), roi)  # the ROI's decode line
    return out


@flow_task("evaluation-record")
def record(
    ctx: UseCaseContext,
    run_pk: int,
    result: dict[str, Any],
    roi: dict[str, Any],
    mlflow_run_id: str,
    actor: str,
) -> dict:
    return runs.evaluation_succeeded(
        ctx.name,
        run_pk,
        report=result["report"],
        roi=roi,
        mlflow_run_id=mlflow_run_id,
        spec_version=ctx.spec_version,
        actor=actor,
    )


@flow_task("evaluation-failed")
def mark_failed(run_pk: int, error: str, actor: str) -> None:
    runs.evaluation_failed(run_pk, error, actor)


@sparsepilot_flow("evaluate")
@under_lease("evaluate")
def evaluate_flow(
    use_case: str, quick: bool = False, suite: dict[str, Any] | None = None, actor: str = audit.SYSTEM_ACTOR
) -> dict[str, Any]:
    """Measure the challenger against dense and price it (ROI). Its audit rows and phase move name
    ``actor``: the pipeline (the cycle, the main job), or the person who ran `sparsepilot evaluate NAME`
    (`sparsepilot.commands.auth.acting_person`)."""
    from rollout.settings import get_settings

    logger = get_run_logger()
    ctx = load_context(use_case)
    target = target_version(ctx)
    settings = suite_settings(ctx, quick, suite)
    key = "evaluate:" + stable_key(target["model_version_id"], settings, ctx.spec_hash)
    run = open_run(ctx, target["model_version_id"], key, actor)
    if run["status"] == "succeeded":
        logger.info("%s: evaluation %s already done", use_case, run["id"])
        if run["summary"].get("measured_under_overload"):
            logger.info("%s: %s", use_case, run["summary"]["measured_under_overload"])
        return {**run["summary"], "reused": True}
    pictures = Path(get_settings().home) / "artifacts" / use_case / f"evaluation-{run['id']}"
    pictures.mkdir(parents=True, exist_ok=True)
    mlflow_run_id = None
    try:
        result = run_evaluation(ctx, target, settings, str(pictures))
        roi = roi_from_report(ctx.spec, result["report"], result["decode_tps"])
        metrics = {
            **result["metrics"],
            "decode_tps": result["decode_tps"],
            "roi.saved_usd_month": roi["saved_usd_month"],
            "roi.saved_usd_month_low": roi["saved_usd_month_low"],
            "roi.saved_usd_month_high": roi["saved_usd_month_high"],
            "roi.effective_speedup": roi["effective_speedup"],
            "roi.speedup": roi["inputs"]["speedup"],
            **roi_intervals(roi),
        }
        leases.check_held()  # lost while its last step ran: log nothing the state DB would then refuse
        mlflow_run_id = log_run(
            use_case,
            run_name="evaluate",
            params={
                "suite": settings,
                "model_version_id": target["model_version_id"],
                "mlflow_version": target["mlflow_version"],
            },
            metrics=metrics,
            tags={"sparsepilot.flow": "evaluate", "sparsepilot.device": result["report"].get("device", "")},
            json_artifacts={"evaluation_report.json": result["report"], "roi.json": roi},
            files=[p for p in (result["report"].get("artifacts") or {}).values() if Path(p).is_file()],
        )
        summary = record(ctx, run["id"], result, roi, mlflow_run_id, actor)
    except Exception as exc:
        mark_not_recorded(mlflow_run_id, exc)
        mark_failed(run["id"], f"{type(exc).__name__}: {exc}", actor)
        raise
    # at INFO with the rest of the flow's progress: a console judged free of WARNING lines (the main job's
    # tests) must not fail because the host was busy; the line itself says it
    logger.info("%s", summary_line(use_case, summary))
    # a plan that keeps every block saves nothing, whatever the ROI priced its timing noise at (plan_money)
    return {**summary, "reused": False, "verdict": summary.get("saves_nothing") or roi.get("verdict")}


def roi_intervals(roi: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of the speed-up interval the dollars are priced at (the ROI's 95%,
    `rollout.roi.ROI_CONFIDENCE`; the evaluation's own `speed.*` interval is its 90%): the prefill
    speed-up's ends and the per-request (effective) speed-up's, so that `roi.saved_usd_month_low/high`
    trace to a speed-up in the run. None where no interval was measured (one timing pair: its "ends" are
    the estimate, which the state DB does not store as an interval either)."""
    if not roi["inputs"].get("interval_measured", True):
        return {}
    return {
        "roi.speedup_low": roi["inputs"]["speedup_low"],
        "roi.speedup_high": roi["inputs"]["speedup_high"],
        "roi.effective_speedup_low": roi["effective_speedup_low"],
        "roi.effective_speedup_high": roi["effective_speedup_high"],
    }


def summary_line(use_case: str, summary: dict[str, Any]) -> str:
    """The flow's closing log line: the speed-up with its interval and the $/month saved; that it has no
    task score, and why, where no row kept apart from calibration could be scored (`tasks_not_scored`);
    and, where the timings were kept under overload, that warning (`measured_under_overload`)."""
    from rollout.roi import NO_INTERVAL, usd

    ends = (summary["speedup_low"], summary["speedup_high"])
    interval = NO_INTERVAL if None in ends else "[{:.2f}, {:.2f}]".format(*ends)
    saved = summary["savings_month_usd"]  # a loss is said as one, as the verdict says it (rollout.roi)
    money = f"{usd(saved)}/month saved" if saved >= 0 else f"{usd(-saved)}/month more"
    line = f"{use_case}: speed-up {summary['speedup']:.2f}x {interval} on {summary['device']}, {money}"
    notes = [n for n in (summary.get("tasks_not_scored"), summary.get("measured_under_overload")) if n]
    return "; ".join([line, *notes])
