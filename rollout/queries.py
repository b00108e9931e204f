"""Read-side SQL for the dashboard. Aggregates are computed by the database (GROUP BY and latest-row
subqueries), so a page costs a handful of queries however many observations a portfolio holds.
Every function takes the caller's Session and returns plain dicts, ready for a DataFrame."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Integer, and_, case, cast, func, or_, select
from sqlalchemy.orm import Session, aliased

from rollout import audit, leases, lifecycle, roi, runs
from rollout.dataset_split import kept_apart_of
from rollout.db.models import (
    AliasMove,
    Approval,
    AuditEntry,
    EvaluationRun,
    GateDecision,
    ModelVersion,
    Observation,
    Pilot,
    PilotStep,
    SpecVersion,
    UseCase,
    VoidRequest,
    as_utc,
)
from rollout.db.session import session_scope
from rollout.decisions import newest_decision
from rollout.gate.spending import DEFAULT_ALPHA
from rollout.pilots import (
    ACTIVE_PILOT,
    active_pilot,
    load_pilot_spec,
    planned_pilot,
    promoted_pilot,
    void_note,
    was_aborted,
)
from rollout.redact import redact, redacted_name

# Where a gate decision's evidence (rollout.gate.Decision.to_dict()) keeps the quality difference
# (treatment - control) and its anytime-valid interval. Read in SQL with the dialect's JSON path operator.
EVIDENCE_QUALITY_DELTA = ("quality", "estimate")
EVIDENCE_QUALITY_LOW = ("quality", "interval_low")
EVIDENCE_QUALITY_HIGH = ("quality", "interval_high")
# An EXTEND's projection of the requests (pairs in a shadow step) that would settle it.
EVIDENCE_PROJECTED = ("projected_requests",)
EVIDENCE_REASONS = ("reasons",)  # why the gate decided as it did (an INVALID: which checks failed)
EVIDENCE_N_CONTROL = ("n_control",)
# The pilot's traffic source when the gate looked: distinct requests used and how many are left.
EVIDENCE_TRAFFIC_USED = ("traffic", "distinct_used")
EVIDENCE_TRAFFIC_REMAINING = ("traffic", "remaining")
EVIDENCE_N_TREATMENT = ("n_treatment",)
EVIDENCE_STEP_INDEX = ("step_index",)
# Where an evaluation's report (sparse_core.evaluation) keeps how many task rows its quality came from.
EVALUATION_TASK_ROWS = ("tasks", "n_rows")
# Where an evaluation's ROI keeps what sparse decode does (rollout.roi.decode_outcome's status).
EVALUATION_DECODE_STATUS = ("decode", "status")
# Where an evaluation's ROI keeps the host its timings ran on (rollout.roi.timing_overload reads it).
EVALUATION_TIMING_HOST = ("timing_host",)

T = TypeVar("T")
WAITING_LABELS = {"approval": "approval to promote", "rollback_approval": "approval to roll back"}


def _latest_id(id_col: Any, key_col: Any, *where: Any) -> Any:
    """Subquery: the newest row id per key (ids only grow, so max(id) is the latest row)."""
    stmt = select(key_col.label("key"), func.max(id_col).label("id")).group_by(key_col)
    if where:
        stmt = stmt.where(*where)
    return stmt.subquery()


def _shown_evaluation() -> Any:
    """Per use case (`key`), the evaluation whose figures it shows (`id`): its newest succeeded one priced
    at its current spec version, else its newest succeeded one (shown with the `roi.priced_at` note). A
    spec that goes back to an earlier version's content makes that version current again, and its
    evaluate reuses the run priced there: the newest run by id alone, priced at the version left, kept
    its dollars on show with a "re-evaluate" note no re-evaluation could clear."""
    ok = EvaluationRun.status == "succeeded"
    at_current = (
        select(EvaluationRun.use_case_id.label("key"), func.max(EvaluationRun.id).label("id"))
        .join(UseCase, UseCase.id == EvaluationRun.use_case_id)
        .where(ok, EvaluationRun.spec_version == UseCase.current_spec_version)
        .group_by(EvaluationRun.use_case_id)
        .subquery()
    )
    newest = _latest_id(EvaluationRun.id, EvaluationRun.use_case_id, ok)
    return (
        select(newest.c.key, func.coalesce(at_current.c.id, newest.c.id).label("id"))
        .outerjoin(at_current, at_current.c.key == newest.c.key)
        .subquery()
    )


def _current_decision(*where: Any) -> Any:
    """Per use case (`key`), its current decision (`id`, of those matching `where`): the newest of its
    latest pilot's (a manual rollback, which names no pilot, counts from that pilot's start), and none
    while the use case has no pilot of its current challenger (`lifecycle.BEFORE_PILOT`: a new
    challenger calibrated or evaluated). A use case's newest decision by id alone showed pilot 1's GO, one
    a person had rejected, of another plan, with its gate interval, on pilot 2 before its first look."""
    latest_pilot = _latest_id(Pilot.id, Pilot.use_case_id)
    ours = or_(
        GateDecision.pilot_id == Pilot.id,
        and_(GateDecision.pilot_id.is_(None), GateDecision.created_at >= Pilot.started_at),
    )
    return (
        select(GateDecision.use_case_id.label("key"), func.max(GateDecision.id).label("id"))
        .join(UseCase, UseCase.id == GateDecision.use_case_id)
        .join(latest_pilot, latest_pilot.c.key == GateDecision.use_case_id)
        .join(Pilot, Pilot.id == latest_pilot.c.id)
        .where(UseCase.phase.not_in(lifecycle.BEFORE_PILOT), ours, *where)
        .group_by(GateDecision.use_case_id)
        .subquery()
    )


def read(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one of these query functions in its own read transaction."""
    with session_scope() as session:
        return fn(session, *args, **kwargs)


