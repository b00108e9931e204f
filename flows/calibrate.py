"""`calibrate(use_case)`: validate the dataset (Great Expectations) -> calibrate a sparse plan to the use
case's quality budget on its own prompts -> register the model version in MLflow with alias `challenger`.

Idempotent: the CalibrationRun is keyed by (use case, what calibration reads of the spec:
`rollout.recalibration.calibration_inputs`, settings, the model's weights), so a spec version that
changes only what calibration does not read (a schedule, a cost) reuses the calibration before it, and
says so (`reused_from`); a key an earlier build spelled with the whole spec's hash is still found. A
finished run with the same key is returned as it is (its version made the challenger again if another
calibration moved it since: a spec reverted to an earlier version), a failed or interrupted one is redone
in the same row. The first
calibration also registers the dense baseline (every layer dense), which is what a rollback after the
first promotion returns to.

Its audit rows and phase moves name ``actor``: the pipeline (the cycle, the main job), or the person who
ran `sparsepilot calibrate NAME` (`sparsepilot.commands.auth.acting_person`)."""

from __future__ import annotations

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
    remember_plan,
    sparsepilot_flow,
    stable_key,
    under_lease,
)
from rollout import audit, leases, registry, runs, tracking
from rollout.calibration_outcome import budget_words, met_budget
from rollout.dataset_split import EVALUATION_SHARE
from rollout.redact import redact
from rollout.task_budget import task_rows, task_verdict
from rollout.validation import QUICK_HOLDOUT_FRACTION, QUICK_MAX_SEQ_LEN, quick_windows_apply
from sparse_core.corpus import SPLIT_RULE
from sparse_core.errors import SparsePilotError
from sparse_core.fingerprint import weights_fingerprint


class CalibrationFailed(SparsePilotError, RuntimeError):
    pass


@flow_task("validate-dataset", retries=1)
def validate_dataset(ctx: UseCaseContext) -> dict[str, Any]:
    from rollout.validation import validate_dataset as gx_validate

    result = gx_validate(ctx.dataset_path, ctx.spec)
    if not result.ok:
        raise CalibrationFailed(result.summary())
    return result.to_dict()


