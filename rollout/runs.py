"""Calibration and evaluation runs: open one under its idempotency key, mark it succeeded or failed, with
the audit row and the use case's phase move in the same transaction. Each function owns its transaction
(the flows pass values, never sessions).

A run key names the work (use case, spec, settings): a run that succeeded under the key is returned as it
is (the flow reuses it), a failed or interrupted one is reopened in the same row.

Each audit row and phase move names ``actor``: the pipeline for a scheduled or pipeline run, else who ran
`sparsepilot calibrate NAME` / `evaluate NAME` (`sparsepilot.commands.auth.acting_person`: the signed-in
account, or ``os:<user> (not signed in)``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout import audit, lifecycle, pilots, roi
from rollout.calibration_outcome import decodes_densely, recorded_flags
from rollout.db.models import AliasMove, CalibrationRun, EvaluationRun, ModelVersion, SpecVersion, utcnow
from rollout.db.session import session_scope
from rollout.pilots import get_use_case
from rollout.recalibration import NotCalibrated, calibration_changes, calibration_inputs, spec_changes
from rollout.redact import redact

EVALUATION_FIELDS = (
    "device",
    "density",
    "quality_delta",
    "quality_low",
    "quality_high",
    "speedup",
    "speedup_low",
    "speedup_high",
    "savings_month_usd",
    "savings_month_low",
    "savings_month_high",
    "payback_days",
)


def _open(session: Any, model: type, key: str, flow_run_id: str | None, **new: Any) -> tuple[Any, bool]:
    """The run under `key` (reopened as running unless it succeeded), or a new running one."""
    run = session.scalar(select(model).where(model.idempotency_key == key))
    if run is None:
        run = model(idempotency_key=key, status="running", flow_run_id=flow_run_id, **new)
        session.add(run)
        session.flush()
        return run, True
    if run.status != "succeeded":
        run.status = "running"
        run.error = None
        run.flow_run_id = flow_run_id
    return run, False


def _failed(session: Any, model: type, run_pk: int, error: str) -> Any:
    """Mark the run failed with `error`, redacted (`rollout.redact`): the text is often a library's own
    (MLflow's names the tracking URL, password included), and it is stored, shown on the dashboard and,
    for a calibration, kept in the append-only audit log."""
    run = session.get(model, run_pk)
    run.status = "failed"
    run.error = redact(error)[:4000]
    return run


def _succeeded(
    session: Any, use_case: str, run: Any, kind: str, phase: str, details: dict, actor: str
) -> None:
    """The audit row of a succeeded run, and the use case's move to `phase` where the lifecycle allows,
    both by `actor`."""
    audit.record(session, actor, f"{kind}.succeeded", on=run, details=details)
    uc = get_use_case(session, use_case)
    lifecycle.advance(session, uc, phase, actor=actor, reason=f"{kind} run {run.id}")


# --- calibration -----------------------------------------------------------------------------------


def calibration_key_parts(use_case_id: int, spec_version: int) -> dict[str, Any]:
    """What a calibration run's idempotency key names of spec version `spec_version`: `inputs`, what a
    calibration reads of it (`rollout.recalibration.calibration_inputs`: a version that changes only a
    schedule or a cost has the same), and `spec_hashes`, the whole-spec hashes of the versions with
    those same inputs (this one's first, then the newest first): the keys calibrations were opened under
    before the key named the inputs alone, which `open_calibration` still finds (`legacy_keys`)."""
    with session_scope() as session:
        versions = list(
            session.scalars(
                select(SpecVersion)
                .where(SpecVersion.use_case_id == use_case_id)
                .order_by(SpecVersion.version.desc())
            )
        )
        this = next(v for v in versions if v.version == spec_version)
        same = [
            v.spec_hash
            for v in versions
            if v is not this
            and not calibration_changes(
                spec_changes(v.spec, v.dataset_sha256, this.spec, this.dataset_sha256)
            )
        ]
        return {
            "inputs": calibration_inputs(this.spec, this.dataset_sha256),
            "spec_hashes": [this.spec_hash, *same],
        }


def open_calibration(
    use_case_id: int,
    spec_version: int,
    key: str,
    settings: dict[str, Any],
    flow_run_id: str | None,
    actor: str = audit.SYSTEM_ACTOR,
    legacy_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The CalibrationRun under `key` (returned as it is when it succeeded, else reopened), else a
    succeeded one under one of `legacy_keys` (a key of the same work as an earlier build spelled it:
    its calibration stands and is reused, never orphaned), else a new running one. `spec_version` is
    the version a run is opened under; a reused run keeps its own (`not_calibrated` reads it)."""
    with session_scope() as session:
        if session.scalar(select(CalibrationRun.id).where(CalibrationRun.idempotency_key == key)) is None:
            earlier = (
                session.scalar(
                    select(CalibrationRun)
                    .where(
                        CalibrationRun.idempotency_key.in_(legacy_keys), CalibrationRun.status == "succeeded"
                    )
                    .order_by(CalibrationRun.id.desc())
                )
                if legacy_keys
                else None
            )
            if earlier is not None:
                key = earlier.idempotency_key
        run, created = _open(
            session,
            CalibrationRun,
            key,
            flow_run_id,
            use_case_id=use_case_id,
            spec_version=spec_version,
            metrics={"settings": settings},
        )
        if created:
            audit.record(
                session,
                actor,
                "calibration.started",
                on=run,
                details={"settings": settings, "spec_version": spec_version},
            )
        return {
            "id": run.id,
            "status": run.status,
            "model_version_id": run.model_version_id,
            "spec_version": run.spec_version,
            "metrics": calibration_metrics(session, run),
        }


def calibration_metrics(session: Any, run: CalibrationRun) -> dict[str, Any]:
    """The run's metrics with its outcome (`met_budget`, `prefill_met_budget`) read by today's rule
    (`rollout.calibration_outcome.recorded_flags`: a run recorded before the decode part counted kept
    the prefill's flag alone). What every reader of a calibration's outcome reads: a reused
    calibration, the cycle and the pilot."""
    metrics = run.metrics or {}
    mv = session.get(ModelVersion, run.model_version_id) if run.model_version_id is not None else None
    plan = (mv.plan if mv is not None else None) or {}
    return recorded_flags(metrics, (plan.get("metadata") or {}).get("decode_calibration"))


def calibration_succeeded(
    use_case: str,
    run_pk: int,
    *,
    model_version: Any,
    mlflow_run_id: str,
    metrics: dict[str, Any],
    density: float | None,
    actor: str = audit.SYSTEM_ACTOR,
) -> None:
    """Record the registered challenger on the run; the use case becomes `calibrated` where the
    lifecycle allows it. A running pilot of a plan the current spec version's calibration inputs changed
    is stopped first (`stop_uncalibrated_pilot`). SQLite's write lock from the start, as every writer of
    a pilot's state takes it (`pilots.locked`)."""
    with session_scope(immediate=True) as session:
        run = session.get(CalibrationRun, run_pk)
        run.status = "succeeded"
        run.model_version_id = model_version.id
        run.mlflow_run_id = mlflow_run_id
        run.finished_at = utcnow()
        run.metrics = {**(run.metrics or {}), **metrics}
        details = {
            "model_version_id": model_version.id,
            "mlflow_version": model_version.mlflow_version,
            "density": density,
        }
        stop_uncalibrated_pilot(session, get_use_case(session, use_case), run, actor=actor)
        _succeeded(session, use_case, run, "calibration", "calibrated", details, actor)


def stop_uncalibrated_pilot(session: Any, uc: Any, run: CalibrationRun, *, actor: str) -> int | None:
    """The calibration `run` made its plan the challenger: a pilot of another plan that still runs, and
    that the current spec version's calibration inputs changed (`plan_not_calibrated`: its plan answers
    another budget, model or data), is stopped, audited with the reason `pilots.recalibrated`, and the
    use case is `calibrated` (it pilots nothing now; the new plan is evaluated, then piloted where it
    may be). Left running, it took no batch again (the cycle pilots the new challenger or, where that is
    not piloted, nothing) and kept the use case "piloting" for good. A pilot waiting for approval is
    left to the person deciding it (its promotion is refused: `approvals.promotion_not_calibrated`); a
    pilot whose plan the current version leaves calibrated runs on until the new plan's pilot supersedes
    it (`pilots.start_pilot`). Returns the stopped pilot's id, or None. In the caller's transaction."""
    pilot = pilots.active_pilot(session, uc)
    if pilot is None or pilot.status != "running" or pilot.model_version_id == run.model_version_id:
        return None
    stale = plan_not_calibrated(session, uc, pilot.model_version_id)
    if stale is None:
        return None
    uc, pilot = pilots.locked(session, uc.id, pilot.id)
    if pilot.status != "running":  # PostgreSQL: changed before its row was locked (SQLite: never)
        return None
    reason = pilots.recalibrated(stale.version)
    pilots.stop_pilot(session, pilot, status="stopped", actor=actor, reason=reason)
    lifecycle.set_phase(
        session,
        uc,
        "calibrated",
        actor=actor,
        reason=f"calibration run {run.id}: {pilots.pilot_label(pilot)} {reason}",
    )
    return pilot.id


def calibration_failed(use_case_id: int, run_pk: int, error: str, actor: str = audit.SYSTEM_ACTOR) -> None:
    with session_scope() as session:
        run = _failed(session, CalibrationRun, run_pk, error)
        run.finished_at = utcnow()
        audit.record(
            session,
            actor,
            "calibration.failed",
            on=run,
            details={"error": run.error[:1000]},
        )


def _latest_calibration(session: Any, use_case_id: int) -> Any:
    """The latest succeeded calibration run that registered a model version."""
    q = select(CalibrationRun).where(
        CalibrationRun.use_case_id == use_case_id,
        CalibrationRun.status == "succeeded",
        CalibrationRun.model_version_id.is_not(None),
    )
    return session.scalar(q.order_by(CalibrationRun.id.desc()))


def latest_challenger(session: Any, use_case_id: int) -> Any:
    """The calibration run of the challenger: the latest succeeded run that registered the version of the
    last committed `challenger` move (what MLflow's @challenger serves, rollout.registry). A calibration
    moves the challenger to its version, and a reused one (a spec reverted to the version that calibrated
    it) moves it back, so the pilot and the evaluation follow the calibration that moved it last, whatever
    run id is highest. Without a committed challenger move, or with one to a version no succeeded
    calibration registered (a calibration cut off between its move and its record, which its rerun
    completes), the latest succeeded run that registered a version. None: nothing yet."""
    move = session.scalar(
        select(AliasMove)
        .where(
            AliasMove.use_case_id == use_case_id,
            AliasMove.alias == "challenger",
            AliasMove.status == "committed",
        )
        .order_by(AliasMove.id.desc())
    )
    if move is not None and move.to_version is not None:
        run = session.scalar(
            select(CalibrationRun)
            .join(ModelVersion, CalibrationRun.model_version_id == ModelVersion.id)
            .where(
                CalibrationRun.use_case_id == use_case_id,
                CalibrationRun.status == "succeeded",
                ModelVersion.mlflow_version == move.to_version,
            )
            .order_by(CalibrationRun.id.desc())
        )
        if run is not None:
            return run
    return _latest_calibration(session, use_case_id)


def plan_calibration(session: Any, use_case_id: int, model_version_id: int) -> CalibrationRun | None:
    """The latest succeeded calibration run that registered model version `model_version_id` (a plan: a
    later calibration that finds the same plan registers the same version), or None (none recorded)."""
    return session.scalar(
        select(CalibrationRun)
        .where(
            CalibrationRun.use_case_id == use_case_id,
            CalibrationRun.status == "succeeded",
            CalibrationRun.model_version_id == model_version_id,
        )
        .order_by(CalibrationRun.id.desc())
    )


def plan_not_calibrated(session: Any, uc: Any, model_version_id: int) -> NotCalibrated | None:
    """`not_calibrated` of a plan (model version) rather than of the challenger: whether the current spec
    version changed what calibration reads since the plan's latest calibration. The rule a pilot of it is
    stopped by when the use case is calibrated again (`stop_uncalibrated_pilot`) and a promotion of it is
    refused by (`approvals.promotion_not_calibrated`). None also where no calibration of it is recorded."""
    return not_calibrated(session, uc, plan_calibration(session, uc.id, model_version_id))


def not_calibrated(session: Any, uc: Any, run: CalibrationRun | None) -> NotCalibrated | None:
    """Whether the challenger `run` registered was calibrated under a spec version whose calibration
    inputs (`rollout.recalibration.CALIBRATION_INPUTS`: model, quality budget, task, dataset rows) differ
    from the current version's: then it is not piloted under the current one (`pilot NAME` refuses, the
    cycle calibrates again first, the dashboard says it waits for a calibration). None: it was calibrated
    under the current version, or under one that differs only in what a calibration does not read."""
    if run is None or run.spec_version == uc.current_spec_version:
        return None
    rows = {
        sv.version: sv
        for sv in session.scalars(
            select(SpecVersion).where(
                SpecVersion.use_case_id == uc.id,
                SpecVersion.version.in_((run.spec_version, uc.current_spec_version)),
            )
        )
    }
    old, new = rows.get(run.spec_version), rows.get(uc.current_spec_version)
    if old is None or new is None:
        return None
    changed = spec_changes(old.spec, old.dataset_sha256, new.spec, new.dataset_sha256)
    fields = calibration_changes(changed)
    if not fields:
        return None
    return NotCalibrated(uc.name, new.version, old.version, tuple(fields))


def challenger_evaluation(session: Any, uc: Any, run: CalibrationRun) -> EvaluationRun | None:
    """The evaluation of the challenger `run` registered whose figures count (`version_evaluation` of
    its model version). None: not evaluated yet."""
    return version_evaluation(session, uc, run.model_version_id)


def version_evaluation(session: Any, uc: Any, model_version_id: int | None) -> EvaluationRun | None:
    """The evaluation of model version `model_version_id` whose figures count: its newest succeeded one
    priced at the use case's current spec version, else its newest succeeded one (the portfolio's rule,
    `rollout.queries._shown_evaluation`, for this one plan; what a pilot of it is judged and signed on).
    None: that version was not evaluated."""
    ok = (
        EvaluationRun.use_case_id == uc.id,
        EvaluationRun.model_version_id == model_version_id,
        EvaluationRun.status == "succeeded",
    )
    newest = select(EvaluationRun).where(*ok).order_by(EvaluationRun.id.desc()).limit(1)
    at_current = newest.where(EvaluationRun.spec_version == uc.current_spec_version)
    return session.scalar(at_current) or session.scalar(newest)


def pilot_skip(
    session: Any, uc: Any, run: CalibrationRun, *, pilot_anyway: bool = False
) -> roi.PilotSkip | None:
    """Why the challenger `run` registered is not piloted (`rollout.roi.evaluation_pilot_skip` of its
    calibration's outcome and its evaluation: no plan met the budget, the plan keeps every block, no
    saving established), or None. Not evaluated yet: the plan keeps every block by the density its
    calibration found (the model version's, where its plan decodes densely), else it may be piloted.
    `pilot_anyway` (`sparsepilot pilot --pilot-anyway`, the main job's --pilot-all) waives all but the
    missed budget."""
    ev = challenger_evaluation(session, uc, run)
    mv = session.get(ModelVersion, run.model_version_id)
    return roi.evaluation_pilot_skip(
        None if ev is None else evaluation_summary(ev),
        met_budget=calibration_metrics(session, run).get("met_budget"),
        pilot_anyway=pilot_anyway,
        calibrated_density=mv.density if mv is not None and decodes_densely(mv.plan) else None,
    )


def version_dict(mv: Any) -> dict[str, Any]:
    """What a flow needs of a model version to load it (base model, plan, MLflow name and version)."""
    return {
        "model_version_id": mv.id,
        "base_model_ref": mv.base_model_ref,
        "plan": mv.plan,
        "mlflow_model": mv.mlflow_model_name,
        "mlflow_version": mv.mlflow_version,
    }


def latest_calibrated_version(use_case_id: int) -> dict[str, Any] | None:
    """The challenger's model version (`latest_challenger`: what `evaluate` measures), or None."""
    with session_scope() as session:
        run = latest_challenger(session, use_case_id)
        if run is None:
            return None
        return version_dict(session.get(ModelVersion, run.model_version_id))


def calibration_reused(
    use_case: str, run_pk: int, *, mlflow_version: str, alias_move_id: int, actor: str = audit.SYSTEM_ACTOR
) -> None:
    """A succeeded calibration run reused with its version made the challenger again (the spec was
    reverted): its audit row, and the use case back to `calibrated` where the lifecycle allows it, as a
    new calibration would (the challenger changed: what was evaluated was another plan), a running pilot
    of a plan the current version left uncalibrated stopped as there (`stop_uncalibrated_pilot`)."""
    with session_scope(immediate=True) as session:
        run = session.get(CalibrationRun, run_pk)
        details = {
            "model_version_id": run.model_version_id,
            "mlflow_version": mlflow_version,
            "alias_move_id": alias_move_id,
        }
        audit.record(session, actor, "calibration.reused", on=run, details=details)
        uc = get_use_case(session, use_case)
        stop_uncalibrated_pilot(session, uc, run, actor=actor)
        lifecycle.advance(session, uc, "calibrated", actor=actor, reason=f"calibration run {run.id} reused")


def record_unregistered_challenger(use_case: str, base_model_ref: str, *, key: str) -> int:
    """A succeeded calibration run naming a plan-less model version that is not in MLflow: enough for a
    pilot to start and take an observation import (`sparsepilot bench import`). Returns the version id."""
    with session_scope() as session:
        uc = get_use_case(session, use_case)
        mv = ModelVersion(use_case_id=uc.id, base_model_ref=base_model_ref, plan={}, plan_hash="0" * 64)
        session.add(mv)
        session.flush()
        session.add(
            CalibrationRun(
                idempotency_key=key,
                use_case_id=uc.id,
                spec_version=uc.current_spec_version,
                status="succeeded",
                model_version_id=mv.id,
            )
        )
        return mv.id


# --- evaluation ------------------------------------------------------------------------------------


def evaluation_summary(run: Any) -> dict[str, Any]:
    """The run's figures, and `measured_under_overload`: the warning its speed-up and dollars carry when
    timings behind them were kept under overload (`rollout.roi.timing_overload`), else None; and
    `decode_status`, what sparse decode does in the ROI (`rollout.roi.decode_outcome`'s status); and
    `tasks_not_scored`, why it has no task score where it has none
    (`rollout.dataset_split.nothing_to_score`). Its money is `rollout.roi.plan_money`'s: no payback for a
    saving not established or a plan that keeps every block (`not_established`, `saves_nothing`), also
    of a run stored before that rule."""
    figures = {
        "evaluation_run_id": run.id,
        **{f: getattr(run, f) for f in EVALUATION_FIELDS},
        "measured_under_overload": roi.timing_overload((run.roi or {}).get("timing_host")),
        "decode_status": ((run.roi or {}).get("decode") or {}).get("status"),
        # why it has no quality figure, where no row kept apart from calibration could be scored
        "tasks_not_scored": (run.report or {}).get("tasks_not_scored"),
    }
    return figures | roi.plan_money(figures)


def open_evaluation(
    use_case_id: int,
    model_version_id: int,
    key: str,
    flow_run_id: str | None,
    actor: str = audit.SYSTEM_ACTOR,
) -> dict:
    """The EvaluationRun for this key: returned as-is when it succeeded, else (re)marked running; a new
    one is audited as started by `actor` (a calibration's start is; an evaluation's was not, so one that
    failed named nobody)."""
    with session_scope() as session:
        run, created = _open(
            session,
            EvaluationRun,
            key,
            flow_run_id,
            use_case_id=use_case_id,
            model_version_id=model_version_id,
        )
        if created:
            details = {"model_version_id": model_version_id}
            audit.record(session, actor, "evaluation.started", on=run, details=details)
        return {"id": run.id, "status": run.status, "summary": evaluation_summary(run)}


def evaluation_succeeded(
    use_case: str,
    run_pk: int,
    *,
    report: dict[str, Any],
    roi: dict[str, Any],
    mlflow_run_id: str,
    spec_version: int | None,
    actor: str = audit.SYSTEM_ACTOR,
) -> dict[str, Any]:
    """Record the evaluation's report and ROI, priced at `spec_version` (the spec the flow loaded); the
    use case becomes `evaluated` where the lifecycle allows it. Returns the run's summary."""
    with session_scope() as session:
        run = session.get(EvaluationRun, run_pk)
        run.status = "succeeded"
        run.spec_version = spec_version
        run.device = report.get("device")
        run.mlflow_run_id = mlflow_run_id
        run.density = report.get("density")
        tasks = report.get("tasks") or {}
        run.quality_delta = tasks.get("quality_delta")
        run.quality_low, run.quality_high = tasks.get("quality_low"), tasks.get("quality_high")
        # one timing pair measures no interval: its "ends" are the estimate and establish nothing, so
        # neither the speed-up's nor the saving's are stored
        measured = roi["inputs"].get("interval_measured", True)
        run.speedup = roi["inputs"]["speedup"]
        run.speedup_low = roi["inputs"]["speedup_low"] if measured else None
        run.speedup_high = roi["inputs"]["speedup_high"] if measured else None
        run.savings_month_usd = roi["saved_usd_month"]
        run.savings_month_low = roi["saved_usd_month_low"] if measured else None
        run.savings_month_high = roi["saved_usd_month_high"] if measured else None
        # a payback is a promise only where the saving is established (its interval's low end > 0) and the
        # plan does not compute what the dense model does (rollout.roi.plan_money: its noise saves nothing)
        run.payback_days = roi["payback_days"] if roi["certain"] else None
        run.report = report
        run.roi = roi
        run.payback_days = evaluation_summary(run)["payback_days"]
        run.artifacts = dict(report.get("artifacts") or {})
        details = {"device": run.device, "speedup": run.speedup, "saved_usd_month": run.savings_month_usd}
        _succeeded(session, use_case, run, "evaluation", "evaluated", details, actor)
        return evaluation_summary(run)


def evaluation_failed(run_pk: int, error: str, actor: str = audit.SYSTEM_ACTOR) -> None:
    with session_scope() as session:
        run = _failed(session, EvaluationRun, run_pk, error)
        audit.record(session, actor, "evaluation.failed", on=run, details={"error": run.error[:1000]})
