"""What a resolved decision does (called by the resumed flow, or directly when no flow waits): promote,
continue the ramp, stop the pilot, keep the champion, roll back; and what an approved promotion left
undone (`unfinished_promotion`).

The effects trust the database, not their caller: the acting identity is read back from the Approval row
(a forged run input cannot promote anything), and every alias move goes through rollout.registry with an
idempotency key derived from the decision, so a retried flow converges on the same move."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout import audit, champion, lifecycle
from rollout.approvals import promotion_moves
from rollout.approvals.base import ApprovalError, ApprovalPayload, ClaimRefused, PromotionHeld
from rollout.auth import Identity, require_approver
from rollout.db.models import AliasMove, Approval, GateDecision, ModelVersion, Pilot, UseCase
from rollout.db.session import session_scope


def approval_identity(
    approval_id: int, decision_id: int, *, actions: tuple[str, ...], db_url: str | None = None
) -> Identity:
    """The Identity that signed `approval_id` for `decision_id` with one of `actions`, re-checked."""
    with session_scope(db_url) as session:
        row = session.get(Approval, approval_id)
        if row is None or row.decision_id != decision_id or row.action not in actions:
            raise ApprovalError(
                f"approval {approval_id} is not a {'/'.join(actions)} of decision {decision_id}"
            )
        d = session.get(GateDecision, decision_id)
        if d is None or d.resolution not in ("approved", "rejected", "continued"):
            raise ApprovalError(f"decision {decision_id} is not resolved; nothing to carry out")
        who = Identity(name=row.actor, role=row.role, source="approval")  # type: ignore[arg-type]
    return require_approver(who, f"carry out decision {decision_id}")


def apply_decision(
    decision_id: int, payload: ApprovalPayload, *, db_url: str | None = None
) -> dict[str, Any]:
    """Carry out a resolved decision: promote, stop the pilot, roll back, or (a continued ramp, done when
    it was signed) report where the pilot runs now."""
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        if d is None:
            raise ApprovalError(f"decision {decision_id} does not exist")
        awaiting = d.awaiting
    if payload.continue_ramp:
        return apply_continue(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
    if awaiting == "rollback_approval":
        if payload.approve:
            return apply_rollback(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
        return apply_keep(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
    if payload.approve:
        return apply_promotion(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)
    return apply_rejection(decision_id, payload.approval_id, reason=payload.reason, db_url=db_url)


def baseline_version_id(use_case_name: str, *, db_url: str | None = None) -> int | None:
    """The use case's registered dense baseline (plan metadata 'baseline' = 'dense'), if any."""
    from rollout import pilots
    from rollout.db.models import ModelVersion

    with session_scope(db_url) as session:
        uc = pilots.get_use_case(session, use_case_name)
        for mv in session.scalars(
            select(ModelVersion).where(ModelVersion.use_case_id == uc.id).order_by(ModelVersion.id)
        ):
            if (mv.plan or {}).get("metadata", {}).get("baseline") == "dense" and mv.mlflow_version:
                return mv.id
    return None


def _resolved_and_locked(
    session: Any, decision_id: int, resolution: str, *, to: str
) -> tuple[GateDecision, UseCase, Pilot]:
    """What an effect on a decision's pilot starts with (`apply_promotion`, `apply_continue`): the
    decision, refused unless it was resolved ``resolution`` and has a pilot ``to`` act on, with its use
    case and pilot locked (`pilots.locked`: the order every writer of a pilot's state takes)."""
    from rollout import pilots

    d = session.get(GateDecision, decision_id)
    if d is None:
        raise ApprovalError(f"decision {decision_id} does not exist")
    if d.resolution != resolution:
        raise ApprovalError(f"decision {decision_id} is {d.resolution}, not {resolution}")
    if d.pilot_id is None:
        raise ApprovalError(f"decision {decision_id} has no pilot to {to}")
    uc, pilot = pilots.locked(session, d.use_case_id, d.pilot_id)
    return d, uc, pilot


def _require_claim(session: Any, d: GateDecision, finished_by: str | None, *, then: str) -> None:
    """An effect carried out only by whoever holds decision `d` now (`waiter.effect_refusal`), asked in
    the effect's own transaction, under the decision's lock (its use case's row, which every claim
    holds too: `lock_decision`), before anything moves and again in its last transaction: ClaimRefused,
    naming who holds the claim since when, and `then` (what this caller did). Before, only the finishers'
    checks asked: a caller that had not claimed (or whose claim another had taken over) carried the
    effect out beside its claimant."""
    from rollout.approvals.waiter import claim_of, effect_refusal

    why = effect_refusal(claim_of(session, d), d.id, finished_by)
    if why is not None:
        raise ClaimRefused(f"{why}; {then}")


