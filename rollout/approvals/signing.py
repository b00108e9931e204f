"""A person's signature on a pending decision (`approve`): approve, reject or continue the ramp, under the
rules of the package (rollout.approvals), read and signed under a write lock, then the paused run resumed
or the effect applied here."""

from __future__ import annotations

import logging
import time
from typing import Any

from rollout import audit
from rollout.approvals.base import ApprovalError, ApprovalPayload, ApprovalResult, FlowNotWaiting
from rollout.approvals.checks import (
    _require_an_earlier_champion,
    check_approvable,
    check_continuable,
    lock_decision,
    refuse_promotion_over_changed_champion,
    refuse_promotion_while_rollback_waits,
    refuse_rejecting_unasked,
    refuse_uncalibrated_promotion,
)
from rollout.approvals.effects import apply_decision, continue_in
from rollout.approvals.in_words import _unchanged_in_words, effect_in_words
from rollout.approvals.loosening import _refuse_the_loosener
from rollout.approvals.recommendation import _skips, recommended_action
from rollout.approvals.resume import _flow_run_state_safe, _resume
from rollout.approvals.signatures import _sign, checked_reason, counting_signatures
from rollout.approvals.waiter import (
    CARRIED_OUT_BY_SIGNER,
    TAKE_UP_WAIT_S,
    forget_dead_waiter,
    taken_up,
    waiter_elsewhere,
)
from rollout.auth import Identity, require_approver, same_person
from rollout.db.models import GateDecision
from rollout.db.session import session_scope
from rollout.redact import redact