def portfolio(
    session: Session, *, decision_kind: str | None = None, use_case_id: int | None = None
) -> list[dict[str, Any]]:
    """One row per use case (or the one `use_case_id`): phase, current step, its current decision (of
    `decision_kind`, or any; `_current_decision`: its latest pilot's) and what it waits for, quality delta
    with its interval, speed-up and $/month saved with intervals, payback. Quality comes from the current
    pilot's latest gate look that measured it (a monitor look after promotion measures none), else from
    the latest successful evaluation (`quality_source`: "gate" or "evaluation"; the evaluation's bounds,
    valid at any number of rows, are on its `evaluation_rows` task rows)."""
    kind = () if decision_kind is None else (GateDecision.kind == decision_kind,)
    last_dec = _current_decision(*kind)
    gate_dec = _current_decision(GateDecision.kind == "gate")
    QDec = aliased(GateDecision)  # the gate look the quality columns come from
    # the newest alarm or rollback of a champion (the monitor's NO-GO / INVALID, a person's rollback):
    # while another challenger pilots it is not the current decision, yet it may wait for a person or
    # be decided but not in effect, which outranks the pilot (`waits_for`)
    CDec = aliased(GateDecision)
    champ_dec = _latest_id(
        GateDecision.id,
        GateDecision.use_case_id,
        GateDecision.kind.in_(("monitor", "rollback")),
        GateDecision.outcome != "GO",
    )
    last_eval = _shown_evaluation()
    last_pilot = _latest_id(Pilot.id, Pilot.use_case_id)
    obs_per_uc = (
        select(Observation.use_case_id.label("key"), func.count().label("n"))
        .group_by(Observation.use_case_id)
        .subquery()
    )
    # a step's rows, and each arm's (a split step's minimum is per arm, and its smaller arm fills slowly)
    obs_per_step = (
        select(
            Observation.pilot_step_id.label("key"),
            func.count().label("n"),
            *(func.count(case((Observation.arm == arm, 1))).label(arm) for arm in ("control", "treatment")),
        )
        .group_by(Observation.pilot_step_id)
        .subquery()
    )
    dec_q = QDec.evidence[EVIDENCE_QUALITY_DELTA].as_float()
    dec_lo = QDec.evidence[EVIDENCE_QUALITY_LOW].as_float()
    dec_hi = QDec.evidence[EVIDENCE_QUALITY_HIGH].as_float()
    stmt = (
        select(
            UseCase.id,
            UseCase.name,
            UseCase.owner,
            UseCase.criticality,
            UseCase.phase,
            UseCase.updated_at,
            Pilot.status.label("pilot_status"),
            Pilot.id.label("latest_pilot_id"),
            PilotStep.index.label("step_index"),
            PilotStep.kind.label("step_kind"),
            PilotStep.traffic_pct,
            PilotStep.min_samples,
            func.coalesce(obs_per_step.c.n, 0).label("step_observations"),
            func.coalesce(obs_per_step.c.control, 0).label("step_n_control"),
            func.coalesce(obs_per_step.c.treatment, 0).label("step_n_treatment"),
            func.coalesce(obs_per_uc.c.n, 0).label("observations"),
            GateDecision.id.label("decision_id"),
            GateDecision.outcome.label("decision"),
            GateDecision.kind.label("decision_kind"),
            GateDecision.awaiting,
            GateDecision.resolution,
            GateDecision.created_at.label("decided_at"),
            func.coalesce(dec_q, EvaluationRun.quality_delta).label("quality_delta"),
            dec_q.label("decision_quality_delta"),
            GateDecision.evidence[EVIDENCE_STEP_INDEX].as_integer().label("decision_step_index"),
            case((dec_q.is_not(None), dec_lo), else_=EvaluationRun.quality_low).label("quality_low"),
            case((dec_q.is_not(None), dec_hi), else_=EvaluationRun.quality_high).label("quality_high"),
            case(
                (dec_q.is_not(None), "gate"),
                (EvaluationRun.quality_delta.is_not(None), "evaluation"),
                else_=None,
            ).label("quality_source"),
            EvaluationRun.report[EVALUATION_TASK_ROWS].as_integer().label("evaluation_rows"),
            GateDecision.evidence[EVIDENCE_PROJECTED].as_integer().label("projected_requests"),
            GateDecision.evidence[EVIDENCE_REASONS].label("decision_reasons"),
            GateDecision.evidence[EVIDENCE_N_CONTROL].as_integer().label("decision_n_control"),
            GateDecision.evidence[EVIDENCE_N_TREATMENT].as_integer().label("decision_n_treatment"),
            GateDecision.evidence[EVIDENCE_TRAFFIC_USED].as_integer().label("traffic_used"),
            GateDecision.evidence[EVIDENCE_TRAFFIC_REMAINING].as_integer().label("traffic_remaining"),
            EvaluationRun.density,
            EvaluationRun.roi[EVALUATION_DECODE_STATUS].as_string().label("decode_status"),
            EvaluationRun.device,
            EvaluationRun.speedup,
            EvaluationRun.speedup_low,
            EvaluationRun.speedup_high,
            EvaluationRun.savings_month_usd,
            EvaluationRun.savings_month_low,
            EvaluationRun.savings_month_high,
            EvaluationRun.payback_days,
            EvaluationRun.mlflow_run_id,
            EvaluationRun.roi[EVALUATION_TIMING_HOST].label("timing_host"),
            EvaluationRun.spec_version.label("priced_spec_version"),
            UseCase.current_spec_version,
            CDec.id.label("champion_decision_id"),
            CDec.kind.label("champion_decision_kind"),
            CDec.outcome.label("champion_decision"),
            CDec.awaiting.label("champion_awaiting"),
            CDec.resolution.label("champion_resolution"),
        )
        .select_from(UseCase)
        .outerjoin(last_dec, last_dec.c.key == UseCase.id)
        .outerjoin(GateDecision, GateDecision.id == last_dec.c.id)
        .outerjoin(gate_dec, gate_dec.c.key == UseCase.id)
        .outerjoin(QDec, QDec.id == gate_dec.c.id)
        .outerjoin(last_eval, last_eval.c.key == UseCase.id)
        .outerjoin(EvaluationRun, EvaluationRun.id == last_eval.c.id)
        .outerjoin(last_pilot, last_pilot.c.key == UseCase.id)
        .outerjoin(Pilot, Pilot.id == last_pilot.c.id)
        .outerjoin(
            PilotStep, and_(PilotStep.pilot_id == Pilot.id, PilotStep.index == Pilot.current_step_index)
        )
        .outerjoin(obs_per_step, obs_per_step.c.key == PilotStep.id)
        .outerjoin(obs_per_uc, obs_per_uc.c.key == UseCase.id)
        .outerjoin(champ_dec, champ_dec.c.key == UseCase.id)
        .outerjoin(CDec, CDec.id == champ_dec.c.id)
        .order_by(UseCase.name)
    )
    if use_case_id is not None:
        stmt = stmt.where(UseCase.id == use_case_id)
    rows = [dict(r._mapping) for r in session.execute(stmt)]
    # the signatures that count (`_signature_counts`, the Approvals page's rule): a signature taken back
    # (`approve --withdraw`) or an override's whose signer is no longer an approver counts nothing
    signed = _signature_counts(session, [r["decision_id"] for r in rows if r["decision_id"] is not None])
    for r in rows:
        r["unfinished"] = _unfinished_row(session, r)
        champ = _champion_decision(r)
        if r["unfinished"] is None and champ is not None:  # a champion's rollback not in effect
            r["unfinished"] = _unfinished_row(session, r | champ)
        # the monitor's alarm about the champion waiting for a person, where it is not the current decision
        r["champion_alarm"] = (
            r["champion_decision_id"]
            if champ is not None and champ["awaiting"] == "rollback_approval" and champ["resolution"] is None
            else None
        )
        # "GO, rejected", "GO (monitor)"; the chart's colour: the outcome and who made it, as it was made
        r["decision_standing"] = decision_standing(r["decision"], r["resolution"], kind=r["decision_kind"])
        r["decision_made"] = decision_words(r["decision"], r["decision_kind"])
        r["signatures"] = signed.get(r["decision_id"], 0)
        # a promotion that no signature passes (`approvals.promotion_refused_waits`): what it waits for
        r["promotion_refused"] = _promotion_refused(session, r)
        # an operator's abort stopped it: a person may pilot its challenger again (`pilot NAME --again`)
        r["pilot_aborted"] = (
            r["phase"] == "stopped"
            and r["pilot_status"] == "stopped"
            and was_aborted(session, session.get(Pilot, r["latest_pilot_id"]))
        )
        # a challenger calibrated for another spec version's budget (or model, data) waits for a calibration
        # under the current one before any pilot (runs.not_calibrated, what the cycle and `pilot` ask)
        r["not_calibrated"] = _not_calibrated_words(session, r)
        # what the speed-up and the dollars carry beside them: timings kept under overload, and dollars
        # priced at a spec version that is no longer current (docs/roi.md); read before `waits_for`, whose
        # "no pilot:" finding is `roi.evaluation_pilot_skip`'s of them: a loss timed under overload is a
        # saving not established, never "no saving expected" (it said so beside the caveat's "timed under
        # overload", while `pilot` refused it as not established)
        r["measured_under_overload"] = roi.timing_overload(r.pop("timing_host"))
        r["priced_at"] = roi.priced_at(r["priced_spec_version"], r["current_spec_version"])
        r["waits_for"] = waits_for(r)
        # its money by the one rule (rollout.roi.plan_money): a plan that keeps every block saves nothing
        # (`saves_nothing`: its dollars are timing noise), and a saving not established (`not_established`,
        # why) claims no payback; the table's caveat, the chart's and the main job's table say which
        money = roi.plan_money(r)
        r["payback_days"] = money["payback_days"]
        r["saves_nothing"], r["not_established"] = money["saves_nothing"], money["not_established"]
    return rows


def _promotion_refused(session: Session, row: dict[str, Any]) -> str | None:
    """Where a portfolio row's current decision waits for a promotion's signature ("approval to promote":
    a decision asking for approval that nobody signed; "a second approver" of a running pilot's decision
    that asked nobody, an override's first signature a promotion's), and the rules a promotion is refused
    by hold (`approvals.promotion_refused_waits`: a plan the current spec version left uncalibrated, a GO
    measured against an endpoint's champion that changed during its step), what it waits for instead; else
    None. Asked only of such rows (a portfolio of them costs a few queries each)."""
    if row["decision_kind"] != "gate" or row["resolution"] is not None or row["decision_id"] is None:
        return None
    override = row["awaiting"] == "none" and row["signatures"] and row["pilot_status"] == "running"
    if not _waits_for_promotion(row["awaiting"], row["signatures"], bool(override)):
        return None
    return _refused_waits(session, row["decision_id"])


def _waits_for_promotion(awaiting: str | None, signatures: int, override: bool) -> bool:
    """Whether an open gate decision waits for a promotion's signature: one asking for approval that nobody
    signed ("approval to promote"), or, `override`, a running pilot's decision that asked nobody with an
    override's first signature ("a second approver")."""
    return (awaiting == "approval" and not signatures) or override


def _refused_waits(session: Session, decision_id: int) -> str | None:
    """What a gate decision waits for where no promotion signature passes the rules
    (`approvals.promotion_refused_waits`), else None."""
    from rollout.approvals import promotion_refused_waits

    return promotion_refused_waits(session, session.get(GateDecision, decision_id))