def apply_promotion(
    decision_id: int,
    approval_id: int,
    *,
    reason: str,
    finished_by: str | None = None,
    db_url: str | None = None,
) -> dict[str, Any]:
    """challenger -> champion for the decision's pilot. Before a use case's first promotion the dense
    baseline (what was serving) is recorded as champion, so a rollback has somewhere to return to.
    `finished_by`: who finishes an approved promotion that did not complete (`_finisher`). Where the
    champion changed since the GO was signed (a rollback decided while it was held), it is promoted over
    the champion serving now, its stale move recorded again from it (`promotion_moves`, the one rule);
    unless the pilot's control arm was a served endpoint, whose answers were the champion's of its time:
    then it is not promoted (`_abandon_promotion`)."""
    from rollout import pilots, registry

    who = approval_identity(approval_id, decision_id, actions=("approve",), db_url=db_url)
    said, reason = reason, _signers_reason(decision_id, approval_id, reason, finished_by, db_url)
    shown = _shown_in_mlflow(decision_id, db_url)
    with session_scope(db_url, immediate=True) as session:
        d, uc, pilot = _resolved_and_locked(session, decision_id, "approved", to="promote")
        _require_claim(session, d, finished_by, then="nothing was moved")
        _require_pilot_to_promote(d, pilot, moved=False)
        _hold_while_rollback_waits(session, d, uc, shown=shown)
        change = None if shown else promotion_moves.champion_change(session, d)
        if change is not None and change.control is not None:  # measured against the champion of its time
            return _abandon_promotion(session, d, uc, pilot, change, actor=who.name)
        if not shown:
            _supersede_stale_move(session, d, change, actor=who.name)
        key = promotion_moves.key_now(session, decision_id)
        if change is not None:  # said in the alias history too, under the signer's reason
            reason = f"{reason} ({change.words()})"
        name, mv_id = uc.name, pilot.model_version_id
        has_champion = bool(registry.champions(session, uc.id))
        keys = [key] + ([] if has_champion else [f"baseline:{decision_id}"])
        moved_before = all(_move_status(session, k) == "committed" for k in keys)
    moves = []
    if not has_champion:
        base = baseline_version_id(name, db_url=db_url)
        if base is not None:
            moves.append(
                registry.set_alias(
                    name,
                    "champion",
                    model_version_id=base,
                    actor=who,
                    reason=(
                        "record the dense baseline that served before the first promotion "
                        f"(decision {decision_id})"
                    ),
                    idempotency_key=f"baseline:{decision_id}",
                    db_url=db_url,
                )
            )
    moves.append(
        registry.promote(
            name,
            model_version_id=mv_id,
            actor=who,
            reason=reason,
            idempotency_key=key,
            db_url=db_url,
        )
    )
    with session_scope(db_url, immediate=True) as session:
        d = session.get(GateDecision, decision_id)
        uc, pilot = pilots.locked(session, d.use_case_id, d.pilot_id)
        _require_claim(session, d, finished_by, then=_LEFT_TO_CLAIMANT)
        _require_pilot_to_promote(d, pilot, moved=True)
        # in effect already (its own run completed it while this one finished it): nothing to record
        done = not (moved_before and pilot.status == uc.phase == "promoted")
        # promoted on an earlier step's GO (two approvers): the steps not run are "skipped", not passed
        skipped = d.awaiting != "approval"
        pilots.stop_pilot(
            session,
            pilot,
            status="promoted",
            actor=who.name,
            reason=reason,
            open_steps="skipped" if skipped else None,
        )
        # an earlier promoted pilot whose champion this one replaced is no longer "the promoted pilot"
        pilots.replace_earlier(
            session,
            pilot,
            registry.champions(session, uc.id),
            actor=who.name,
            reason=f"decision {decision_id}: {pilots.pilot_label(pilot)} promoted over it",
        )
        lifecycle.set_phase(
            session, uc, "promoted", actor=who.name, reason=f"decision {decision_id} approved"
        )
        if done:
            if change is not None:
                audit.record(
                    session,
                    who.name,
                    CHAMPION_CHANGED,
                    on=pilot,
                    details={
                        "decision_id": decision_id,
                        "signed_over": change.signed_over,
                        "promoted_over": change.serving,
                        "why": change.words(),
                    },
                )
            signed_at = session.get(Approval, approval_id).created_at
            spec_changed = finished_by and promotion_moves.spec_changed_since(session, d, signed_at)
            _finisher(
                session,
                d,
                finished_by,
                said,
                action="promote",
                approval_id=approval_id,
                signer=who.name,
                spec_changed=spec_changed or None,
            )
    out = {
        "action": "promoted",
        "decision_id": decision_id,
        "alias_moves": [_move_dict(m) for m in moves],
        "done": done,
    }
    return out if change is None else out | {"champion_changed": change.words()}