def approve(
    decision_id: int,
    identity: Identity | None,
    reason: str | None,
    *,
    reject: bool = False,
    continue_ramp: bool = False,
    apply_if_no_flow: bool = True,
    db_url: str | None = None,
) -> ApprovalResult:
    """Approve (or reject) a pending decision, or (`continue_ramp`) continue the pilot's ramp from a GO
    before the plan's last step. The rules: rollout.approvals' docstring."""
    if reject and continue_ramp:
        raise ApprovalError("reject or continue the ramp, not both")
    action = "continue" if continue_ramp else "reject" if reject else "approve"
    what = "continue the ramp on" if continue_ramp else action
    who = require_approver(identity, f"{what} decision {decision_id}")
    text = checked_reason(reason)
    effect: dict[str, Any] | None = None
    resumed: str | None = None
    apply_now = False
    # The paused run is asked about before the write lock is taken and resumed after the signature has
    # committed: a call to Prefect inside the transaction held the state DB's write lock for as long as
    # Prefect took to answer (minutes with a stalled API, every other writer failing meanwhile), and the
    # resumed run could read the decision before the approval existed.
    # a dead waiter's run still reads "Paused": resuming it would carry out nothing; it is forgotten (and
    # cancelled) first, whatever becomes of this signature
    abandoned = forget_dead_waiter(decision_id, actor=who.name, db_url=db_url)
    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        asked = None if d is None else d.flow_run_id
        elsewhere = None if d is None else waiter_elsewhere(session, d)  # alive or not: cannot be seen
    waiting, state = _flow_run_state_safe(asked) if asked else (False, "none")
    with session_scope(db_url, immediate=True) as session:
        # Two approvers signing at once are serialised (PostgreSQL: the row locks; SQLite: BEGIN
        # IMMEDIATE takes the write lock before this read), so the second sees the first's signature or
        # resolution instead of both acting on the same open decision. The use case and the pilot are
        # locked first (`lock_decision`: the order every writer of a pilot's state takes), so the pilot
        # `check_approvable` reads stays as it is until the commit.
        d = lock_decision(session, decision_id)
        if d.flow_run_id != asked:
            raise FlowNotWaiting(
                f"decision {d.id}: its approval run changed while you approved (another run registered, or "
                "the last one was released); nothing was recorded, try again"
            )
        if action == "continue":
            to_step = check_continuable(session, d)
        else:
            check_approvable(session, d)
        if action == "reject":
            refuse_rejecting_unasked(session, d)
        if action == "approve" and d.awaiting == "rollback_approval":
            _require_an_earlier_champion(session, d)
        if action == "approve":
            refuse_promotion_while_rollback_waits(session, d)
            refuse_uncalibrated_promotion(session, d)  # a plan for an earlier version's budget
            refuse_promotion_over_changed_champion(session, d)  # measured against an earlier champion
        # continuing the ramp is what the plan would have done: it goes against nothing, one signature
        against = action != "continue" and action != recommended_action(d)
        if action == "approve" and not against:
            _refuse_the_loosener(session, d, who)
        if against:
            earlier, lapsed = counting_signatures(session, d.id, action)
            signed = [
                a.actor for a, sub in earlier if same_person(a.actor, who.name, subjects=(sub, who.subject))
            ]
            if signed:  # one person under two identities (a local account and OIDC) counts once
                also = f" (as {signed[0]!r})" if signed[0] != who.name else ""
                raise ApprovalError(
                    f"{who.name!r} already signed this override of decision {decision_id}{also}; "
                    "a second, different approver must confirm it"
                )
            gone = "; ".join(
                f"{a.actor}'s signature no longer counts ({a.actor} is {what})" for a, what in lapsed
            )
            for a, what in lapsed:
                audit.record(
                    session,
                    who.name,
                    f"approval.{action}.signature_lapsed",
                    on=d,
                    details={"signer": a.actor, "approval_id": a.id, "why": what},
                )
            if not earlier:
                row = _sign(
                    session,
                    d,
                    who,
                    action,
                    text,
                    True,
                    f"approval.{action}.first_signature",
                    outcome=d.outcome,
                )
                return ApprovalResult(
                    decision_id=d.id,
                    action=action,
                    approval_id=row.id,
                    needs_second_approver=True,
                    against_recommendation=True,
                    message=(
                        (f"{gone}; " if gone else "")
                        + f"recorded {who.name}'s signature; to {action} against the gate's recommendation "
                        f"({d.outcome}{_skips(d) if action == 'approve' else ''}) a second, different "
                        f"approver must also {action} decision {d.id}; {_unchanged_in_words(session, d)}"
                        + (f" (flow run {abandoned[0]} was paused, but {abandoned[1]})" if abandoned else "")
                    ),
                )
        d.resolution = {"approve": "approved", "reject": "rejected", "continue": "continued"}[action]
        about: dict[str, Any] = {"to_step": to_step} if action == "continue" else {}
        row = _sign(
            session,
            d,
            who,
            action,
            text,
            against,
            f"approval.{action}",
            outcome=d.outcome,
            awaiting=d.awaiting,
            against_recommendation=against,
            flow_run_id=d.flow_run_id,
            **about,
        )
        payload = ApprovalPayload(
            approve=action == "approve",
            actor=who.name,
            role=who.role,
            reason=text,
            approval_id=row.id,
            decision_id=d.id,
            continue_ramp=action == "continue",
        )
        if action == "continue":  # no alias moves: done here, with the signature, whole or not at all
            effect = continue_in(session, d, actor=who.name, reason=text)
        if d.flow_run_id:
            if not waiting:
                raise FlowNotWaiting(
                    f"decision {d.id}: flow run {d.flow_run_id} is no longer paused (state: {state}); "
                    "nothing was recorded. Start a new approval run (`sparsepilot approve` does) "
                    "or check the run in Prefect."
                )
            resumed = d.flow_run_id
        elif apply_if_no_flow or effect is not None:
            apply_now = effect is None
        else:
            raise FlowNotWaiting(
                f"decision {d.id}: no paused flow run is waiting for it; nothing was recorded"
            )
        approval_id, decision_pk = row.id, d.id
        effect_words = effect_in_words(session, d, action)
    not_resumed = None
    if resumed is not None:
        try:
            _resume(resumed, payload)
        except Exception as exc:  # noqa: BLE001 - the signature stands: carry it out here instead
            # the run stopped waiting between the check and now (or Prefect cannot be reached): the
            # approval is recorded, so its effect is applied directly, as when no run waits (a run that
            # still waits will find the decision resolved; rollout.unfinished covers a death meanwhile).
            # Prefect may have resumed the run all the same (a timeout after it did): the signer claims
            # the decision first, so that run declines it; one that took it up already carries it out.
            error = redact(f"{type(exc).__name__}: {exc}")
            logging.getLogger("sparsepilot.approvals").warning(
                "decision %s: could not resume flow run %s (%s); applying the decision directly",
                decision_pk,
                resumed,
                error,
            )
            if effect is not None or _claim_for_signer(decision_pk, resumed, db_url, resume_error=error):
                not_resumed = f"flow run {resumed} could not be resumed ({error})"
                resumed, apply_now = None, effect is None  # a continued ramp is in effect already
    not_taken_up = None
    if (
        resumed is not None
        and effect is None
        and elsewhere
        and not _taken_up_in_time(decision_pk, resumed, db_url)
    ):
        # resumed, but nobody continues it (its process on another host, where it cannot be seen, is
        # gone): the signer carries the decision out, and the run, should it wake, declines it
        not_taken_up, resumed, apply_now = resumed, None, True
    if apply_now:
        done = apply_decision(decision_pk, payload, db_url=db_url)
        if done.get("action") == "none":  # a rollback another move made moot: it never says "rolls back"
            effect_words = done["reason"]
    if not_taken_up:
        no_run = (
            f"flow run {not_taken_up} was resumed, but did not take it up within {TAKE_UP_WAIT_S:g} s "
            f"on {elsewhere}"
        )
    elif not_resumed:
        no_run = not_resumed
    elif abandoned:
        no_run = f"flow run {abandoned[0]} was paused, but {abandoned[1]}"
    else:
        no_run = "no flow run was waiting"
    if effect is not None:
        return ApprovalResult(
            decision_id=decision_pk,
            action=action,
            approval_id=approval_id,
            took_effect=True,
            resumed_flow_run_id=resumed,
            applied_directly=resumed is None,
            message=(
                f"continued the ramp on decision {decision_pk}: {effect['pilot']} runs at step "
                f"{effect['step_index']} ({effect['traffic_pct']:g}%) and the gate looks again there"
                + (f"; resumed flow run {resumed}" if resumed else "")
            ),
        )
    return ApprovalResult(
        decision_id=decision_pk,
        action=action,
        approval_id=approval_id,
        took_effect=True,
        against_recommendation=against,
        resumed_flow_run_id=resumed,
        applied_directly=apply_now,
        message=(
            f"{'approved' if action == 'approve' else 'rejected'} decision {decision_pk}: {effect_words}"
            + (f"; resumed flow run {resumed}" if resumed else f"; applied directly ({no_run})")
        ),
    )