def _not_calibrated_words(session: Session, row: dict[str, Any]) -> str | None:
    """What a portfolio row waits for where its challenger was calibrated under a spec version whose
    calibration inputs the current one changed (`runs.not_calibrated`), else None: before its pilot, and
    while its pilot runs, which takes no batch until then (`pilot_batches`' refusal; the calibration
    stops it: `runs.stop_uncalibrated_pilot`). Where the row read "more samples" for such a pilot, no
    batch could bring them."""
    running = row.get("pilot_status") == "running"
    if row["phase"] not in lifecycle.BEFORE_PILOT and not running:
        return None
    uc = session.get(UseCase, row["id"])
    stale = runs.not_calibrated(session, uc, runs.latest_challenger(session, uc.id))
    if stale is None:
        return None
    pilot = "; its running pilot takes no batch until then" if running else ""
    return (
        f"calibration under spec v{stale.version} ({stale.why}): the next scheduled cycle, or "
        f"`{stale.command}`{pilot}"
    )


def rollback_able(session: Session) -> list[str]:
    """The use cases a person may roll back now (`champion.rollback_able`: promoted, or a champion of ours
    serving whatever the phase), by name: the approvals page's rollback list. Asked only of use cases
    promoted or with a promoted pilot (a portfolio of pilots costs one query)."""
    from rollout import champion

    with_champion = select(Pilot.use_case_id).where(Pilot.status == "promoted")
    candidates = session.scalars(
        select(UseCase)
        .where(or_(UseCase.phase == "promoted", UseCase.id.in_(with_champion)))
        .order_by(UseCase.name)
    )
    return [uc.name for uc in candidates if champion.rollback_able(session, uc)]


def _champion_decision(row: dict[str, Any]) -> dict[str, Any] | None:
    """The portfolio row's newest alarm or rollback of a champion as a current decision's fields, where it
    is not the row's current decision (another challenger's pilot came after it), else None."""
    if row["champion_decision_id"] is None or row["champion_decision_id"] == row["decision_id"]:
        return None
    return {
        "decision_kind": row["champion_decision_kind"],
        "decision": row["champion_decision"],
        "awaiting": row["champion_awaiting"],
        "resolution": row["champion_resolution"],
    }


def _unfinished_row(session: Session, row: dict[str, Any]) -> dict[str, Any] | None:
    """The row's decided-but-not-in-effect decision (`rollout.unfinished.unfinished_in`), as
    `unfinished.waits_words` reads it: asked only where the row's decision can be one
    (`unfinished.may_be_unfinished`)."""
    from rollout import unfinished

    if not unfinished.may_be_unfinished(row):
        return None
    u = unfinished.unfinished_in(session, session.get(UseCase, row["id"]))
    if u is None:
        return None
    signer = None if u.approval_id is None else session.get(Approval, u.approval_id).actor
    return u.to_dict() | {"signer": signer, "stalled": u.stalled_at(dt.datetime.now(dt.UTC))}


# A decision's resolution under which its outcome no longer stands: a person rejected it (a GO not
# promoted, a monitor's rollback not made), its pilot was aborted, or another rollback made it moot.
NOT_STANDING = ("rejected", "aborted", "superseded")


# Who made a decision that is not the gate's, as every listing of decisions names it beside the outcome: a
# monitor's "GO" says that no guardrail breached after promotion (no gate GO), its "NO-GO" asks for a
# rollback; a manual rollback is a person's "NO-GO".
DECIDED_BY = {"monitor": "monitor", "rollback": "manual rollback"}


def decision_words(
    outcome: str | None, kind: str | None = "gate", step_index: int | None = None
) -> str | None:
    """A decision's outcome in words, with who made it where that is not the gate and the step it judged
    where given: "GO", "GO (monitor)", "NO-GO (manual rollback)", "GO (step 1)". The portfolio's decision
    column and chart, the use-case page's outcome and timeline, the Approvals cards and `usecase show` say
    it so; a monitor's "GO" read as a plain "GO" beside the gate's. None without an outcome."""
    if outcome is None:
        return None
    notes = [DECIDED_BY.get(kind, kind)] if kind not in (None, "gate") else []
    notes += [] if step_index is None else [f"step {step_index}"]
    return f"{outcome} ({', '.join(str(n) for n in notes)})" if notes else outcome


def decision_standing(
    outcome: str | None, resolution: str | None, step_index: int | None = None, kind: str | None = "gate"
) -> str | None:
    """A decision as it stands, in words (the one rule of the portfolio, its headline, the use-case page,
    the pilots' last outcome and the main job's table): its outcome as `decision_words` says it (who made
    it, the step it judged where given), and what became of it where that outcome does not stand ("GO,
    rejected", "GO (step 1), aborted", "NO-GO (monitor), rejected"); a stopped use case whose GO a person
    rejected read "GO". None without an outcome."""
    shown = decision_words(outcome, kind, step_index)
    if shown is None:
        return None
    return f"{shown}, {resolution}" if resolution in NOT_STANDING else shown


def decision_waits(
    awaiting: str | None, resolution: str | None, signatures: int, pilot_running: bool
) -> str | None:
    """What an open gate decision waits for from a person, or None (the one rule of the portfolio, the
    use-case page and Approvals). A signature that left a decision open is an override's first (signing
    what the gate recommends takes effect at once): it waits for a second, different approver, on a
    decision that asked for a person as on the latest one of a running pilot that asked nobody (promoting
    on EXTEND / NO-GO / INVALID: rollout.approvals.check_approvable)."""
    if resolution is not None:
        return None
    asks = bool(awaiting) and awaiting != "none"
    if signatures and (asks or pilot_running):
        return "a second approver"
    return WAITING_LABELS.get(awaiting, awaiting) if asks and awaiting else None


def waits_for(row: dict[str, Any]) -> str:
    """What a use case needs next, in words, from its latest decision and current step: first, a decision
    decided but not in effect (`unfinished`, `_unfinished_row`): its effect finished, never "more samples"
    for a pilot whose GO was approved; then the monitor's alarm about the serving champion waiting for a
    person while another challenger pilots (`champion_alarm`): no promotion is signed before it is decided
    (`approvals.refuse_promotion_while_rollback_waits`), where the row read "more samples" or "approval to
    promote" while production's model waited to be rolled back; then a person's signature, or, where the
    promotion it waits for is refused by a rule no signature passes, that rule's way on
    (`promotion_refused`)."""
    from rollout.unfinished import waits_words

    if row.get("unfinished"):
        return waits_words(row["unfinished"])
    if row.get("champion_alarm") is not None:
        return champion_alarm_waits(row["champion_alarm"], row.get("name") or "NAME")
    person = decision_waits(
        row.get("awaiting"),
        row.get("resolution"),
        row.get("signatures") or 0,
        row.get("pilot_status") == "running" and row.get("decision_kind") == "gate",
    )
    if person:
        # a promotion no signature passes (`approvals.promotion_refused_waits`): its way on, where the row
        # read "approval to promote" beside the card's "Not approvable" and its disabled button
        return row.get("promotion_refused") or person
    if row.get("pilot_status") == "running" and row.get("not_calibrated"):  # no batch brings more samples
        return row["not_calibrated"]
    decision = row.get("decision")
    if row.get("pilot_status") == "running" and decision == "INVALID":
        # no command reruns a step and its rows stay (rollout.decisions.invalid_remedy): more samples
        # do not cure it; the gate's way out is an abort and a new pilot
        reasons = row.get("decision_reasons") or []
        why = ", ".join(str(r).replace("-", " ") for r in reasons) or "invalid data"
        # an aborted pilot's challenger is piloted again by a person (`pilot NAME --again`)
        rows = " with the rows in an order that carries no information" if "crossed-bounds" in reasons else ""
        name = row.get("name") or "NAME"
        abort, again = (f"`sparsepilot pilot {name} --{what} --reason TEXT`" for what in ("abort", "again"))
        return (
            f"an operator: abort the pilot ({abort}) and pilot its challenger again ({again}){rows} "
            f"(data not trusted: {why})"
        )
    if row.get("pilot_aborted"):  # the phase's "-" named no way on, where `pilot NAME` knows one
        return (
            f"an operator: `sparsepilot pilot {row.get('name') or 'NAME'} --again --reason TEXT` pilots its "
            "challenger again (or another plan is piloted)"
        )
    if row.get("pilot_status") == "running":
        n, need = row.get("step_observations") or 0, row.get("min_samples") or 0
        if row.get("step_kind") == "shadow":
            n //= 2  # both arms answer every shadow request: count requests, as the minimum does
        projected = row.get("projected_requests") if decision == "EXTEND" else None
        if decision == "EXTEND" and row.get("traffic_remaining") == 0:  # rollout.traffic: no unused request
            need = f"; ~{projected} needed" if projected else ""
            return f"traffic exhausted ({row.get('traffic_used')} distinct requests used{need})"
        if projected:  # the gate's projection of what would settle it (rollout.gate)
            return f"more samples ({n}/~{projected})"
        n_c, n_t = row.get("decision_n_control"), row.get("decision_n_treatment")
        if row.get("step_kind") == "split" and decision == "EXTEND" and n_c is not None and n_t is not None:
            if min(n_c, n_t) < need:  # the minimum is per arm; the small arm fills slowly
                return f"more samples ({min(n_c, n_t)}/{need} in the smaller arm)"
        s_c, s_t = row.get("step_n_control"), row.get("step_n_treatment")
        if row.get("step_kind") == "split" and s_c is not None and s_t is not None and min(s_c, s_t) < need:
            # no look of this step counted its arms yet (an earlier step's GO moved the pilot here): its
            # own rows, per arm, against the per-arm minimum; both arms' rows against it said "more samples
            # (200/300)" with 20 in the sparse arm, and "next gate look" at 60 of 300 there
            return f"more samples ({min(s_c, s_t)}/{need} in the smaller arm)"
        if decision == "EXTEND" and need and n >= need:  # minimum met, still inconclusive
            return f"more samples ({n}, inconclusive)"
        if decision == "EXTEND" or n < need:
            return f"more samples ({n}/{need})" if need else "more samples"
        return "next gate look"
    if decision is None and row.get("not_calibrated"):  # no pilot of a plan for another version's budget
        return row["not_calibrated"]
    if decision is None and row.get("phase") == "evaluated":
        # no pilot starts where the plan cannot pay (rollout.roi.evaluation_pilot_skip, the rule
        # rollout.pilot_batches.ensure_pilot_in applies for the cycle, `pilot` and the main job alike):
        # such a use case waits for no pilot, and the finding says why
        skip = roi.evaluation_pilot_skip(row)
        if skip is not None:
            return f"no pilot: {skip.why}"
    if decision is None and row.get("phase") in lifecycle.PHASES:
        return lifecycle.waits_for(row["phase"])
    return "-"


