"""Whether a person may act on a decision now, each refusal saying why and that nothing was recorded:
a decision that waits for a person or a running pilot's latest (`check_approvable`), a GO whose ramp may
continue (`check_continuable`), one of this use case's (`check_decision_of`), a rollback with somewhere to
return to, a promotion while no rollback of the serving champion waits
(`rollback_before_promotion`: refused when signed, `refuse_promotion_while_rollback_waits`; said on the
Approvals card, `promotion_held_words`), a promotion of a plan calibrated for an earlier spec version's
budget (`promotion_not_calibrated`, `refuse_uncalibrated_promotion`; continuing its ramp too,
`check_continuable`, `continue_held`: said on the card too), a promotion of a GO measured against an
endpoint's champion that changed since its step began (`promotion_over_changed_champion`,
`refuse_promotion_over_changed_champion`: said on the card too); and the lock every signature reads the
decision under (`lock_decision`).

A running pilot's latest gate decision (EXTEND, or a GO before the plan's last step) asks nobody: a
person may only override it (promote, two approvers). Rejecting it used to stop the whole pilot on one
signature, the natural way a new approver tried to take back a mistaken first signature (review U9); the
pilot is stopped by `pilot NAME --abort` and a first signature is taken back by `approve --withdraw`
(`refuse_rejecting_unasked`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout.approvals.base import ApprovalError
from rollout.approvals.in_words import _names
from rollout.approvals.recommendation import ramp_steps_skipped
from rollout.db.models import Approval, AuditEntry, GateDecision, Pilot, UseCase, as_utc
from rollout.db.session import session_scope
from rollout.redact import redact


def check_approvable(session: Any, d: GateDecision) -> None:
    """A person may act on a decision that waits for them, or override the latest gate decision of a
    pilot that is still running (e.g. promote on EXTEND: against the recommendation, two approvers)."""
    if d.resolution == "aborted":  # closed by `pilot NAME --abort` (rollout.pilots): say who and why
        raise ApprovalError(f"decision {d.id} was closed: {_aborted_by(session, d)}; nothing was recorded")
    if d.resolution is not None:
        by = session.scalar(
            select(Approval.actor).where(Approval.decision_id == d.id).order_by(Approval.id.desc())
        )
        raise ApprovalError(
            f"decision {d.id} was already {d.resolution}"
            + (f" by {by}" if by else "")
            + _finish_hint(session, d)
        )
    if d.awaiting != "none":
        return
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    latest = (
        session.scalar(
            select(GateDecision.id)
            .where(GateDecision.pilot_id == d.pilot_id, GateDecision.kind == "gate")
            .order_by(GateDecision.id.desc())
        )
        if pilot
        else None
    )
    if d.kind != "gate" or pilot is None or pilot.status != "running" or latest != d.id:
        raise ApprovalError(
            f"decision {d.id} ({d.kind} {d.outcome}) is not waiting for a person and is not the latest "
            "decision of a running pilot"
        )


def _finish_hint(session: Any, d: GateDecision) -> str:
    """What finishes a resolved decision whose effect did not complete (rollout.unfinished), for the
    refusal of a second signature: an approval's, said while it is not in effect (it may still be being
    carried out), else where its champion move stands (`standing`: in effect since when, or superseded by
    what); a rejection's, said where it has not (`approve --reject` would otherwise be refused again)."""
    from rollout.approvals.standing import standing
    from rollout.unfinished import unfinished_in

    uc = session.get(UseCase, d.use_case_id)
    u = unfinished_in(session, uc) if d.resolution in ("approved", "rejected") else None
    if d.resolution == "approved":
        if u is not None and u.decision_id == d.id and u.action in ("promote", "rollback"):
            return f"; if it did not take effect, `{u.finish_command()}` finishes it"
        found = standing(session, d)
        return "" if found is None else f"; {found.words}"
    if u is None or u.decision_id != d.id or u.action not in ("reject", "keep"):
        return ""
    return f"; it did not take effect: `{u.command()}` finishes it"


def _aborted_by(session: Any, d: GateDecision) -> str:
    """Who aborted the pilot that closed decision `d`, when and why (its `pilot.abort` audit entry)."""
    from rollout.pilots import pilot_label

    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    entry = (
        session.scalar(
            select(AuditEntry)
            .where(
                AuditEntry.action == "pilot.abort",
                AuditEntry.entity == "pilot",
                AuditEntry.entity_id == str(d.pilot_id),
            )
            .order_by(AuditEntry.id.desc())
        )
        if pilot
        else None
    )
    if entry is None:
        return "its pilot was aborted"
    reason = redact((entry.details or {}).get("reason") or "")  # a row stored before details were redacted
    return f"{pilot_label(pilot)} was aborted by {entry.actor} at {as_utc(entry.ts):%Y-%m-%d %H:%M} UTC" + (
        f" (reason: {reason})" if reason else ""
    )