def _taken_up_in_time(decision_id: int, run_id: str, db_url: str | None) -> bool:
    """Whether the resumed run took the decision up (`approval_runs.take_up`) within `TAKE_UP_WAIT_S`; if not,
    the signer's claim is recorded under the decision's lock, which the run's take-up also takes, so
    exactly one of them carries the decision out."""
    wait_s = TAKE_UP_WAIT_S
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with session_scope(db_url) as session:
            d = session.get(GateDecision, decision_id)
            if d is None or taken_up(session, d, run_id):
                return True
        time.sleep(0.25)
    return not _claim_for_signer(decision_id, run_id, db_url, waited_s=wait_s)


def _claim_for_signer(decision_id: int, run_id: str, db_url: str | None, **details: Any) -> bool:
    """The signer's claim on carrying the decision out (`approval.carried_out_by_signer`), recorded under
    the decision's lock, which the resumed run's take-up also takes: True when recorded, False when the
    run `run_id` took the decision up first (it carries it out)."""
    with session_scope(db_url, immediate=True) as session:
        d = lock_decision(session, decision_id)
        if taken_up(session, d, run_id):
            return False
        details = {"flow_run_id": run_id, **details}
        audit.record(session, audit.SYSTEM_ACTOR, CARRIED_OUT_BY_SIGNER, on=d, details=details)
        return True