def limits_for(ctx: UseCaseContext, quick: bool, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Calibration limits from the spec (quick: the cheap settings of the main job, never looser than
    the spec's own; with a `confidence` or `sensitivity_windows` quick keeps the spec's windows, which
    the spec was checked to have enough of for the bound and for the windows kept apart)."""
    c = ctx.spec.quality_budget.calibration
    lim: dict[str, Any] = {
        "max_texts": c.max_texts,
        "max_seq_len": c.max_seq_len,
        "holdout_fraction": c.holdout_fraction,
    }
    if c.drop_measure != "mass":  # the default stays out of the settings, so earlier runs' keys hold
        lim["drop_measure"] = c.drop_measure
    if c.confidence is not None:  # likewise an unset confidence
        lim.update(confidence=c.confidence, bound_unit=c.bound_unit)
    if c.sensitivity_windows:  # and no windows kept apart
        lim["sensitivity_windows"] = c.sensitivity_windows
    if quick:
        # a bound keeps the spec's windows (the held-out ones are its units), and so do windows kept
        # apart (quick's 2 calibration windows would leave the learned estimator none of its own)
        if quick_windows_apply(c):
            lim.update(
                {
                    # 2 calibration windows + 1 held out; windows up to 2k tokens: at 1k the plans come
                    # out all but dense (little attention to skip), at the specs' 3-4k it costs minutes
                    "max_texts": min(c.max_texts, 3),
                    "max_seq_len": min(c.max_seq_len, QUICK_MAX_SEQ_LEN),
                    "holdout_fraction": max(c.holdout_fraction, QUICK_HOLDOUT_FRACTION),
                }
            )
        lim.update(
            {
                "taus": (0.8, 0.9, 0.95, 0.98, 0.99, 0.995),
                "max_joint_checks": 3,
                "gate_steps": 120,
                "max_task_rows": 4,  # task bound (quality_budget.task_delta): rows scored per check
            }
        )
    if ctx.spec.quality_budget.task_delta is not None and not quick:
        # a valid task bound needs rows (~5 / task_delta of them even when none drops): every row of the
        # calibration split with a reference, or the spec's cap; quick keeps its 4 (and cannot certify)
        lim["max_task_rows"] = c.task_rows
    d = ctx.spec.quality_budget.decode
    if d is not None:  # sparse decode: a decode budget calibrated on generated continuations
        # an unset confidence (and the sensitivity windows only it reads) stays out of the settings, and
        # so does windows apart left off, so earlier runs' keys hold
        unset = {"confidence", "sensitivity_prompts"} if d.confidence is None else set()
        if not d.sensitivity_apart:
            unset.add("sensitivity_apart")
        lim["decode"] = d.model_dump(exclude=unset)
        if quick and d.confidence is None:  # fewer, shorter continuations, but after prompts of the
            # use case's own length: budgets found at 1k tokens were too sparse at docs-qa's 3k
            # (agreement 100% -> 91%); a bound (confidence) needs the spec's prompts (its unit)
            lim["decode"].update(new_tokens=min(d.new_tokens, 32), n_prompts=1)
    lim.update(overrides or {})
    return lim


@flow_task("calibration-run-open")
def open_run(
    ctx: UseCaseContext, key: str, settings: dict[str, Any], actor: str, legacy: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The CalibrationRun for this key (or a succeeded one under a `legacy` key): returned as-is when it
    succeeded, else (re)marked running."""
    return runs.open_calibration(
        ctx.use_case_id, ctx.spec_version, key, settings, flow_run_id(), actor, legacy_keys=legacy
    )


def reused_under(calibrated_under: int | None, version: int) -> str | None:
    """A reused calibration of another spec version, in the output's words (pure): the current one changed
    nothing calibration reads (rollout.recalibration). None: it was calibrated under this version."""
    if calibrated_under is None or calibrated_under == version:
        return None
    return f"calibrated under spec v{calibrated_under}: v{version} changed nothing calibration reads"


def task_rows_of(rows: list[dict[str, Any]], holdout_fraction: float, seed: int) -> list[Any]:
    """The rows a task bound is measured on: the calibration part of the calibration split's prompts
    (what calibration packs into its calibration windows; the held-out part judges the fidelity of the
    eps search's candidates), those with a reference: `rollout.task_budget.task_rows`, which the dataset
    validator counts with when a use case is added."""
    from sparse_core.tasks import TaskRow

    return [
        TaskRow(prompt=r["prompt"], reference=r["reference"], task=r.get("task"))
        for r in task_rows(rows, holdout_fraction, seed)
    ]


# settings that are in the calibration's key and record but are no calibration limits
KEY_ONLY = ("estimator", "seed", "evaluation_share", "split_rule")


@flow_task("calibrate-plan", retries=0)
def calibrate_plan(ctx: UseCaseContext, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from sparse_core.calibration import Budget, CalibrationLimits, calibrate
    from sparse_core.corpus import texts_shortfall

    logger = get_run_logger()
    model, tok = get_model(ctx.spec.model)
    qb = ctx.spec.quality_budget
    budget = Budget(kl=qb.kl, agree=qb.agree, nll_delta=qb.nll_delta, task_delta=qb.task_delta)
    lim_kw = {k: v for k, v in settings.items() if k not in KEY_ONLY}
    limits = CalibrationLimits(**lim_kw)
    rows, _ = ctx.split()  # the evaluation's rows are never read here (rollout.dataset_split)
    texts = [r["prompt"] for r in rows]
    short = texts_shortfall(
        texts,
        lambda t: len(tok(t, add_special_tokens=False)["input_ids"]),
        limits.holdout_fraction,
        settings["seed"],
        block_size=limits.block_size,
        max_seq_len=limits.max_seq_len,
        separator_tokens=int(tok.eos_token_id is not None),
    )
    if short:  # `usecase add` refuses such a dataset on its token counts; these are the model's own
        raise CalibrationFailed(f"dataset {ctx.spec.dataset.path} ({len(rows)} calibration rows): {short}")
    task_rows = task_rows_of(rows, limits.holdout_fraction, settings["seed"])

    def progress(phase: str, done: int, total: int) -> None:
        logger.info("%s: calibration %s %d/%d", ctx.name, phase, done, total)
        leases.check_held()  # a run that lost its use case stops here, not after the whole calibration

    plan, report = calibrate(
        model,
        tok,
        texts,
        budget,
        estimator=settings["estimator"],
        seed=settings["seed"],
        limits=limits,
        progress=progress,
        task_rows=task_rows if qb.task_delta is not None else None,
        task=ctx.spec.dataset.task,
    )
    remember_plan(plan)
    return plan, report.to_dict()


TAG_CALIBRATION_RUN = "sparsepilot.calibration_run"


def log_calibration(
    ctx: UseCaseContext, run_pk: int, settings: dict[str, Any], report: dict[str, Any], validation: Any
) -> str:
    """The MLflow run of calibration run `run_pk`: the one an earlier attempt logged for the same plan
    (it died after its log, before the state DB recorded it: a retry must not log a second one, and the
    model version that attempt registered points at it), else a new one."""
    plan_hash = report.get("plan_hash", "")
    found = tracking.find_run(ctx.name, "calibrate", {"calibration_run_id": run_pk, "plan_hash": plan_hash})
    if found is not None:
        return found
    return log_run(
        ctx.name,
        run_name="calibrate",
        params={
            "calibration_run_id": run_pk,
            "plan_hash": plan_hash,
            "settings": settings,
            "budget": report.get("budget"),
            "spec_version": ctx.spec_version,
        },
        metrics=_flat_metrics(report),
        tags={
            "sparsepilot.flow": "calibrate",
            "sparsepilot.plan_hash": plan_hash,
            TAG_CALIBRATION_RUN: str(run_pk),
        },
        json_artifacts={"calibration_report.json": report, "dataset_validation.json": validation},
    )


@flow_task("retire-interrupted-runs")
def retire_interrupted(ctx: UseCaseContext, run_pk: int, mlflow_run_id: str) -> list[str]:
    """Tag `sparsepilot.not_recorded` (and end, when still RUNNING) the calibrate runs that an earlier,
    killed attempt of this calibration run logged and the state DB does not cite (another plan: the
    attempt was cut off inside its own log). Best effort: the calibration is recorded already."""
    why = f"an interrupted attempt of calibration run {run_pk}; the state DB records run {mlflow_run_id}"
    try:
        return tracking.retire_runs(
            ctx.name, "calibrate", tags={TAG_CALIBRATION_RUN: str(run_pk)}, keep=mlflow_run_id, why=why
        )
    except Exception as exc:  # noqa: BLE001 - the calibration stands; a later retry tags them
        get_run_logger().warning(
            "could not tag earlier MLflow runs of calibration %s: %s", run_pk, redact(exc)
        )
        return []


@flow_task("register-challenger")
def register_challenger(
    ctx: UseCaseContext, run_pk: int, plan: Any, report: dict[str, Any], mlflow_run_id: str, actor: str
) -> dict[str, Any]:
    """Register the plan's model version (+ the dense baseline once) and point `challenger` at it."""
    mv, move = registry.register_challenger(
        ctx.name,
        plan,
        ctx.spec.model,
        run_id=mlflow_run_id,
        n_layers=len(report.get("layer_density") or []) or None,
        density=report.get("density"),
        calibration_run=run_pk,
    )
    runs.calibration_succeeded(
        ctx.name,
        run_pk,
        model_version=mv,
        mlflow_run_id=mlflow_run_id,
        metrics={**_flat_metrics(report), **_budget_flags(report)},
        density=report.get("density"),
        actor=actor,
    )
    return {"model_version_id": mv.id, "mlflow_version": mv.mlflow_version, "alias_move_id": move.id}


@flow_task("reuse-challenger")
def reuse_challenger(ctx: UseCaseContext, run: dict[str, Any], actor: str) -> dict[str, Any] | None:
    """A reused run's version made the challenger again when another calibration moved it since (the spec
    was reverted to the version this run calibrated); None when it is the challenger already."""
    move = registry.repoint_challenger(
        ctx.name, model_version_id=run["model_version_id"], calibration_run=run["id"]
    )
    if move is None:
        return None
    runs.calibration_reused(
        ctx.name, run["id"], mlflow_version=move.to_version, alias_move_id=move.id, actor=actor
    )
    return {"mlflow_version": move.to_version, "alias_move_id": move.id}


@flow_task("calibration-run-failed")
def mark_failed(ctx: UseCaseContext, run_pk: int, error: str, actor: str) -> None:
    runs.calibration_failed(ctx.use_case_id, run_pk, error, actor)


def _budget_flags(report: dict[str, Any]) -> dict[str, bool]:
    """`met_budget`: a sparse plan met the budget, its prefill part or its decode part (what the cycle,
    the main job and the pilot read: rollout.calibration_outcome); `prefill_met_budget`: the prefill's."""
    return {"met_budget": met_budget(report), "prefill_met_budget": bool(report.get("met_budget"))}


def _flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    fid = report.get("fidelity") or {}
    out = {
        "density": report.get("density"),
        "predicted_density": report.get("predicted_density"),
        "measured_density": report.get("measured_density"),  # on the held-out windows
        "kl": fid.get("kl"),
        "agree": fid.get("agree"),
        "nll_delta": fid.get("nll_delta"),
        "dense_layers": float(len(report.get("dense_layers") or [])),
        **_task_metrics(report.get("task") or {}),
        "seconds_total": (report.get("seconds") or {}).get("total"),
    }
    dec = report.get("decode")
    if dec:  # the decode budget, calibrated on generated tokens
        dfid = dec.get("fidelity") or {}
        out.update(
            decode_density=dec.get("density"),
            decode_met_budget=float(bool(dec.get("met_budget"))),
            decode_kl=dfid.get("kl"),
            decode_agree=dfid.get("agree"),
        )
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


def _task_metrics(task: dict[str, Any]) -> dict[str, Any]:
    """The task bound's figures (`rollout.task_budget.task_verdict` reads them back); none without one."""
    if not task:
        return {}
    certifiable = task.get("certifiable")
    return {
        "task_delta": task.get("task_delta"),
        "task_delta_upper": task.get("task_delta_upper"),
        "task_bound": task.get("bound"),
        "task_n_rows": task.get("n_rows"),
        "task_rows_scored": task.get("rows_scored"),
        "task_rows_needed": task.get("rows_needed"),
        "task_certifiable": None if certifiable is None else float(bool(certifiable)),
    }


@sparsepilot_flow("calibrate")
@under_lease("calibrate")
def calibrate_flow(
    use_case: str,
    quick: bool = False,
    limits: dict[str, Any] | None = None,
    actor: str = audit.SYSTEM_ACTOR,
) -> dict[str, Any]:
    logger = get_run_logger()
    ctx = load_context(use_case)
    validation = validate_dataset(ctx)
    settings = limits_for(ctx, quick, limits)
    settings["estimator"] = ctx.spec.quality_budget.estimator
    settings["seed"] = ctx.spec.quality_budget.calibration.seed
    # the rows kept apart for the evaluation (rollout.dataset_split) are in the key: a plan calibrated
    # before they were kept apart read them, and is calibrated again rather than reused
    settings["evaluation_share"] = EVALUATION_SHARE
    # and the held-out split's rule: a plan from an earlier rule held out other texts (SPLIT_RULE)
    settings["split_rule"] = SPLIT_RULE
    # the weights at the model path too: a fine-tune updated in place is calibrated again, not reused
    weights = weights_fingerprint(ctx.spec.model)
    # the key names what calibration reads of the spec (rollout.recalibration.calibration_inputs), not the
    # whole spec: a version that changes only its schedule or costs reuses the calibration before it
    parts = runs.calibration_key_parts(ctx.use_case_id, ctx.spec_version)
    key = "calibrate:" + stable_key(ctx.use_case_id, parts["inputs"], settings, weights)
    # the keys an earlier build opened the same work under (the whole spec's hash): still found
    legacy = tuple(
        "calibrate:" + stable_key(ctx.use_case_id, h, ctx.spec.model, settings, weights)
        for h in parts["spec_hashes"]
    )
    run = open_run(ctx, key, settings, actor, legacy)
    if run["status"] == "succeeded":
        moved = reuse_challenger(ctx, run, actor)
        under = reused_under(run["spec_version"], ctx.spec_version)
        logger.info(
            "%s: calibration %s already done (model version %s)%s%s",
            use_case,
            run["id"],
            run["model_version_id"],
            f" {under}" if under else "",
            f"; @challenger back on its version {moved['mlflow_version']}" if moved else "",
        )
        task = task_verdict(run["metrics"] or {})
        return {
            **({"task_bound_verdict": task} if task else {}),
            "calibration_run_id": run["id"],
            "model_version_id": run["model_version_id"],
            "reused": True,
            **({"reused_from": under} if under else {}),
            "challenger_moved": moved is not None,
            **run["metrics"],
            **(moved or {}),
        }
    mlflow_run_id = None
    try:
        plan, report = calibrate_plan(ctx, settings)
        leases.check_held()  # lost while its last step ran: log nothing the state DB would then refuse
        mlflow_run_id = log_calibration(ctx, run["id"], settings, report, validation)
        reg = register_challenger(ctx, run["id"], plan, report, mlflow_run_id, actor)
        retire_interrupted(ctx, run["id"], mlflow_run_id)
    except Exception as exc:
        mark_not_recorded(mlflow_run_id, exc)
        mark_failed(ctx, run["id"], f"{type(exc).__name__}: {exc}", actor)
        raise
    measured = report.get("measured_density")
    metrics = _flat_metrics(report)
    task = task_verdict(metrics)  # why a budget with a task bound was not met, or the drop it certified
    logger.info(
        "%s: plan density %.3f (%s; budget %s)%s, model version %s @challenger",
        use_case,
        report.get("density", float("nan")),
        "not measured on held-out windows" if measured is None else f"{measured:.3f} on held-out windows",
        budget_words(report),
        f"; {task}" if task else "",
        reg["mlflow_version"],
    )
    return {
        "calibration_run_id": run["id"],
        "reused": False,
        **metrics,
        **_budget_flags(report),
        **({"task_bound_verdict": task} if task else {}),
        **reg,
    }