def quality_interval(lo: Any, hi: Any, spec: str = "+.4f") -> str:
    """Bounds on the quality difference (the gate's, or an evaluation's), in words. Each side is a
    one-sided bound and the scale ends at -1 and +1, so a bound at the edge says nothing: '>= lo' or
    '<= hi' then, '[lo, hi]' when both bound, '-' without bounds."""
    if not (known(lo) and known(hi)):
        return "-"
    low, high = bounding_sides(lo, hi)
    if low and high:
        return f"[{lo:{spec}}, {hi:{spec}}]"
    if low:
        return f">= {lo:{spec}}"
    return f"<= {hi:{spec}}" if high else "not bounded yet"


def bounding_sides(lo: Any, hi: Any) -> tuple[bool, bool]:
    """Which of two bounds on a quality difference say something: a bound at the scale's end (-1 or
    +1) rules nothing out."""
    return (known(lo) and lo > -1 + 1e-9), (known(hi) and hi < 1 - 1e-9)


def known(x: Any) -> bool:
    """A value the row has: not None, not NaN (what SQL gives for a missing number)."""
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def quality_from(row: dict[str, Any]) -> str | None:
    """Where a portfolio row's quality numbers come from, in words: "gate" (the pilot gate's latest look),
    "evaluation, N rows" (before any look measured it: the evaluation's rows kept apart from
    calibration), or None (no quality measured yet)."""
    source = row.get("quality_source")
    if source == "evaluation":
        n = row.get("evaluation_rows")
        return f"evaluation, {n} rows" if n is not None else "evaluation"
    return source


def job_summary(session: Session, names: list[str]) -> list[dict[str, Any]]:
    """The main job's table, one row per named use case: its latest *gate* decision (with the step it
    judged), quality delta with the gate's anytime-valid interval (before any gate look, the latest
    evaluation's, with its bounds valid at any number of rows: `quality_source` says which), speed-up
    and $/month saved with intervals, payback, device and the ROI's decode cell
    (rollout.roi.decode_outcome) from the latest successful evaluation; `waits_for` as on the
    portfolio."""
    waits = {r["name"]: r["waits_for"] for r in portfolio(session)}
    decode = _decode_cells(session, names)
    rows = {r["name"]: r for r in portfolio(session, decision_kind="gate")}
    missing = [n for n in names if n not in rows]
    if missing:
        from rollout.pilots import get_use_case

        get_use_case(session, missing[0])  # raises UnknownUseCase naming the known ones
    out = []
    for name in names:
        r = rows[name]
        decided = r["decision_id"] is not None
        out.append(
            {
                "use_case": name,
                "phase": r["phase"],
                "decision": decision_standing(r["decision"], r["resolution"], r["decision_step_index"])
                if decided
                else "-",
                "decision_id": r["decision_id"],
                "awaiting": r["awaiting"] if decided and r["resolution"] is None else "none",
                "waits_for": waits.get(name) if decided else None,
                "quality_delta": r["quality_delta"],
                "quality_low": r["quality_low"],
                "quality_high": r["quality_high"],
                "quality_source": r["quality_source"],
                "evaluation_rows": r["evaluation_rows"],
                "speedup": r["speedup"],
                "speedup_low": r["speedup_low"],
                "speedup_high": r["speedup_high"],
                "saved_usd_month": r["savings_month_usd"],
                "saved_usd_month_low": r["savings_month_low"],
                "saved_usd_month_high": r["savings_month_high"],
                "payback_days": r["payback_days"],
                "saves_nothing": r["saves_nothing"],
                "not_established": r["not_established"],
                "decode": decode.get(name),
                "device": r["device"],
                "measured_under_overload": r["measured_under_overload"],
                "priced_at": r["priced_at"],
            }
        )
    return out


def _decode_cells(session: Session, names: list[str]) -> dict[str, str | None]:
    """Per use case, the `short` decode cell of the evaluation its dollars come from (`_shown_evaluation`:
    not the newest by id, which after a spec went back to an earlier version is priced at the one left)."""
    shown = _shown_evaluation()
    q = (
        select(UseCase.name, EvaluationRun.roi)
        .join(shown, shown.c.key == UseCase.id)
        .join(EvaluationRun, EvaluationRun.id == shown.c.id)
        .where(UseCase.name.in_(names))
    )
    return {name: ((roi or {}).get("decode") or {}).get("short") for name, roi in session.execute(q)}