def check_continuable(session: Any, d: GateDecision) -> dict[str, Any]:
    """The ramp step a person may continue the pilot to on decision `d` (`{"index", "traffic_pct"}`): a
    gate's GO that waits for approval before the plan's last step, its pilot still awaiting approval at
    the decision's step, of a plan the current spec version leaves calibrated (`promotion_not_calibrated`,
    the promotion's rule: more traffic for a plan that answers another budget is refused as its promotion
    is; said on the Approvals card, `continue_held`). ApprovalError, saying why, otherwise
    (`check_approvable` first: a resolved or aborted decision is refused with its own words)."""
    check_approvable(session, d)
    head = f"decision {d.id} ({d.kind} {d.outcome}"
    if d.kind != "gate" or d.outcome != "GO" or d.awaiting != "approval":
        raise ApprovalError(
            f"{head}, {'waiting for approval' if d.awaiting != 'none' else 'asking nobody'}): only a gate's "
            "GO that waits for approval can continue the ramp; nothing was recorded"
        )
    later = ramp_steps_skipped(d.evidence)
    if not later:
        raise ApprovalError(
            f"{head}) is at the plan's last step: there is no later ramp step to continue to; promote or "
            "reject it. Nothing was recorded"
        )
    from rollout.db.models import PilotStep
    from rollout.pilots import pilot_label

    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    step = session.get(PilotStep, d.pilot_step_id) if d.pilot_step_id else None
    if pilot is None or step is None:  # pragma: no cover - a gate decision always has both
        raise ApprovalError(f"{head}) has no pilot step to continue from; nothing was recorded")
    if (pilot.status, pilot.current_step_index) != ("awaiting_approval", step.index):
        raise ApprovalError(
            f"{head}): {pilot_label(pilot)} is {pilot.status} at step {pilot.current_step_index}, not "
            f"awaiting approval at step {step.index}; nothing was recorded"
        )
    _refuse_uncalibrated(session, d, "does not continue the ramp")  # more traffic for another budget's plan
    return dict(later[0])


def lock_decision(session: Any, decision_id: int) -> GateDecision:
    """The decision re-read and locked for a read-check-write, after its use case and pilot
    (`pilots.locked`: use case -> pilot -> decision, the one order of every writer of a pilot's state; a
    decision without a pilot, such as a person's rollback, locks its use case). Locking the decision
    first deadlocked PostgreSQL against `pilot --abort`, which locks in that order. ApprovalError when
    the decision does not exist. The caller's transaction is `session_scope(immediate=True)`."""
    from rollout import pilots

    ids = session.execute(
        select(GateDecision.use_case_id, GateDecision.pilot_id).where(GateDecision.id == decision_id)
    ).first()
    if ids is None:
        raise ApprovalError(f"decision {decision_id} does not exist")
    pilots.locked(session, ids.use_case_id, ids.pilot_id)
    d = session.get(GateDecision, decision_id, with_for_update=True, populate_existing=True)
    if d is None:  # pragma: no cover - decisions are never deleted
        raise ApprovalError(f"decision {decision_id} does not exist")
    return d


def check_decision_of(use_case: str, decision_id: int, *, db_url: str | None = None) -> None:
    """Refuse a decision id that is not one of this use case's decisions (ApprovalError; an unknown use
    case is UnknownUseCase)."""
    from rollout.pilots import get_use_case

    with session_scope(db_url) as session:
        uc = get_use_case(session, use_case)
        d = session.get(GateDecision, decision_id)
        if d is None:  # review U4: it was "does not belong to use case", as if it were another's
            open_ = session.scalars(
                select(GateDecision.id)
                .where(GateDecision.use_case_id == uc.id, GateDecision.resolution.is_(None))
                .order_by(GateDecision.id)
            ).all()
            waiting = (
                f"{use_case}'s open decisions: {', '.join(map(str, open_))}"
                if open_
                else f"{use_case} has no open decision; `sparsepilot gate {use_case}` makes one"
            )
            raise ApprovalError(f"decision {decision_id} does not exist ({waiting})")
        if d.use_case_id != uc.id:
            other = session.get(UseCase, d.use_case_id).name
            raise ApprovalError(
                f"decision {decision_id} belongs to use case {other!r}, not {use_case!r}; "
                "nothing was recorded"
            )