# the audit action, on the pilot, of a promotion carried out over a champion that changed since its GO was
# signed (`promotion_moves.champion_change`)
CHAMPION_CHANGED = "promotion.champion_changed"


def _abandon_promotion(
    session: Any, d: GateDecision, uc: UseCase, pilot: Pilot, change: Any, *, actor: str
) -> dict[str, Any]:
    """An approved promotion whose champion changed since its GO was signed, where the pilot's control arm
    was a served endpoint (`promotion_moves.ChampionChange.control`): its GO was measured against what
    that endpoint served, the champion of its time (one the monitor's alarm rolled back, say), so it is
    not carried out over the champion serving now. Before, it was promoted over it "as signed", on the
    rule of a dense control. Its recorded move not in effect, if any, is marked superseded
    (`registry.supersede`), its pilot stopped (one a person may pilot again: `pilots.was_aborted`), the
    use case stopped, and a `promotion.superseded` audit entry says why. The decision stays approved (a
    resolved decision never changes); nothing moves."""
    from rollout import pilots, registry

    why = (
        f"decision {d.id}'s promotion was approved but is not carried out: {change.words()}; pilot again: "
        f"{pilots.pilot_aborted_again(uc.name)}"
    )
    move = promotion_moves.current_move(session, d.id)
    if move is not None and move.status not in ("committed", registry.SUPERSEDED):
        registry.supersede(session, move, actor=actor, why=why)
    pilots.stop_pilot(session, pilot, status="stopped", actor=actor, reason=why)
    lifecycle.set_phase(session, uc, "stopped", actor=actor, reason=f"decision {d.id}: promotion superseded")
    audit.record(
        session,
        actor,
        PROMOTION_SUPERSEDED,
        on=pilot,
        details={
            "decision_id": d.id,
            "signed_over": change.signed_over,
            "serving": change.serving,
            "control": change.control,
            "why": why,
        },
    )
    return {"action": "superseded", "decision_id": d.id, "alias_moves": [], "done": True, "reason": why}


# the audit action of `_abandon_promotion`, on the pilot: a person may pilot its challenger again
PROMOTION_SUPERSEDED = "promotion.superseded"


def promotion_held(session: Any, d: GateDecision) -> bool:
    """Whether an approved promotion is held (`_hold_while_rollback_waits`): its move not committed, and
    the monitor's alarm about the serving champion waits for a person. `rollout.unfinished` does not offer
    it to be finished meanwhile (the cycle tried, and was refused, every tick; the portfolio said "the
    promotion to be finished" where the alarm is what waits: `queries.waits_for`). Read from the state DB
    alone (the portfolio asks it, and MLflow is likely down where a move failed): a move MLflow shows done
    all the same (`_shown`) is recorded by a person's `promote --decision`, which asks MLflow."""
    move = promotion_moves.current_move(session, d.id)
    return (move is None or move.status != "committed") and champion.rollback_waiting(
        session, session.get(UseCase, d.use_case_id)
    ) is not None


def _shown(session: Any, decision_id: int) -> bool:
    """Whether the promotion's champion move, recorded but not committed (pending: cut off after MLflow was
    called; failed), has taken effect all the same: MLflow's champion alias points at its target. A move
    MLflow does not show (or cannot be asked about) has not taken effect."""
    from rollout import registry

    move = promotion_moves.current_move(session, decision_id)
    if move is None or move.status in ("committed", registry.SUPERSEDED):
        return False
    return registry.points_at(session.get(UseCase, move.use_case_id).name, "champion", move.to_version)


def _shown_in_mlflow(decision_id: int, db_url: str | None) -> bool:
    """`_shown` in its own transaction, asked before an effect's (MLflow is not called under its lock)."""
    with session_scope(db_url) as session:
        return _shown(session, decision_id)


def _supersede_stale_move(session: Any, d: GateDecision, change: Any, *, actor: str) -> None:
    """An approved promotion's recorded move that never took effect and went stale (`registry.stale_move`:
    a later champion move, a rollback, committed since) is never retried: retried, MLflow moved from the
    champion serving now while its row said from the one before, and the lineage (row order) named a
    champion MLflow did not serve. It is marked superseded (`registry.supersede`), and the promotion's
    move is recorded again from the champion serving now (`promotion_moves.key_now`), the rule of a
    promotion held with no move recorded (`promotion_moves`). Before, the promotion was abandoned: its
    pilot and use case stopped, for `pilot --again`. Nothing where its move is not stale."""
    from rollout import registry

    move = promotion_moves.current_move(session, d.id)
    stale = None if move is None else registry.stale_move(session, move)
    if stale is None:
        return
    then = f"; {change.words()}" if change is not None else ""
    why = (
        f"{stale}; decision {d.id}'s promotion is recorded again from the champion serving now "
        f"('promote:{d.id}:{move.id}'){then}"
    )
    registry.supersede(session, move, actor=actor, why=why)