def portfolio_totals(session: Session) -> dict[str, Any]:
    """Totals over the latest successful evaluation per use case, plus counts, in one SQL pass each.

    The headline sum counts only **established** savings: use cases still in play (not stopped or rolled
    back) whose savings interval lies above zero. The interval sums their bounds (conservative: it
    assumes the errors move together). Everything else is counted apart: use cases whose interval
    includes no saving (or a loss), and ended ones."""
    last_eval = _shown_evaluation()
    ended = UseCase.phase.in_(lifecycle.ENDED_PHASES)
    # a run with no measured interval (one timing pair, savings_month_low NULL) establishes nothing, nor
    # does a dense plan whatever its timing noise says (rollout.roi.dense_plan: the rows' "no pilot")
    decode_status = EvaluationRun.roi[EVALUATION_DECODE_STATUS].as_string()
    dense = and_(
        func.coalesce(EvaluationRun.density, 0) >= roi.DENSE_PLAN_DENSITY,
        func.coalesce(decode_status, "") != "measured",
    )
    established = and_(~ended, ~dense, func.coalesce(EvaluationRun.savings_month_low, 0) > 0)
    # the established figures that carry a note beside them (docs/roi.md): timed under overload, or
    # priced at a spec version that is no longer current
    kept = [
        func.coalesce(
            EvaluationRun.roi[(*EVALUATION_TIMING_HOST, block, "pairs_kept_under_overload")].as_integer(), 0
        )
        for block in ("prefill", "decode")
    ]
    overloaded = kept[0] + kept[1] > 0
    superseded = and_(
        EvaluationRun.spec_version.is_not(None), EvaluationRun.spec_version != UseCase.current_spec_version
    )

    def when(cond: Any, value: Any) -> Any:
        return func.sum(case((cond, value), else_=None))

    money = session.execute(
        select(
            func.count(EvaluationRun.id).label("evaluated"),
            func.count(case((established, 1))).label("established"),
            when(established, EvaluationRun.savings_month_usd).label("savings_month_usd"),
            when(established, EvaluationRun.savings_month_low).label("savings_month_low"),
            when(established, EvaluationRun.savings_month_high).label("savings_month_high"),
            func.count(case((and_(established, overloaded), 1))).label("established_under_overload"),
            func.count(case((and_(established, superseded), 1))).label("established_superseded"),
            func.count(case((and_(~ended, ~established), 1))).label("unestablished"),
            when(and_(~ended, ~established), EvaluationRun.savings_month_usd).label("unestablished_usd"),
            func.count(case((ended, 1))).label("ended"),
        )
        .join(last_eval, last_eval.c.id == EvaluationRun.id)
        .join(UseCase, UseCase.id == EvaluationRun.use_case_id)
    ).one()
    # every use case's current decision, the portfolio row's (`_current_decision`), counted as it stands
    # (`decision_standing`, the table's words) in one of three buckets that add up to the rows with a
    # decision: the gate's that stand; those that no longer do ("GO, rejected", "EXTEND, aborted": no
    # bucket the headline showed held them); and those after promotion (a monitor's look, a manual
    # rollback: "GO (monitor)" says no guardrail breached, no gate GO)
    last_dec = _current_decision()
    standing: dict[str, int] = {}
    not_standing: dict[str, int] = {}
    after_promotion: dict[str, int] = {}
    for kind, outcome, resolution, n in session.execute(
        select(GateDecision.kind, GateDecision.outcome, GateDecision.resolution, func.count())
        .join(last_dec, last_dec.c.id == GateDecision.id)
        .group_by(GateDecision.kind, GateDecision.outcome, GateDecision.resolution)
    ):
        words = decision_standing(outcome, resolution, kind=kind)
        if kind != "gate":
            bucket = after_promotion
        else:
            bucket = not_standing if resolution in NOT_STANDING else standing
        bucket[words] = bucket.get(words, 0) + n
    # the Approvals page's cards (decision_waits' rule: an override's first signature waits too)
    pending = len(pending_decisions(session))
    phases = dict(session.execute(select(UseCase.phase, func.count()).group_by(UseCase.phase)).all())
    return {
        "use_cases": sum(phases.values()),
        "evaluated": money.evaluated,
        "savings_month_usd": money.savings_month_usd,
        "savings_month_low": money.savings_month_low,
        "savings_month_high": money.savings_month_high,
        "established": money.established,
        # of those, timed under overload / priced at a spec version that is no longer current
        "established_under_overload": money.established_under_overload,
        "established_superseded": money.established_superseded,
        "unestablished": {"use_cases": money.unestablished, "savings_month_usd": money.unestablished_usd},
        "ended": money.ended,
        "decisions": standing,  # the gate's, standing: GO / EXTEND / NO-GO / INVALID
        "decisions_not_standing": not_standing,  # "GO, rejected": 1
        "decisions_after_promotion": after_promotion,  # "GO (monitor)": 1, "NO-GO (manual rollback)": 1
        "decided": sum(standing.values()) + sum(not_standing.values()) + sum(after_promotion.values()),
        "pending_approvals": pending or 0,
        "phases": phases,
        "observations": session.scalar(select(func.count(Observation.id))) or 0,
    }


# --- one use case ---------------------------------------------------------------------------------


def use_case(session: Session, name: str) -> dict[str, Any] | None:
    uc = session.scalar(select(UseCase).where(UseCase.name == name))
    if uc is None:
        return None
    # the current version (`usecase add --new-version` of an earlier content makes that one current
    # again), not the highest: the page's header, plan, alpha and spec are the CLI's `usecase show`'s
    spec = session.scalar(
        select(SpecVersion)
        .where(SpecVersion.use_case_id == uc.id)
        .order_by((SpecVersion.version == uc.current_spec_version).desc(), SpecVersion.version.desc())
        .limit(1)
    )
    return {
        "id": uc.id,
        "name": uc.name,
        "owner": uc.owner,
        "criticality": uc.criticality,
        "phase": uc.phase,
        "spec_version": spec.version if spec else None,
        "spec": spec.spec if spec else {},
        "dataset_rows": spec.dataset_rows if spec else None,
        "kept_apart": kept_apart_of(spec.validation) if spec else None,
        # the pilot a plan is for and its GO level (rollout.pilots.planned_pilot)
        "planned_pilot": planned_pilot(
            session, uc, (spec.spec if spec else {}).get("gate") or {}, spec.version if spec else None
        ),
        "created_at": uc.created_at,
        "working_now": leases.working_now(session, uc.id),
        "monitor": monitor_state(session, uc.id),
        "running_pilot": running_pilot(session, uc, spec.version if spec else None),
        # "pilot N has ended" is said of a pilot no longer active only (its status, not its number)
        "latest_pilot_ended": session.scalar(
            select(Pilot.status).where(Pilot.use_case_id == uc.id).order_by(Pilot.id.desc()).limit(1)
        )
        not in (None, *ACTIVE_PILOT),
    }


def running_pilot(session: Session, uc: UseCase, current: int | None) -> dict[str, Any] | None:
    """The active pilot where it runs under a spec version other than `current` (a version added while
    it runs applies to the next pilot): its number, its version's spec, dataset rows and kept-apart
    rows, and its GO level fixed when it started, what its plan is made of; None otherwise. The one rule
    of the use-case page and `sparsepilot usecase show`, which plan such a pilot as itself (the page
    said of the running pilot that it "has ended"; `usecase show` planned only the next pilot)."""
    pilot = active_pilot(session, uc)
    if pilot is None or pilot.spec_version in (None, current):
        return None
    _, sv = load_pilot_spec(session, pilot)
    gate = sv.spec.get("gate") or {}
    return {
        "pilot_number": pilot.pilot_number,
        "status": pilot.status,
        "spec_version": sv.version,
        "spec": sv.spec,
        "dataset_rows": sv.dataset_rows,
        "kept_apart": kept_apart_of(sv.validation),
        "planned_pilot": (
            pilot.pilot_number,
            pilot.go_alpha if pilot.go_alpha is not None else gate.get("alpha", DEFAULT_ALPHA),
        ),
    }


def describe_running_pilot(
    running: dict[str, Any], current: int | None, next_pilot: tuple[int | None, float]
) -> str:
    """What a plan of the `running_pilot` is, beside the current spec version `current`, which applies to
    the next pilot (`next_pilot`: its number and GO level, `rollout.pilots.planned_pilot`'s): the words
    of the use-case page and `usecase show`."""
    number, alpha = next_pilot
    which = "the next pilot" if number is None else f"pilot {number}"
    return (
        f"Pilot {running['pilot_number']} is {running['status'].replace('_', ' ')} under spec "
        f"v{running['spec_version']}, its own rules and GO level: the plan above is its. The current "
        f"spec v{current} applies to {which}, whose GO will be held to alpha {alpha:.3g}."
    )


def monitor_state(session: Session, use_case_id: int) -> dict[str, Any] | None:
    """When the promoted champion's monitor last looked (its latest `monitor` decision) and last could not
    (the latest `monitor.skipped` audit entry of that pilot); None when nothing promoted is monitored."""
    uc = session.get(UseCase, use_case_id)
    pilot = promoted_pilot(session, uc) if uc is not None else None
    if pilot is None:
        return None
    look = newest_decision(session, pilot.id, "monitor")
    skip = session.scalar(
        select(AuditEntry)
        .where(
            AuditEntry.use_case_id == uc.id,
            AuditEntry.action == audit.MONITOR_SKIPPED,
            AuditEntry.entity == "pilot",
            AuditEntry.entity_id == str(pilot.id),
        )
        .order_by(AuditEntry.id.desc())
        .limit(1)
    )
    skipped_because = (skip.details or {}).get("explanation") if skip is not None else None
    return {
        "pilot_id": pilot.id,
        "promoted_at": pilot.ended_at,
        "last_look_at": look.created_at if look is not None else None,
        "last_look_outcome": look.outcome if look is not None else None,
        "last_look_decision_id": look.id if look is not None else None,
        "last_skip_at": skip.ts if skip is not None else None,
        # redacted as the Audit page shows it: a row stored before details were stored redacted keeps them
        "last_skip": audit.redacted_details(skipped_because),
    }


def describe_monitor_state(state: dict[str, Any] | None) -> str | None:
    """One line for people: when the monitor last looked (or that it has not since promotion), and when it
    last could not look, if that was after its last look. None when nothing is monitored."""
    if state is None:
        return None

    def at(ts: Any) -> str:
        return "an unknown time" if ts is None else f"{as_utc(ts):%Y-%m-%d %H:%M} UTC"

    if state["last_look_at"] is None:
        line = f"Monitor: no look since the promotion ({at(state['promoted_at'])})"
    else:
        made = decision_words(state["last_look_outcome"], "monitor")  # "GO (monitor)", as every listing
        look = state["last_look_decision_id"]
        line = f"Monitor: last look {at(state['last_look_at'])} ({made}, decision {look})"
    skipped = state["last_skip_at"]
    if skipped is not None and (
        state["last_look_at"] is None or as_utc(skipped) >= as_utc(state["last_look_at"])
    ):
        line += f"; could not look at {at(skipped)}: {state['last_skip']}"
    return line + "."


def use_case_names(session: Session) -> list[str]:
    return list(session.scalars(select(UseCase.name).order_by(UseCase.name)))