def refuse_rejecting_unasked(session: Any, d: GateDecision) -> None:
    """A decision that asked nobody is not rejected (ApprovalError naming what to do instead): that used
    to stop the running pilot on one signature."""
    if d.awaiting != "none" or d.resolution is not None:
        return
    name, pilot = _names(session, d)
    raise ApprovalError(
        f"decision {d.id} ({d.outcome}) asked nobody, so there is nothing to reject; nothing was recorded. "
        f"To stop {pilot}: `sparsepilot pilot {name} --abort --reason TEXT`; to take back your own "
        f"override signature: `sparsepilot approve {name} --decision {d.id} --withdraw --reason TEXT`"
    )


def _require_an_earlier_champion(session: Any, d: GateDecision) -> None:
    """A rollback needs a version to return to. Approving one that has none used to commit the approval,
    then fail to move the alias, and leave the use case waiting for a decision nobody could make."""
    from rollout import registry

    if len(registry.champions(session, d.use_case_id)) < 2:
        raise ApprovalError(
            f"decision {d.id}: there is no earlier champion to roll back to; nothing was recorded. Keep "
            "the champion (reject the rollback: two approvers, as it goes against the monitor) and take it "
            "out of serving by hand if it must go"
        )


def rollback_before_promotion(session: Any, uc: UseCase) -> tuple[str, str] | None:
    """The rollback of the use case's serving champion that waits, which no promotion passes: the
    monitor's alarm waiting for a person (`champion.rollback_waiting`), or a rollback decided but not in
    effect (`rollout.unfinished`); as (what waits, what decides or finishes it), in words; None where none
    waits. The one rule of a promotion signed (`refuse_promotion_while_rollback_waits`), carried out
    (`effects.apply_promotion`: held) and offered on the Approvals page (`promotion_held_words`)."""
    from rollout.champion import rollback_waiting
    from rollout.unfinished import unfinished_in

    alarm = rollback_waiting(session, uc)
    if alarm is not None:
        return (
            f"the monitor's alarm about {uc.name}'s serving champion (decision {alarm}) waits for a person",
            f"Decide the alarm first: roll the champion back (`sparsepilot approve {uc.name} --decision "
            f"{alarm} --reason TEXT`) or keep it (`sparsepilot approve {uc.name} --decision {alarm} --reject "
            "--reason TEXT`)",
        )
    u = unfinished_in(session, uc)
    if u is not None and u.action == "rollback":
        return (
            f"the rollback of {uc.name}'s champion (decision {u.decision_id}) is decided but not in effect",
            f"Finish it first (`{u.finish_command()} --reason TEXT`)",
        )
    return None


def refuse_promotion_while_rollback_waits(session: Any, d: GateDecision) -> None:
    """A promotion (a signature approving a gate decision, the first of an override too) is refused while a
    rollback of the serving champion waits (`rollback_before_promotion`). Two changes of the serving model
    racing each other end production on either: approved meanwhile, pilot 2's GO moved the champion alias
    to its challenger, and the alarm about pilot 1's champion still waited, its approval then "rolling
    back" a champion that no longer served. ApprovalError naming the waiting rollback and the commands
    that decide or finish it; nothing is recorded."""
    if d.kind != "gate":
        return
    uc = session.get(UseCase, d.use_case_id)
    first = rollback_before_promotion(session, uc)
    if first is not None:
        waits, remedy = first
        raise ApprovalError(
            f"decision {d.id} is not promoted while {waits}; nothing was recorded. {remedy}, then promote"
        )


def promotion_not_calibrated(session: Any, d: GateDecision) -> tuple[str, str] | None:
    """A gate decision whose pilot's plan the use case's current spec version left uncalibrated: the
    version changed what calibration reads (a tighter `quality_budget.kl`, another model or dataset)
    after the plan's calibration, by the rule a pilot of it is refused and stopped by
    (`rollout.runs.plan_not_calibrated`). Its GO judged a plan for another budget, so no promotion of it
    is signed (`refuse_uncalibrated_promotion`) or offered (`promotion_held_words`); a rejection is. As
    (what changed, what to do), in words; None where the plan is calibrated under the current version
    (or no calibration of it is recorded), or `d` is no gate decision."""
    from rollout.pilots import pilot_label

    found = _plan_not_calibrated(session, d)
    if found is None:
        return None
    stale, pilot = found
    return (
        f"spec v{stale.version} changed {', '.join(stale.fields)} after the plan {pilot_label(pilot)} "
        f"runs was calibrated under v{stale.calibrated_under}: the plan has not been calibrated under "
        f"v{stale.version}",
        f"Reject it (`sparsepilot approve {stale.use_case} --decision {d.id} --reject --reason TEXT`) and "
        f"run `sparsepilot calibrate {stale.use_case}`: a plan calibrated under v{stale.version} is piloted "
        "anew",
    )