def _hold_while_rollback_waits(session: Any, d: GateDecision, uc: UseCase, *, shown: bool) -> None:
    """An approved promotion is not carried out while a rollback of the serving champion waits
    (`checks.rollback_before_promotion`, the rule its signature was checked by): the monitor may record
    its alarm after the GO was signed and before the promotion's run moves the alias. Promoted over it,
    the alarm was left about a champion that no longer served, its approval "rolling back" and moving
    nothing. PromotionHeld, under the decision's lock, before any move: the approval stands, and the
    promotion is finished once the alarm is decided (`rollout.unfinished`: the cycle, or `promote
    --decision`). Only a move in effect is finished as begun: committed (the state DB's side is left), or
    `shown` (MLflow's alias points at its target: `_shown_in_mlflow`). Before, any recorded move was, a
    failed one too: the cycle promoted over the alarm. Its words say from when the promotion is finished
    once the alarm is decided (`unfinished.held_finished_by`, the portfolio's): they said "at once by
    `promote --decision`", which is refused in its signer's grace (or its approval run's time)."""
    from rollout.approvals.checks import rollback_before_promotion

    move = promotion_moves.current_move(session, d.id)
    if shown or (move is not None and move.status == "committed"):
        return
    first = rollback_before_promotion(session, uc)
    if first is None:
        return
    waits, remedy = first
    # not "at once": `promote --decision` is refused until its signer's grace (or its run's time) is over
    # (`unfinished.refuse_while_applied`), by the portfolio's words of it (`unfinished.held_finished_by`)
    from rollout.unfinished import held_finish_from, held_finished_by

    signed = session.scalar(
        select(Approval.created_at)
        .where(Approval.decision_id == d.id, Approval.action == "approve")
        .order_by(Approval.id.desc())
    )
    finish_from, after = held_finish_from(session, d, signed)
    then = held_finished_by(
        finish_from, f"sparsepilot promote {uc.name} --decision {d.id} --reason TEXT", after
    )
    raise PromotionHeld(
        f"decision {d.id} is approved, but not promoted while {waits}; nothing was moved, the approval "
        f"stands. {remedy}; once it is decided, the promotion is finished {then}"
    )


def _require_pilot_to_promote(d: GateDecision, pilot: Pilot, *, moved: bool) -> None:
    """The pilot an approved GO promotes must still be live (or promoted by this decision already, on a
    retry): one stopped or rolled back since (an abort is refused once the GO is approved, `abort_pilot`)
    is never brought back to "promoted"."""
    from rollout.pilots import ACTIVE_PILOT, pilot_label

    if pilot.status in (*ACTIVE_PILOT, "promoted"):
        return
    done = (
        "its champion move committed already (alias history): the use case's state is left as it is, "
        "for a person to decide"
        if moved
        else "nothing moved"
    )
    raise ApprovalError(f"decision {d.id}: {pilot_label(pilot)} is {pilot.status}, not promotable; {done}")


def continue_in(session: Any, d: GateDecision, *, actor: str, reason: str) -> dict[str, Any]:
    """The effect of continuing the ramp on decision `d`, in the caller's transaction (with the use case
    and the pilot locked): what `decisions.act_on` does for a GO at a step that is not final. The pilot
    runs again, its next step opens (`pilots.advance`: the decision's step stays passed, its end the GO's
    time) and the use case is piloting. Returns where the pilot now is."""
    from rollout import pilots

    uc = session.get(UseCase, d.use_case_id)
    pilot = session.get(Pilot, d.pilot_id)
    spec, _ = pilots.load_pilot_spec(session, pilot)  # the pilot's own plan, never a newer version's
    why = f"decision {d.id}: ramp continued by {actor} ({reason})"
    pilots.stop_pilot(session, pilot, status="running", actor=actor, reason=why)
    new = pilots.advance(session, pilot, spec, actor=actor, decision_id=d.id)
    lifecycle.set_phase(session, uc, "piloting", actor=actor, reason=why)
    return {
        "action": "continued",
        "decision_id": d.id,
        "pilot": pilots.pilot_label(pilot),
        "pilot_status": pilot.status,
        "step_index": new.index,
        "traffic_pct": new.traffic_pct,
    }