def evaluations(session: Session, use_case_id: int) -> list[dict[str, Any]]:
    stmt = (
        select(EvaluationRun, ModelVersion.mlflow_version, ModelVersion.mlflow_model_name)
        .outerjoin(ModelVersion, ModelVersion.id == EvaluationRun.model_version_id)
        .where(EvaluationRun.use_case_id == use_case_id)
        .order_by(EvaluationRun.id)
    )
    uc = session.get(UseCase, use_case_id)
    current = uc.current_spec_version if uc is not None else None
    picked = _shown_evaluation()
    shown = session.scalar(select(picked.c.id).where(picked.c.key == use_case_id))
    out = []
    for ev, mv_version, mv_name in session.execute(stmt):
        # its money by the one rule (rollout.roi.plan_money, in runs.evaluation_summary): a plan that keeps
        # every block shows no payback and says it saves nothing, as the portfolio and Approvals say
        money = runs.evaluation_summary(ev)
        out.append(
            {
                "id": ev.id,
                "status": ev.status,
                "device": ev.device,
                "density": ev.density,
                "quality_delta": ev.quality_delta,
                "quality_low": ev.quality_low,
                "quality_high": ev.quality_high,
                "speedup": ev.speedup,
                "speedup_low": ev.speedup_low,
                "speedup_high": ev.speedup_high,
                "savings_month_usd": ev.savings_month_usd,
                "savings_month_low": ev.savings_month_low,
                "savings_month_high": ev.savings_month_high,
                "payback_days": money["payback_days"],
                "saves_nothing": money["saves_nothing"],
                "spec_version": ev.spec_version,
                "priced_at": roi.priced_at(ev.spec_version, current),  # a superseded spec's dollars
                "shown": ev.id == shown,  # the one whose figures the portfolio shows (_shown_evaluation)
                "report": ev.report or {},
                "roi": ev.roi or {},
                "artifacts": ev.artifacts or {},
                "mlflow_run_id": ev.mlflow_run_id,
                "model_version": mv_version,
                "model_name": mv_name,
                "error": ev.error,
                "created_at": ev.created_at,
            }
        )
    return out


def step_arm_stats(session: Session, use_case_id: int) -> list[dict[str, Any]]:
    """Per pilot step and arm: n, mean quality, error rate, and the latencies the gate judges (SQL GROUP
    BY): mean/min/max latency over the rows measured on a host not overloaded (None where there is none),
    as the gate's p95s and latency guardrail and `latency_histogram`; `latency_left_out`: the others."""
    # avg/min/max skip NULL: an overloaded row's latency is the host's, not the model's
    judged = case((Observation.overloaded.is_(False), Observation.latency_ms), else_=None)
    stmt = (
        select(
            Pilot.id.label("pilot_id"),
            Pilot.pilot_number,
            PilotStep.id.label("step_id"),
            PilotStep.index.label("step_index"),
            PilotStep.kind,
            PilotStep.traffic_pct,
            PilotStep.min_samples,
            PilotStep.status,
            PilotStep.started_at,
            PilotStep.ended_at,
            Observation.arm,
            func.count(Observation.id).label("n"),
            func.avg(Observation.quality).label("quality_mean"),
            func.avg(judged).label("latency_mean"),
            func.min(judged).label("latency_min"),
            func.max(judged).label("latency_max"),
            func.count(case((Observation.overloaded.is_(True), 1), else_=None)).label("latency_left_out"),
            func.avg(case((Observation.error.is_(True), 1.0), else_=0.0)).label("error_rate"),
        )
        .select_from(PilotStep)
        .join(Pilot, Pilot.id == PilotStep.pilot_id)
        .outerjoin(Observation, Observation.pilot_step_id == PilotStep.id)
        .where(Pilot.use_case_id == use_case_id)
        .group_by(Pilot.id, Pilot.pilot_number, PilotStep.id, Observation.arm)
        .order_by(Pilot.id, PilotStep.index, Observation.arm)
    )
    return [dict(r._mapping) for r in session.execute(stmt)]


def step_voids(session: Session, use_case_id: int) -> list[dict[str, Any]]:
    """Per pilot step with void requests (`VoidRequest`: a reference-free request the dense arm gave no
    answer for: used, never evidence, in neither arm), oldest first: the step, its count and `note`, the
    words `usecase show` and the use-case page show (`pilots.void_note`). Steps with none are left out."""
    stmt = (
        select(
            Pilot.pilot_number,
            PilotStep.id.label("step_id"),
            PilotStep.index.label("step_index"),
            PilotStep.kind,
            PilotStep.traffic_pct,
            func.count(VoidRequest.id).label("void"),
        )
        .join(Pilot, Pilot.id == PilotStep.pilot_id)
        .join(VoidRequest, VoidRequest.pilot_step_id == PilotStep.id)
        .where(Pilot.use_case_id == use_case_id)
        .group_by(Pilot.id, Pilot.pilot_number, PilotStep.id)
        .order_by(Pilot.id, PilotStep.index)
    )
    return [dict(r._mapping) | {"note": void_note(r.void)} for r in session.execute(stmt)]


def latency_histogram(session: Session, use_case_id: int, bins: int = 30) -> dict[str, Any]:
    """Latency distribution per arm, binned in SQL over the use case's observations measured on a host
    not overloaded, the latencies the gate judges (its p95s and latency guardrail leave the others out:
    rollout.gate.decide); `overloaded`: the rows left out, per arm."""
    quiet = and_(Observation.use_case_id == use_case_id, Observation.overloaded.is_(False))
    left_out = {
        arm: n
        for arm, n in session.execute(
            select(Observation.arm, func.count())
            .where(Observation.use_case_id == use_case_id, Observation.overloaded.is_(True))
            .group_by(Observation.arm)
        )
    }
    lo, hi = session.execute(
        select(func.min(Observation.latency_ms), func.max(Observation.latency_ms)).where(quiet)
    ).one()
    if lo is None:
        return {"bins": [], "overloaded": left_out}
    width = max((hi - lo) / bins, 1e-9)
    # (latency - lo) / width >= 0, so truncation is floor; the maximum falls into the last bin
    raw = cast((Observation.latency_ms - lo) / width, Integer)
    bucket = case((raw > bins - 1, bins - 1), else_=raw).label("b")
    stmt = (
        select(Observation.arm, bucket, func.count().label("n"))
        .where(quiet)
        .group_by(Observation.arm, bucket)
        .order_by(Observation.arm, bucket)
    )
    return {
        "bins": [
            {"arm": arm, "latency_ms": lo + (int(b) + 0.5) * width, "count": n, "bin_width": width}
            for arm, b, n in session.execute(stmt)
        ],
        "overloaded": left_out,
    }


def pilot_history(session: Session, use_case_id: int) -> list[dict[str, Any]]:
    """The use case's pilots, oldest first: place, challenger, status, GO level (None: started before
    alpha was spent across pilots), dates, and the outcome of their last gate look as it stands
    (`decision_standing`) and the count of their looks."""
    looks = (
        select(
            GateDecision.pilot_id,
            func.count().label("looks"),
            func.max(GateDecision.id).label("last_id"),
        )
        .where(GateDecision.use_case_id == use_case_id, GateDecision.kind == "gate")
        .group_by(GateDecision.pilot_id)
        .subquery()
    )
    last = GateDecision.__table__.alias("last")
    stmt = (
        select(
            Pilot.id,
            Pilot.pilot_number,
            ModelVersion.mlflow_version,
            Pilot.status,
            Pilot.go_alpha,
            Pilot.started_at,
            Pilot.ended_at,
            func.coalesce(looks.c.looks, 0).label("looks"),
            last.c.outcome.label("last_outcome"),
            last.c.resolution.label("last_resolution"),
        )
        .join(ModelVersion, ModelVersion.id == Pilot.model_version_id)
        .outerjoin(looks, looks.c.pilot_id == Pilot.id)
        .outerjoin(last, last.c.id == looks.c.last_id)
        .where(Pilot.use_case_id == use_case_id)
        .order_by(Pilot.id)
    )
    rows = [dict(r._mapping) for r in session.execute(stmt)]
    for r in rows:  # as it stands: a stopped pilot's rejected GO is "GO, rejected"
        r["last_outcome"] = decision_standing(r["last_outcome"], r.pop("last_resolution"))
    return rows