def _plan_not_calibrated(session: Any, d: GateDecision) -> tuple[Any, Pilot] | None:
    """`runs.plan_not_calibrated` of gate decision `d`'s pilot's plan, with the pilot, or None."""
    from rollout import runs

    pilot = session.get(Pilot, d.pilot_id) if d.kind == "gate" and d.pilot_id else None
    if pilot is None:
        return None
    stale = runs.plan_not_calibrated(session, session.get(UseCase, d.use_case_id), pilot.model_version_id)
    return None if stale is None else (stale, pilot)


def promotion_over_changed_champion(session: Any, d: GateDecision) -> tuple[str, str] | None:
    """A gate decision whose pilot's control arm is a served endpoint (`promotion_moves.pilot_control`:
    the champion's server, the production stack), where the champion of ours changed (a rollback, another
    promotion committed) after the decision's step began collecting (`PilotStep.started_at`): its GO was
    measured, in part or in whole, against a champion that no longer serves, the rule the finisher applies
    to a change after the signature (`promotion_moves.ChampionChange.control`: not carried out). So no
    promotion of it is signed (`refuse_promotion_over_changed_champion`) or offered
    (`promotion_held_words`); a rejection is, and continuing the ramp: the next step begins after the
    change, its observations measured against the champion serving then. As (what changed, what to do),
    in words; None where the control is the dense model in the pilot's process (the default: its GO
    stands whichever champion serves), no champion move came since the step began, or `d` is no gate
    decision. Before, such a GO was signed, and promoted over the champion serving then."""
    from rollout.approvals import promotion_moves
    from rollout.pilots import pilot_label

    found = _champion_changed_in_step(session, d)
    if found is None:
        return None
    change, step = found
    v = promotion_moves.version_words
    name = session.get(UseCase, d.use_case_id).name
    return (
        f"the champion changed while {pilot_label(step.pilot)} collected step {step.index}'s observations "
        f"({v(change.signed_over)} served when the step began, {v(change.serving)} serves now), and its "
        f"control arm was {change.control}, not the dense model: the GO was measured against "
        f"{v(change.signed_over)}, the champion of its time, in part or in whole",
        f"Abort the pilot (`sparsepilot pilot {name} --abort --reason TEXT`) and pilot its challenger "
        f"again (`sparsepilot pilot {name} --again --reason TEXT`), measured against {v(change.serving)}",
    )


def _champion_changed_in_step(session: Any, d: GateDecision) -> tuple[Any, Any] | None:
    """The champion change since gate decision `d`'s step began (`promotion_moves.champion_change_since`)
    where its pilot's control arm is a served endpoint, with the step, or None."""
    from rollout.approvals import promotion_moves
    from rollout.db.models import PilotStep

    step = session.get(PilotStep, d.pilot_step_id) if d.kind == "gate" and d.pilot_step_id else None
    if step is None or promotion_moves.pilot_control(session, d) is None:
        return None
    change = promotion_moves.champion_change_since(session, d, step.started_at)
    return None if change is None else (change, step)


def promotion_refused_waits(session: Any, d: GateDecision) -> str | None:
    """What a gate decision that no promotion signature passes waits for, in the portfolio's words
    (`rollout.queries.waits_for`, where it said "approval to promote", or "a second approver" of an
    override's first signature, which the same rules refuse): the card's (`promotion_held_words`) in short,
    its way on first. A plan the current spec version left uncalibrated (`promotion_not_calibrated`): a
    rejection, then a calibration (its way on stands for a changed champion too: the plan calibrated anew is
    piloted against the champion serving then); else a GO measured against an endpoint's champion that
    changed during its step (`promotion_over_changed_champion`): the abort and `pilot --again`. None where
    neither holds. A rollback of the champion that waits is not said here (`queries.waits_for` says it
    first)."""
    from rollout.approvals import promotion_moves

    stale = _plan_not_calibrated(session, d)
    if stale is not None:
        nc, name = stale[0], stale[0].use_case
        return (
            f"a rejection, then a calibration under spec v{nc.version} (v{nc.version} changed "
            f"{', '.join(nc.fields)} after the plan was calibrated under v{nc.calibrated_under}; no "
            f"promotion of it is signed): `sparsepilot approve {name} --decision {d.id} --reject --reason "
            f"TEXT`, then `sparsepilot calibrate {name}`"
        )
    moved = _champion_changed_in_step(session, d)
    if moved is None:
        return None
    change, v = moved[0], promotion_moves.version_words
    name = session.get(UseCase, d.use_case_id).name
    abort, again = (f"`sparsepilot pilot {name} --{what} --reason TEXT`" for what in ("abort", "again"))
    return (
        f"an operator: abort the pilot ({abort}) and pilot its challenger again ({again}), measured "
        f"against {v(change.serving)} (its GO was measured against {v(change.signed_over)}, the champion "
        "when its step began; no promotion of it is signed)"
    )