def apply_continue(
    decision_id: int, approval_id: int, *, reason: str, db_url: str | None = None
) -> dict[str, Any]:
    """A continued ramp, for the approval run that was resumed with it: the signature carried it out
    already (`approve`), so this reports where the pilot runs now. Should the pilot still await approval
    at the decision's step (a record written otherwise), it is continued here, once, under the lock."""
    from rollout import pilots
    from rollout.db.models import PilotStep

    who = approval_identity(approval_id, decision_id, actions=("continue",), db_url=db_url)
    with session_scope(db_url, immediate=True) as session:
        d, _uc, pilot = _resolved_and_locked(session, decision_id, "continued", to="continue")
        step = session.get(PilotStep, d.pilot_step_id)
        if (pilot.status, pilot.current_step_index) == ("awaiting_approval", step.index):
            return continue_in(session, d, actor=who.name, reason=reason)
        now = pilots.current_step(session, pilot)
        return {
            "action": "continued",
            "decision_id": decision_id,
            "pilot": pilots.pilot_label(pilot),
            "pilot_status": pilot.status,
            "step_index": now.index,
            "traffic_pct": now.traffic_pct,
        }


def apply_rejection(
    decision_id: int,
    approval_id: int,
    *,
    reason: str,
    finished_by: str | None = None,
    db_url: str | None = None,
) -> dict[str, Any]:
    """A rejected GO: the pilot is stopped, and the use case. Safe to repeat: a pilot no longer live
    (stopped already, by this rejection or since) is left as it is (`done`: False)."""
    from rollout import pilots

    who = approval_identity(approval_id, decision_id, actions=("reject",), db_url=db_url)
    said, reason = reason, _signers_reason(decision_id, approval_id, reason, finished_by, db_url)
    with session_scope(db_url, immediate=True) as session:
        d = session.get(GateDecision, decision_id)
        assert d is not None
        uc, pilot = pilots.locked(session, d.use_case_id, d.pilot_id)
        _require_claim(session, d, finished_by, then="nothing was changed")
        if pilot is not None and pilot.status not in ("running", "awaiting_approval"):
            return {"action": "stopped", "decision_id": decision_id, "done": False}
        if pilot is not None:
            pilots.stop_pilot(session, pilot, status="stopped", actor=who.name, reason=reason)
        lifecycle.set_phase(session, uc, "stopped", actor=who.name, reason=f"decision {decision_id} rejected")
        _finisher(session, d, finished_by, said, action="reject", approval_id=approval_id, signer=who.name)
    return {"action": "stopped", "decision_id": decision_id, "done": True}


def apply_keep(
    decision_id: int,
    approval_id: int,
    *,
    reason: str,
    finished_by: str | None = None,
    db_url: str | None = None,
) -> dict[str, Any]:
    """A person kept the champion through the monitor's alarm: the use case is promoted again, so the
    monitor resumes, and its detector starts afresh after the kept alarm (`pilots.monitor_observations`).
    Safe to repeat: only a use case still awaiting this approval moves (`done`: whether it did)."""
    who = approval_identity(approval_id, decision_id, actions=("reject",), db_url=db_url)
    said, reason = reason, _signers_reason(decision_id, approval_id, reason, finished_by, db_url)
    with session_scope(db_url, immediate=True) as session:
        d = session.get(GateDecision, decision_id)
        assert d is not None
        uc = session.get(UseCase, d.use_case_id, with_for_update=True, populate_existing=True)
        _require_claim(session, d, finished_by, then="nothing was changed")
        # only the phase the alarm moved (`decisions.monitor_look`: a promoted use case's): a GO of another
        # challenger awaiting approval is not the champion's to move on
        if uc.phase != "awaiting_approval" or not champion.phase_is_champions(session, uc):
            return {"action": "kept", "decision_id": decision_id, "done": False}
        lifecycle.set_phase(
            session,
            uc,
            "promoted",
            actor=who.name,
            reason=f"decision {decision_id}: champion kept ({reason})",
        )
        _finisher(session, d, finished_by, said, action="keep", approval_id=approval_id, signer=who.name)
    return {"action": "kept", "decision_id": decision_id, "done": True}