def decisions(session: Session, use_case_id: int) -> list[dict[str, Any]]:
    """The use case's decisions, oldest first, each with `waits_for` (`decision_waits`: what it waits
    for from a person, or None)."""
    stmt = (
        select(GateDecision, PilotStep.index)
        .outerjoin(PilotStep, PilotStep.id == GateDecision.pilot_step_id)
        .where(GateDecision.use_case_id == use_case_id)
        .order_by(GateDecision.id)
    )
    rows = [_decision_dict(d) | {"step_index": idx} for d, idx in session.execute(stmt)]
    overridable = set(_overridable_ids(session))
    signed = _signature_counts(session, [r["id"] for r in rows])
    for r in rows:
        r["waits_for"] = decision_waits(
            r["awaiting"], r["resolution"], signed.get(r["id"], 0), r["id"] in overridable
        )
    return rows


def _signature_counts(session: Session, decision_ids: list[int]) -> dict[int, int]:
    """Per decision, the signatures that count (`live_signatures`: not taken back by `approve --withdraw`
    and, for an override's signature, its signer still an approver: rollout.approvals'
    `counting_signatures` rule, so a former approver's signature waits for no second approver)."""
    counts: dict[int, int] = {}
    for a in live_signatures(approvals(session, decision_ids)):
        counts[a["decision_id"]] = counts.get(a["decision_id"], 0) + 1
    return counts


def _overridable_ids(session: Session) -> list[int]:
    """The open decisions a person may override although they asked nobody: the latest gate decision of
    each running pilot, unresolved and not waiting for a person (rollout.approvals.check_approvable)."""
    latest = _latest_id(GateDecision.id, GateDecision.pilot_id, GateDecision.kind == "gate")
    stmt = (
        select(GateDecision.id)
        .join(latest, latest.c.id == GateDecision.id)
        .join(Pilot, Pilot.id == GateDecision.pilot_id)
        .where(
            Pilot.status == "running",
            GateDecision.awaiting == "none",
            GateDecision.resolution.is_(None),
        )
        .order_by(GateDecision.id)
    )
    return list(session.scalars(stmt))


def _decision_dict(d: GateDecision) -> dict[str, Any]:
    return {
        "id": d.id,
        "use_case_id": d.use_case_id,
        "pilot_id": d.pilot_id,
        "pilot_step_id": d.pilot_step_id,
        "kind": d.kind,
        "look_index": d.look_index,
        "outcome": d.outcome,
        "awaiting": d.awaiting,
        "resolution": d.resolution,
        "evidence": d.evidence or {},
        "explanation": d.explanation,
        "flow_run_id": d.flow_run_id,
        "created_at": d.created_at,
    }


def alias_moves(session: Session, use_case_id: int) -> list[dict[str, Any]]:
    """Every recorded alias move of the use case (pending and failed included), oldest first."""
    stmt = select(AliasMove).where(AliasMove.use_case_id == use_case_id).order_by(AliasMove.id)
    return [
        {
            "id": m.id,
            "alias": m.alias,
            "from_version": m.from_version,
            "to_version": m.to_version,
            "actor": m.actor,
            "reason": m.reason,
            "status": m.status,
            "error": m.error,
            "idempotency_key": m.idempotency_key,
            "created_at": m.created_at,
        }
        for m in session.scalars(stmt)
    ]