def refuse_promotion_over_changed_champion(session: Any, d: GateDecision) -> None:
    """A promotion (a signature approving a gate decision, an override's first too) is refused where the
    GO was measured against an endpoint's champion that changed since its step began
    (`promotion_over_changed_champion`): ApprovalError saying what changed and the way on; nothing is
    recorded."""
    _refuse(d, promotion_over_changed_champion(session, d), "is not promoted")


def refuse_uncalibrated_promotion(session: Any, d: GateDecision) -> None:
    """A promotion (a signature approving a gate decision, an override's first too) is refused where the
    plan was not calibrated under the current spec version (`promotion_not_calibrated`): ApprovalError
    saying what changed and what to do; nothing is recorded."""
    _refuse_uncalibrated(session, d, "is not promoted")


def _refuse_uncalibrated(session: Any, d: GateDecision, refused: str) -> None:
    """ApprovalError `decision D <refused>: <what changed>; nothing was recorded. <what to do>` where
    `promotion_not_calibrated` finds the plan uncalibrated under the current spec version."""
    _refuse(d, promotion_not_calibrated(session, d), refused)


def _refuse(d: GateDecision, found: tuple[str, str] | None, refused: str) -> None:
    """ApprovalError `decision D <refused>: <what changed>; nothing was recorded. <what to do>` where a
    rule found (what changed, what to do) for decision `d`; nothing where `found` is None."""
    if found is not None:
        changed, remedy = found
        raise ApprovalError(f"decision {d.id} {refused}: {changed}; nothing was recorded. {remedy}")


def promotion_held_words(session: Any, decision_id: int) -> str | None:
    """Why a gate decision cannot be approved for promotion now, in the Approvals card's words (its
    promote button disabled): the rollback that waits and what decides it (`rollback_before_promotion`),
    or a plan the current spec version left uncalibrated (`promotion_not_calibrated`, which refuses
    continuing its ramp too, said where the GO could: `continue_held`): the rules the signature is
    refused by; None where nothing holds it (or it is no gate decision). Where both hold, both are said,
    the calibration's first: it stands once the rollback is decided, and it is why the continue button is
    disabled (the card said only the rollback's words, "then approve the promotion", which the calibration
    rule then refused)."""
    d = session.get(GateDecision, decision_id)
    if d is None or d.kind != "gate":
        return None
    first = rollback_before_promotion(session, session.get(UseCase, d.use_case_id))
    stale = promotion_not_calibrated(session, d)
    moved = promotion_over_changed_champion(session, d)
    if stale is None and moved is None:
        if first is None:
            return None
        waits, remedy = first
        return f"Not approvable now: {waits}. {remedy}, then approve the promotion."
    ramp = (
        ", and its ramp does not continue"
        if stale is not None and d.awaiting == "approval" and ramp_steps_skipped(d.evidence)
        else ""
    )
    standing = [f"{changed}. {remedy}." for changed, remedy in filter(None, (stale, moved))]
    words = f"Not approvable{ramp}: {' Besides, '.join(standing)}"
    if first is None:
        return words
    waits, decide = first
    return f"{words} Besides, {waits}. {decide}."


def continue_held(session: Any, decision_id: int) -> bool:
    """Whether continuing the ramp on decision `decision_id` is refused by the calibration rule
    (`promotion_not_calibrated`, which `check_continuable` asks): the Approvals card's continue button
    disabled, `promotion_held_words` saying why. A rollback that waits holds no continuing: it promotes
    nothing."""
    d = session.get(GateDecision, decision_id)
    return d is not None and promotion_not_calibrated(session, d) is not None