def apply_rollback(
    decision_id: int,
    approval_id: int | None,
    *,
    reason: str,
    automatic: bool = False,
    finished_by: str | None = None,
    db_url: str | None = None,
) -> dict[str, Any]:
    """champion -> the previous champion from our own alias history; idempotent per decision. An
    automatic rollback acts as the monitor's system identity, which the registry only lets through
    when the use case's rollback policy is 'auto'. A rollback undoes the champion its decision was
    about (`rollback_about`): where another rollback or promotion has moved the champion since, nothing
    moves (a person's rollback and the monitor's, one after the other, used to roll back two versions)
    and the decision is closed "superseded" with an audit entry. The use case's phase moves to
    `rolled_back` only where it is the champion's (`champion.phase_is_champions`): rolled back while
    another challenger pilots, the pilot goes on and the use case stays piloting."""
    from rollout import pilots, registry

    if automatic:
        who = registry.SYSTEM_MONITOR
    else:
        if approval_id is None:
            raise ApprovalError(f"rollback of decision {decision_id} needs a person's approval")
        who = approval_identity(approval_id, decision_id, actions=("approve", "rollback"), db_url=db_url)
    said, reason = reason, _signers_reason(decision_id, approval_id, reason, finished_by, db_url)
    key = f"rollback:{decision_id}"
    with session_scope(db_url, immediate=True) as session:
        if session.get(GateDecision, decision_id) is None:
            raise ApprovalError(f"decision {decision_id} does not exist")
        name = session.get(UseCase, session.get(GateDecision, decision_id).use_case_id).name
        d = _locked_for_rollback(session, name, decision_id)[2]
        _require_claim(session, d, finished_by, then="nothing was moved")
        about = rollback_about(session, d)
        done = session.scalar(select(AliasMove.status).where(AliasMove.idempotency_key == key))
        serving = registry.champions(session, d.use_case_id)[-1:]
        if done != "committed" and about is not None and serving != [about]:
            now = serving[0] if serving else None
            why = (
                f"decision {decision_id} asked to roll back champion v{about}, but "
                + (f"v{now} serves now" if now else "no champion of ours serves now")
                + " (another rollback or promotion came first): nothing moved"
            )
            _supersede(session, d, who.name, f"v{now}" if now else "no champion", about=about, serving=now)
            return {"action": "none", "decision_id": decision_id, "reason": why}
    try:
        move = registry.rollback(
            name, actor=who, reason=reason, idempotency_key=key, expected=about, db_url=db_url
        )
    except registry.MoveInProgress as busy:
        if not automatic:
            raise
        # a person's rollback is moving the champion now: the monitor's gives way (its own never began)
        with session_scope(db_url, immediate=True) as session:
            d = _locked_for_rollback(session, name, decision_id)[2]
            _supersede(session, d, who.name, str(busy), about=about)
        return {"action": "none", "decision_id": decision_id, "reason": str(busy)}
    with session_scope(db_url, immediate=True) as session:
        # locked first, as every writer of a use case (use case -> pilot -> decision, the audit chain last):
        # the chain's lock taken before the use case's row (the pilot's status change is audited before
        # the phase moves) deadlocked on PostgreSQL against a writer holding the row, queueing for it
        uc, promoted, d = _locked_for_rollback(session, name, decision_id)
        _require_claim(session, d, finished_by, then=_LEFT_TO_CLAIMANT)
        # the pilot rolled back: the promoted one whose champion the decision is about. In effect already
        # (its own run completed it while this one finished it), the promoted one is the pilot serving
        # again since: nothing is recorded, nor that pilot stopped
        if about is None:  # a record that cannot say (written before the field): read by the phase
            rolled = promoted if uc.phase != "rolled_back" else None
        else:
            rolled = (
                promoted if promoted is not None and champion.version_of(session, promoted) == about else None
            )
        moves_phase = champion.phase_is_champions(session, uc)  # its phase is the champion's: rolled back
        changed = done != "committed" or rolled is not None or d.resolution is None or moves_phase
        if changed:
            if d.resolution is None:
                d.resolution = "auto_rolled_back" if automatic else "approved"
            if rolled is not None:
                pilots.stop_pilot(session, rolled, status="rolled_back", actor=who.name, reason=reason)
            # the phase moves where it is the champion's; another challenger's pilot (or its end) goes on
            if moves_phase:
                lifecycle.set_phase(session, uc, "rolled_back", actor=who.name, reason=reason)
            _finisher(
                session, d, finished_by, said, action="rollback", approval_id=approval_id, signer=who.name
            )
    return {
        "action": "rolled_back",
        "decision_id": decision_id,
        "alias_move": _move_dict(move),
        "done": changed,
    }


# what a caller refused in an effect's last transaction did: its moves are in (under the decision's keys,
# which the claimant's run converges on), the state DB's side is the claimant's to record
_LEFT_TO_CLAIMANT = "its alias moves are in, the rest is left to them"