def live_signatures(given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The signatures of `approvals(...)` that count: neither withdrawn, nor lapsed, nor a withdrawal."""
    return [a for a in given if not a["withdrawn"] and not a["lapsed"] and a["action"] != "withdraw"]


def signed_by(given: list[dict[str, Any]]) -> list[str]:
    """Who signed a decision, in order, from its `approvals(...)` rows: neither a signature taken back
    (`approve --withdraw`) nor the withdrawal itself (what "approved by ..." names on the Approvals page;
    it named both, "alice, alice, carol"). A signature that lapsed since it took effect is still named."""
    return [a["actor"] for a in given if not a["withdrawn"] and a["action"] != "withdraw"]


def approvals(session: Session, decision_ids: list[int]) -> list[dict[str, Any]]:
    if not decision_ids:
        return []
    from rollout.approvals import signer_subjects, withdrawn_among
    from rollout.auth import OIDC_PREFIX, load_accounts, oidc_approvers, still_approver

    stmt = select(Approval).where(Approval.decision_id.in_(decision_ids)).order_by(Approval.id)
    found = list(session.scalars(stmt))
    # an override's signature counts only while its signer is an approver (rollout.approvals'
    # `counting_signatures`): the accounts and the OIDC approver list as they are now, read once; an
    # OIDC signer's subject is read only where that list is known
    overrides = [a for a in found if a.against_recommendation and a.action != "withdraw"]
    accounts = load_accounts() if overrides else {}
    listed = oidc_approvers() if overrides else None
    oidc = [a for a in overrides if a.actor.startswith(OIDC_PREFIX)] if listed is not None else []
    # only a decision with a `withdraw` row has a withdrawn signature (who withdrew is known by subject
    # too); the subjects all these need in one query, not one per signature or decision (review fix-s)
    withdrawn_in = {a.decision_id for a in found if a.action == "withdraw"}
    judged = [a for a in found if a.decision_id in withdrawn_in]
    subjects = signer_subjects(session, {a.id: a for a in judged + oidc}.values())
    gone = withdrawn_among(judged, subjects)

    def lapsed(a: Approval) -> str | None:
        if not a.against_recommendation or a.action == "withdraw":
            return None
        subject = subjects.get(a.id, "")
        ok, what = still_approver(a.actor, accounts, subject=subject, approvers=listed)
        return None if ok else what

    out = [
        {
            "id": a.id,
            "decision_id": a.decision_id,
            "actor": a.actor,
            "role": a.role,
            "action": a.action,
            "reason": redact(a.reason),  # a reason signed before reasons were stored redacted
            "against_recommendation": a.against_recommendation,
            "withdrawn": a.id in gone,  # its signer took it back (`approve --withdraw`): it counts nothing
            # who took it back and when (their `withdraw` row), or None
            "withdrawn_by": gone[a.id].actor if a.id in gone else None,
            "withdrawn_at": gone[a.id].created_at if a.id in gone else None,
            "lapsed": lapsed(a),  # why an override's signature no longer counts (signer demoted), or None
            "created_at": a.created_at,
        }
        for a in found
    ]
    for a in out:
        a["status"] = signature_status(a)
    return out


def signature_status(a: dict[str, Any]) -> str:
    """Whether a row of `approvals(...)` counts, in words (the Approvals page's "status" column, by
    `live_signatures`' rule): "counts", "withdrawn by NAME at TIME UTC" (`approve --withdraw`),
    "no longer counts: NAME is ..." (an override's signer no longer an approver), or, for the withdrawal
    itself, "a withdrawal: counts nothing". The page listed withdrawn signatures as if they stood."""
    if a["action"] == "withdraw":
        return "a withdrawal: counts nothing"
    if a["withdrawn"]:
        when = a.get("withdrawn_at")
        at = f" at {as_utc(when):%Y-%m-%d %H:%M} UTC" if when is not None else ""
        return f"withdrawn by {a.get('withdrawn_by') or a['actor']}{at}"
    if a["lapsed"]:
        return f"no longer counts: {a['actor']} is {a['lapsed']}"
    return "counts"


# --- approvals ------------------------------------------------------------------------------------


def champion_alarm_waits(alarm: int, name: str) -> str:
    """What a use case waits for while the monitor's alarm `alarm` about its serving champion waits for a
    person: that decision, before any promotion (`approvals.refuse_promotion_while_rollback_waits`)."""
    return (
        f"approval to roll back the champion (the monitor's alarm, decision {alarm}: `sparsepilot "
        f"approve {name} --decision {alarm} --reason TEXT` rolls it back, with `--reject` keeps it), "
        "before any promotion"
    )


def pending_decisions(session: Session) -> list[dict[str, Any]]:
    """Decisions waiting for a person, oldest first, with their use case, any partial approvals and
    `waits_for` (`decision_waits`; where the promotion it waits for is refused by a rule no signature
    passes, that rule's way on, the portfolio's words: `approvals.promotion_refused_waits`): those that ask
    for one, and the latest decision of a running pilot that asked nobody but carries an override's first
    signature (promoting on EXTEND: it waits for a second approver)."""
    overridable = _overridable_ids(session)
    signed = _signature_counts(session, overridable)
    cosign = [i for i in overridable if signed.get(i)]
    rows = _decision_rows(
        session,
        or_(
            and_(GateDecision.awaiting != "none", GateDecision.resolution.is_(None)),
            GateDecision.id.in_(cosign),
        ),
    )
    # the monitor's alarm about a use case's serving champion, waiting for a person: no promotion is signed
    # before it is decided (`approvals.refuse_promotion_while_rollback_waits`)
    waiting = [r for r in rows if r["kind"] == "monitor" and r["awaiting"] == "rollback_approval"]
    alarms = {r["use_case"]: r["id"] for r in waiting}
    for r in rows:
        signatures = len(live_signatures(r["approvals"]))
        person = decision_waits(r["awaiting"], r["resolution"], signatures, r["id"] in cosign)
        # a promotion no signature passes: the portfolio's way on (`_promotion_refused`'s rule), where the
        # card's header read "waiting for approval to promote" above its "Not approvable" warning
        promotes = r["kind"] == "gate" and _waits_for_promotion(r["awaiting"], signatures, r["id"] in cosign)
        alarm = alarms.get(r["use_case"]) if promotes else None
        if alarm is not None:  # the portfolio's words, the alarm first, where it read "approval to promote"
            r["waits_for"] = champion_alarm_waits(alarm, r["use_case"])
            continue
        r["waits_for"] = (_refused_waits(session, r["id"]) if promotes else None) or person
    return rows


def overridable_decisions(session: Session) -> list[dict[str, Any]]:
    """The latest decision of each running pilot that asked nobody and nobody has signed yet (EXTEND,
    NO-GO, INVALID, an earlier step's GO): an approver may start an override of it (promote against the
    recommendation: two approvers, rollout.approvals). Oldest first, shaped as `pending_decisions`."""
    overridable = _overridable_ids(session)
    signed = _signature_counts(session, overridable)
    rows = _decision_rows(session, GateDecision.id.in_([i for i in overridable if not signed.get(i)]))
    for r in rows:
        r["waits_for"] = None
    return rows


def roi_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The money a decision weighs, from an evaluation's figures (`_decision_money`: the evaluation of the
    plan the decision's pilot runs, as `runs.evaluation_summary` gives them, or the use case's portfolio
    row: $/month with its interval and payback), in the portfolio's own rules: `not_established`
    is why no saving is established (`roi.evaluation_pilot_skip`'s finding: the plan keeps every block, no
    saving expected, an interval reaching zero), and then no payback is claimed; `caveats`, the notes the
    figures carry (`timing_overload`, `priced_at`). None: no evaluation priced it."""
    if row is None or row.get("savings_month_usd") is None:
        return None
    money = roi.plan_money(row)  # the one rule of a plan's money, the portfolio's and the use-case page's
    return {
        **{k: money[k] for k in ("savings_month_usd", "savings_month_low", "savings_month_high")},
        "payback_days": money["payback_days"],
        "not_established": money["not_established"],
        "caveats": [c for c in (row.get("measured_under_overload"), row.get("priced_at")) if c],
    }


def _decision_rows(session: Session, where: Any) -> list[dict[str, Any]]:
    stmt = (
        select(GateDecision, UseCase.name, UseCase.criticality, PilotStep.index, PilotStep.traffic_pct)
        .join(UseCase, UseCase.id == GateDecision.use_case_id)
        .outerjoin(PilotStep, PilotStep.id == GateDecision.pilot_step_id)
        .where(where)
        .order_by(GateDecision.id)
    )
    rows = [
        _decision_dict(d) | {"use_case": name, "criticality": crit, "step_index": idx, "traffic_pct": pct}
        for d, name, crit, idx, pct in session.execute(stmt)
    ]
    for r in rows:  # what a promotion is worth, beside the evidence a person signs it on (`roi_summary`)
        r["roi"], r["roi_missing"] = _decision_money(session, r)
    return _with_approvals(session, rows)


def _decision_money(session: Session, row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The money a decision weighs (`roi_summary`) and, where there is none, why in words: for a pilot's
    decision, the evaluation of the model version that pilot runs (`runs.version_evaluation`: the rule
    that judged whether it is piloted), never the use case's newest evaluation, which may be of another
    plan calibrated and evaluated while the decision waits; for a decision of no pilot (a rollback), the
    use case's shown evaluation (`portfolio`)."""
    pilot = session.get(Pilot, row["pilot_id"]) if row.get("pilot_id") is not None else None
    if pilot is None:
        found = portfolio(session, use_case_id=row["use_case_id"])
        money = roi_summary(found[0] if found else None)
        return money, None if money else "no evaluation priced this use case"
    uc = session.get(UseCase, row["use_case_id"])
    plan = f"model version {pilot.model_version_id}, the plan pilot {pilot.pilot_number or pilot.id} runs,"
    ev = runs.version_evaluation(session, uc, pilot.model_version_id)
    if ev is None:
        return None, f"{plan} has no evaluation"
    figures = runs.evaluation_summary(ev)
    figures["priced_at"] = roi.priced_at(ev.spec_version, uc.current_spec_version)
    money = roi_summary(figures)  # no payback for a plan that keeps every block (rollout.roi.plan_money)
    return money, None if money else f"{plan} has an evaluation that priced no saving"


def _with_approvals(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each decision row with the signatures given to it (one query for all of them)."""
    given = approvals(session, [r["id"] for r in rows])
    for r in rows:
        r["approvals"] = [a for a in given if a["decision_id"] == r["id"]]
    return rows


def approved_not_applied(session: Session) -> list[dict[str, Any]]:
    """Decisions decided but not in effect that are not simply still running (rollout.unfinished.stalled:
    an alias move failed, or it was decided over five minutes ago): each resolved, so it waits for no one,
    yet nothing is in effect. Oldest first, with the signatures, what it does (`action`: promote /
    rollback; `automatic`: the monitor's own rollback) and the command that finishes it (the use case's
    next scheduled cycle finishes it too)."""
    from rollout.unfinished import stalled

    rows = [
        _decision_dict(session.get(GateDecision, u.decision_id))
        | {
            k: v
            for k, v in u.to_dict().items()
            if k in ("use_case", "action", "automatic", "failed_move", "command")
        }
        for u in stalled(session)
    ]
    # what MLflow answered where a move failed (the page guessed "MLflow unreachable?" of a model not found)
    keys = [f"{k}:{r['id']}" for r in rows if r["failed_move"] for k in ("promote", "baseline", "rollback")]
    errors = dict(
        session.execute(
            select(AliasMove.idempotency_key, AliasMove.error).where(
                AliasMove.idempotency_key.in_(keys), AliasMove.status == "failed"
            )
        ).all()
    )
    for r in rows:
        failed = [errors[k] for k in errors if k.split(":", 1)[1] == str(r["id"]) and errors[k]]
        r["move_error"] = redact(failed[0]) if failed else None
    return _with_approvals(session, rows)


def decision(session: Session, decision_id: int) -> dict[str, Any] | None:
    d = session.get(GateDecision, decision_id)
    if d is None:
        return None
    out = _decision_dict(d)
    out["use_case"] = session.scalar(select(UseCase.name).where(UseCase.id == d.use_case_id))
    out["approvals"] = approvals(session, [d.id])
    return out


# --- audit ----------------------------------------------------------------------------------------


def audit_facets(session: Session) -> dict[str, list[str]]:
    """What the Audit page filters by; the actors as `audit_entries` shows them (`redacted_name`)."""
    actors = sorted({redacted_name(a) for a in session.scalars(select(AuditEntry.actor).distinct())})
    actions = session.scalars(select(AuditEntry.action).distinct().order_by(AuditEntry.action))
    return {"actors": actors, "actions": list(actions), "use_cases": use_case_names(session)}


def audit_entries(
    session: Session,
    *,
    actors: list[str] | None = None,
    actions: list[str] | None = None,
    use_cases: list[str] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 5000,
) -> list[dict[str, Any]]:
    """Newest first, filtered in SQL; each row's details redacted (`audit.redacted_details`), its actor
    and entity id too (`redacted_name`), as the Audit page shows and exports them: rows written before
    these were stored redacted or refused (`audit.checked_names`) may hold a secret (a URL's password, a
    token), which stays in the stored row (its hash covers it) but is never shown. ``actors`` are names
    as shown (`audit_facets`)."""
    stmt = (
        select(AuditEntry, UseCase.name)
        .outerjoin(UseCase, UseCase.id == AuditEntry.use_case_id)
        .order_by(AuditEntry.id.desc())
        .limit(limit)
    )
    if actors:  # the stored names behind the shown ones (an actor shown masked stands for its own)
        shown, stored = set(actors), session.scalars(select(AuditEntry.actor).distinct())
        stmt = stmt.where(AuditEntry.actor.in_([a for a in stored if redacted_name(a) in shown]))
    if actions:
        stmt = stmt.where(AuditEntry.action.in_(actions))
    if use_cases:
        stmt = stmt.where(UseCase.name.in_(use_cases))
    if since is not None:
        stmt = stmt.where(AuditEntry.ts >= since)
    if until is not None:
        stmt = stmt.where(AuditEntry.ts < until)
    return [
        {
            "id": e.id,
            "ts": e.ts,
            "actor": redacted_name(e.actor),
            "action": e.action,
            "use_case": name,
            "entity": e.entity,
            "entity_id": None if e.entity_id is None else redacted_name(e.entity_id),
            "details": audit.redacted_details(e.details or {}),
        }
        for e, name in session.execute(stmt)
    ]
