"""The paused approval flow run a decision points at (`GateDecision.flow_run_id`): one per decision,
registered under a write lock, cleared when its process lets go. The rules for who may sign are in
rollout.approvals; this module keeps the pointer honest. Each function owns its transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollout import approvals, audit
from rollout.approvals import (
    ApprovalError,
    check_approvable,
    counting_signatures,
    flow_is_waiting,
    lock_decision,
    recommended_action,
)
from rollout.approvals.waiter import (
    TAKEN_UP,
    WAITING,
    carried_out_by_signer,
    finisher_of,
    forget_dead_waiter,
    forgotten,
    waiter_details,
    waiter_gone,
)
from rollout.auth import same_person
from rollout.db.models import GateDecision
from rollout.db.session import session_scope


def register(decision_id: int, run_id: str, run_is_live: Callable[[str], bool]) -> dict[str, Any]:
    """Register `run_id` as the decision's approval run. Returns {"skip": why} when this run lost a race
    (the decision was resolved, or another live run is registered), else what the run waits for."""
    abandoned: tuple[str, str] | None = None
    with session_scope(immediate=True) as session:
        d = lock_decision(session, decision_id)  # use case -> pilot -> decision, as every writer
        if d.resolution is not None:
            return {"skip": f"decision {decision_id} was already {d.resolution}"}
        dead = waiter_gone(session, d) if d.flow_run_id and d.flow_run_id != run_id else None
        if d.flow_run_id and d.flow_run_id != run_id and run_is_live(d.flow_run_id) and not dead:
            return {"skip": f"decision {decision_id} already has approval run {d.flow_run_id}"}
        check_approvable(session, d)
        if dead:  # a dead waiter's run reads "Paused" for days: forgotten, said, and cancelled below
            abandoned = (str(d.flow_run_id), dead)
            forgotten(session, d, abandoned[0], dead, audit.SYSTEM_ACTOR)
        if d.flow_run_id != run_id:
            d.flow_run_id = run_id
            audit.record(
                session,
                audit.SYSTEM_ACTOR,
                WAITING,
                on=d,
                details={**waiter_details(run_id), "awaiting": d.awaiting},
            )
        registered = {"awaiting": d.awaiting, "outcome": d.outcome, "use_case_id": d.use_case_id}
    if abandoned:
        approvals.cancel_abandoned(*abandoned)
    return registered


def take_up(decision_id: int, run_id: str) -> str | None:
    """The resumed run `run_id` claims its decision's effect: None when it is to carry it out (recorded,
    so the signer does not), else why not (the signer, seeing no run take it up in time, did it; or a
    person's `promote --decision` / `rollback` claimed it to finish it: `waiter.claim_for_finisher`).
    Under the decision's lock, as those claims, so exactly one of them carries the decision out."""
    with session_scope(immediate=True) as session:
        d = lock_decision(session, decision_id)
        if carried_out_by_signer(session, d, run_id):
            return f"decision {decision_id} was carried out by its signer (this run was not taken up in time)"
        finisher = finisher_of(session, d, run_id)
        if finisher is not None:
            return f"decision {decision_id} is being finished by {finisher} (this run took it up too late)"
        audit.record(session, audit.SYSTEM_ACTOR, TAKEN_UP, on=d, details={"flow_run_id": run_id})
        return None


def clear(decision_id: int, run_id: str) -> None:
    """Forget `run_id` on an open decision (nobody will continue that run)."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is not None and d.flow_run_id == run_id and d.resolution is None:
            d.flow_run_id = None


def release_abandoned(decision_id: int) -> tuple[str, str] | None:
    """Forget an open decision's approval run whose waiting process is gone, and cancel it
    (`approvals.waiter.forget_dead_waiter`): (the run, why), else None. Prefect still says that run is
    paused; resuming it would carry out nothing."""
    return forget_dead_waiter(decision_id, actor=audit.SYSTEM_ACTOR)


def state(decision_id: int) -> tuple[bool, str | None]:
    """(resolved, the registered run id); a missing decision reads as resolved with no run."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        return (True, None) if d is None else (d.resolution is not None, d.flow_run_id)


def run_id_of(decision_id: int) -> str | None:
    return state(decision_id)[1]


def needs_run(decision_id: int) -> bool:
    """Does the decision exist with no paused approval run waiting for it?"""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        return d is not None and not flow_is_waiting(d.flow_run_id)


def will_take_effect(decision_id: int, actor: str, reject: bool, *, subject: str = "") -> bool:
    """False only for the first signature of an action against the gate's recommendation (a signature
    whose signer is no longer an approver does not count: `counting_signatures`), or for a second
    signature by the person who gave the first (`same_person`: a local account and their OIDC identity,
    one OIDC ``subject`` under two emails): `approvals.approve` records the one and refuses the other,
    so neither needs a run."""
    action = "reject" if reject else "approve"
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is None or d.resolution is not None:
            return True  # let approvals.approve raise its clear error
        if action == recommended_action(d):
            return True
        earlier, _ = counting_signatures(session, decision_id, action)
        return bool(earlier) and not any(
            same_person(a.actor, actor, subjects=(sub, subject)) for a, sub in earlier
        )


def is_resolved(decision_id: int) -> bool:
    """Whether someone's signature resolved the decision (approved, rejected, continued)."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        return d is not None and d.resolution is not None


def check_open(decision_id: int) -> None:
    """Refuse, naming the decision, before any approval run starts for a decision nobody may act on."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is None:
            raise ApprovalError(f"decision {decision_id} does not exist")
        check_approvable(session, d)


def check_rejectable(decision_id: int) -> None:
    """Refuse, before any approval run starts, to reject a decision that asked nobody (a running pilot's
    latest gate decision: `approvals.refuse_rejecting_unasked` says what to do instead)."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is not None:  # an unknown decision: approvals.approve says so
            approvals.refuse_rejecting_unasked(session, d)


def check_promotable(decision_id: int) -> None:
    """Refuse, before any approval run starts, to promote while a rollback of the serving champion waits
    (`approvals.refuse_promotion_while_rollback_waits`), a plan the current spec version left
    uncalibrated (`approvals.refuse_uncalibrated_promotion`), or a GO measured against an endpoint's
    champion that changed since (`approvals.refuse_promotion_over_changed_champion`); `approve` asks them
    again under its lock."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is not None:  # an unknown decision: approvals.approve says so
            approvals.refuse_promotion_while_rollback_waits(session, d)
            approvals.refuse_uncalibrated_promotion(session, d)
            approvals.refuse_promotion_over_changed_champion(session, d)


def check_continuable(decision_id: int) -> None:
    """Refuse, naming the decision and why, before any approval run starts for a ramp nobody may continue
    (`approvals.check_continuable`)."""
    with session_scope() as session:
        d = session.get(GateDecision, decision_id)
        if d is None:
            raise ApprovalError(f"decision {decision_id} does not exist")
        approvals.check_continuable(session, d)