def _locked_for_rollback(
    session: Any, name: str, decision_id: int
) -> tuple[UseCase, Pilot | None, GateDecision]:
    """A rollback's use case, its promoted pilot and the decision, re-read and locked in the order of every
    writer of a use case (`pilots.locked`: use case, then pilot; the decision after them): the pilot
    promoted now is read under the use case's lock, which every writer of a pilot's state takes first."""
    from rollout import pilots

    uc_id = pilots.get_use_case(session, name).id
    uc, _ = pilots.locked(session, uc_id, None)
    promoted = pilots.promoted_pilot(session, uc)
    if promoted is not None:
        _, promoted = pilots.locked(session, uc_id, promoted.id)
    d = session.get(GateDecision, decision_id, with_for_update=True, populate_existing=True)
    return uc, promoted, d


def _signers_reason(
    decision_id: int, approval_id: int | None, reason: str, finished_by: str | None, db_url: str | None
) -> str:
    """The reason an effect records under its signer's name: `reason`, as the signer's own run passes it;
    where another finishes it (`finished_by`), the signer's own words (their signature's reason; the
    monitor's: its decision's explanation), never the finisher's."""
    if finished_by is None:
        return reason
    with session_scope(db_url) as session:
        if approval_id is None:
            return session.get(GateDecision, decision_id).explanation
        return session.get(Approval, approval_id).reason


def _finisher(
    session: Any,
    d: GateDecision,
    finished_by: str | None,
    reason: str,
    *,
    action: str,
    approval_id: int | None,
    signer: str,
    spec_changed: str | None = None,
) -> None:
    """Who finished a decided effect that did not complete (its signer's run died, or MLflow was down),
    in the effect's last transaction: an `approval.finished` audit entry under their name with their
    reason. The moves stay the signer's (their approval is what they carry out). `spec_changed`: a
    promotion's plan left uncalibrated by a spec version that arrived after the signature
    (`promotion_moves.spec_changed_since`), said in the entry."""
    if finished_by is None:
        return
    details = {"decision": d.id, "action": action, "approval_id": approval_id, "signed_by": signer}
    if spec_changed is not None:
        details["spec_changed"] = spec_changed
    audit.record(session, finished_by, "approval.finished", on=d, details={**details, "reason": reason})


def _supersede(session: Any, d: GateDecision, actor: str, by: str, **details: Any) -> None:
    """Close a rollback decision another rollback or promotion made moot: "superseded" (where still
    open), with a `rollback.superseded` audit entry saying by what. Its own move, recorded but never in
    effect (the monitor's own whose MLflow call failed), is marked superseded too (`registry.supersede`):
    it was left "failed", a rollback still to be retried in the alias history, which the registry refuses
    (stale)."""
    from rollout import registry

    move = session.scalar(select(AliasMove).where(AliasMove.idempotency_key == f"rollback:{d.id}"))
    if move is not None and move.status not in ("committed", registry.SUPERSEDED):
        why = f"decision {d.id}'s rollback was superseded by {by} before its move took effect"
        registry.supersede(session, move, actor=actor, why=why)
    if d.resolution is None:
        d.resolution = "superseded"
    audit.record(session, actor, "rollback.superseded", on=d, details={"by": by, **details})


def rollback_about(session: Any, d: GateDecision) -> str | None:
    """The champion version (MLflow's) a rollback decision is about: the one the monitor judged (its
    promoted pilot's model version) or, for a person's rollback, the one in force when they asked; None
    where the record cannot say (nothing is then checked)."""
    if d.kind == "rollback":
        about = (d.evidence or {}).get("champion")
        if about is None and d.idempotency_key.startswith("manual-rollback:"):  # recorded before the field
            about = d.idempotency_key.split(":")[2]
        return None if about is None else str(about)
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    mv = session.get(ModelVersion, pilot.model_version_id) if pilot is not None else None
    return None if mv is None or mv.mlflow_version is None else str(mv.mlflow_version)


def _move_status(session: Any, key: str) -> str | None:
    return session.scalar(select(AliasMove.status).where(AliasMove.idempotency_key == key))


def _move_dict(move: Any) -> Any:
    if isinstance(move, AliasMove):
        return {
            "id": move.id,
            "alias": move.alias,
            "from_version": move.from_version,
            "to_version": move.to_version,
            "status": move.status,
        }
    return move


def unfinished_promotion(decision_id: int, *, by: str | None = None, db_url: str | None = None) -> int | None:
    """The approval behind a promotion that was approved but did not complete (e.g. MLflow was down):
    its id, so the promotion can be finished, or None when the decision still needs a person's
    approval. A decision that asks for a rollback is not promoted on (ApprovalError). One signed a moment
    ago is being carried out by its signer's process: MoveInProgress, saying by when it is finished here
    (`unfinished.refuse_while_applied`, the rule of a person's `rollback`). `by`: the person about to
    finish it (`promote --decision`), for whom it is claimed from an approval run that has not taken it
    up, under the decision's lock (that run then declines it)."""
    from rollout.approvals.checks import lock_decision
    from rollout.unfinished import promotion_unfinished, refuse_while_applied, unfinished_in

    shown = _shown_in_mlflow(decision_id, db_url)
    with session_scope(db_url, immediate=True) as session:
        if session.get(GateDecision, decision_id) is None:
            raise ApprovalError(f"no decision {decision_id}")
        d = lock_decision(session, decision_id)  # the run's take-up takes it too
        if d.awaiting == "rollback_approval":
            raise ApprovalError(
                f"decision {decision_id} asks for a rollback; its approval, if it did not take effect, is "
                "finished by `sparsepilot rollback`"
            )
        if d.resolution == "approved":  # held while a rollback waits: said, not claimed
            _hold_while_rollback_waits(session, d, session.get(UseCase, d.use_case_id), shown=shown)
        approval = unfinished_promotion_in(session, d)
        pending = None if approval is None else unfinished_in(session, session.get(UseCase, d.use_case_id))
        if approval is not None and shown and promotion_held(session, d):  # not held: MLflow shows it done
            pending = promotion_unfinished(session, d)
        if pending is not None and (pending.decision_id, pending.action) == (d.id, "promote"):
            refuse_while_applied(session, pending, claim_for=by)
        return approval


def unfinished_rejection(
    decision_id: int, *, by: str | None = None, db_url: str | None = None
) -> tuple[int, str] | None:
    """The signature behind a rejection that did not take effect (rollout.unfinished: its approver's run
    died after the signature): its approval id and effect ("reject": the pilot stopped; "keep": the
    champion kept through the monitor's alarm), so a repeated `approve --reject` finishes it; None where
    the decision is not such a rejection. One that its signer, its approval run or another finisher is
    carrying out now is MoveInProgress naming them (`unfinished.refuse_while_applied`, the rule of
    `promote --decision` and `rollback`); else it is claimed for `by` (the person about to finish it),
    under the decision's lock, so the effect lets them alone carry it out (`waiter.effect_refusal`).
    Before, it claimed nothing: finishing it beside the cycle's claim, both stopped the pilot."""
    from rollout.approvals.checks import lock_decision
    from rollout.unfinished import refuse_while_applied, unfinished_in

    with session_scope(db_url, immediate=True) as session:
        if session.get(GateDecision, decision_id) is None:
            raise ApprovalError(f"no decision {decision_id}")
        d = lock_decision(session, decision_id)  # the run's take-up and every claim take it too
        if d.resolution != "rejected":
            return None
        u = unfinished_in(session, session.get(UseCase, d.use_case_id))
        if (
            u is None
            or u.decision_id != decision_id
            or u.action not in ("reject", "keep")
            or u.approval_id is None
        ):
            return None
        refuse_while_applied(session, u, claim_for=by)
        return u.approval_id, u.action


def unfinished_promotion_in(session: Any, d: GateDecision) -> int | None:
    """`unfinished_promotion` of a decision read in the caller's transaction."""
    approval = session.scalar(
        select(Approval.id)
        .where(Approval.decision_id == d.id, Approval.action == "approve")
        .order_by(Approval.id.desc())
    )
    phase = session.get(UseCase, d.use_case_id).phase
    if d.resolution != "approved" or phase in ("promoted", "rolled_back") or approval is None:
        return None
    return None if _superseded(session, d) else approval


def _superseded(session: Any, d: GateDecision) -> bool:
    """Whether the champion moved on after this decision's promotion committed (a rollback, a later
    promotion): finishing it again would re-promote on old evidence; or an earlier build abandoned it,
    its move superseded and its pilot stopped (a `promotion.superseded` audit entry). A promotion that
    committed in MLflow but crashed before the use case was marked promoted is the last champion move:
    unfinished; so is one whose stale move was superseded to be recorded again
    (`_supersede_stale_move`), its pilot live."""
    from rollout import registry
    from rollout.pilots import ACTIVE_PILOT

    current = promotion_moves.current_move(session, d.id)
    if current is not None and current.status == registry.SUPERSEDED:
        return session.get(Pilot, d.pilot_id).status not in ACTIVE_PILOT
    keys = set(promotion_moves.keys_of(session, d.id))
    moves = registry.committed_moves(session, d.use_case_id, "champion")
    mine = [i for i, m in enumerate(moves) if m.idempotency_key in keys]
    return bool(mine) and mine[-1] < len(moves) - 1
