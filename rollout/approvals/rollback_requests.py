"""A person rolls the serving champion back, whatever the use case's phase (`request_rollback`): one
request for one intent (two approvers at once get the same decision), a rollback decided but not in effect
finished rather than followed by a second, the monitor's own giving way where it has moved nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from rollout import champion
from rollout.approvals.base import ApprovalError
from rollout.approvals.effects import _supersede, apply_rollback
from rollout.approvals.signatures import _sign, checked_reason
from rollout.auth import Identity, require_approver
from rollout.db.models import AliasMove, Approval, GateDecision, UseCase, as_utc, utcnow
from rollout.db.session import session_scope


def request_rollback(
    use_case_name: str,
    identity: Identity | None,
    reason: str | None,
    *,
    apply: bool = True,
    run_is_live: Callable[[str], bool] | None = None,
    db_url: str | None = None,
) -> dict[str, Any]:
    """A person rolls a use case back: records a rollback decision + approval + audit, then (by default)
    applies it. Returns the decision and approval ids (the rollback flow takes them when `apply` is False)
    and `finishing`: the person finishes a rollback decided earlier (the effect's `finished_by`).
    `run_is_live` (the flows' `flow_run_is_live`): whether the use case's lease holder's flow run still
    runs, so a monitor whose run ended mid-move is known to be gone (rollout.leases)."""
    from rollout import leases, pilots, registry
    from rollout.unfinished import refuse_while_applied, unfinished_in

    who = require_approver(identity, f"roll back {use_case_name}")
    text = checked_reason(reason)
    ended_run = leases.ended_holder_run(use_case_name, run_is_live)  # asked outside the write lock
    finishing = False
    # one writer at a time (SQLite: BEGIN IMMEDIATE; PostgreSQL: the use case's row lock below), so two
    # approvers asking at once see one request, not two
    with session_scope(db_url, immediate=True) as session:
        uc = pilots.get_use_case(session, use_case_name)
        session.execute(select(UseCase.id).where(UseCase.id == uc.id).with_for_update())
        # a rollback decided but not in effect (its run died, or MLflow was down: rollout.unfinished) is
        # finished, not followed by a second one that would roll back another version; the monitor's own
        # that has moved nothing yet gives way to the person's, which closes it "superseded" below
        pending = unfinished_in(session, uc)
        started = (
            pending is not None
            and pending.action == "rollback"
            and pending.automatic
            and _monitor_move_started(session, uc, pending.decision_id, ended_run)
        )
        if (
            pending is not None
            and pending.action == "rollback"
            and (not pending.automatic or pending.moved or started)
        ):
            refuse_while_applied(session, pending, claim_for=who.name)  # its run, waking, declines it
            decision_id, approval_id = pending.decision_id, pending.approval_id
            finishing = True
        elif not champion.rollback_able(session, uc):
            _refuse_while_alarm_waits(session, uc)
            raise ApprovalError(
                f"use case {use_case_name!r} ({uc.phase}): no champion of ours serves, "
                "there is no champion of ours to roll back"
            )
        else:
            moves = registry.committed_moves(session, uc.id, "champion")
            decision_id, approval_id = _record_rollback(session, uc, who, text, moves)
            if pending is not None and pending.action == "rollback":  # the monitor's own gives way
                _supersede(
                    session,
                    session.get(GateDecision, pending.decision_id),
                    who.name,
                    f"rollback {decision_id}",
                )
    out: dict[str, Any] = {"decision_id": decision_id, "approval_id": approval_id, "finishing": finishing}
    if apply:
        out["effect"] = apply_rollback(
            decision_id,
            approval_id,
            reason=text,
            automatic=approval_id is None,
            finished_by=who.name if finishing else None,
            db_url=db_url,
        )
    return out


def _refuse_while_alarm_waits(session: Any, uc: UseCase) -> None:
    """The monitor's alarm waits for a person's approval of its rollback (the use case is awaiting
    approval): the person is told which decision to approve, not that there is no champion to roll back."""
    waiting = champion.rollback_waiting(session, uc)
    if waiting is not None:
        raise ApprovalError(
            f"use case {uc.name!r}: the monitor's rollback decision {waiting} waits for approval; nothing "
            f"was recorded. Approve it to roll back: `sparsepilot approve {uc.name} --decision {waiting} "
            '--reason "..."`'
        )


def _monitor_move_started(session: Any, uc: UseCase, decision_id: int, ended_run: str | None) -> bool:
    """Has the monitor's automatic rollback begun its alias move (pending)? It is not "moved nothing":
    superseding it then made two rollbacks for one act. While a live run holds the use case's lease and
    the move is recent (`registry.MOVE_IN_FLIGHT`), its MLflow call may be under way: the person is told
    so, and by when their `rollback` finishes it (MoveInProgress). Once no live run holds the use case
    (the monitor works under its lease: a lease released, lapsed, or held by a process or flow run that
    is gone, `leases.live_holder`) or the move is older, it was cut off, and the person's request
    finishes it under its own key (True)."""
    import datetime as dt

    from rollout import leases, registry

    move = session.scalar(select(AliasMove).where(AliasMove.idempotency_key == f"rollback:{decision_id}"))
    if move is None or move.status != "pending":
        return False
    started = as_utc(move.created_at)
    holder = leases.live_holder(session, uc.id, ended_run)
    if holder is not None and utcnow() - started < registry.MOVE_IN_FLIGHT:
        by = (started + registry.MOVE_IN_FLIGHT).astimezone(dt.UTC).strftime("%H:%M UTC")
        raise registry.MoveInProgress(
            f"{uc.name}: the monitor's automatic rollback (decision {decision_id}, champion "
            f"v{move.from_version} -> v{move.to_version}) began its move and {holder.work} holds the use "
            f"case; nothing was recorded. Look again in a moment: the use case is then rolled back; if it "
            f"is not by {by}, `sparsepilot rollback {uc.name}` finishes it"
        )
    return True


def _record_rollback(
    session: Any, uc: UseCase, who: Identity, text: str, moves: list
) -> tuple[int, int | None]:
    """The manual rollback decision and its signature. Its key is the intent: the champion in force and
    the moves that led to it, so a person retrying, or a second approver at the same moment, gets the same
    decision (and its one alias move), never a second rollback."""
    from rollout import pilots, registry

    lineage = registry.champion_lineage(moves)
    if len(lineage) < 2:
        raise ApprovalError(f"use case {uc.name!r} has no previous champion to roll back to")
    key = f"manual-rollback:{uc.id}:{lineage[-1]}:{len(moves)}"
    d, created = pilots.record_decision(
        session,
        idempotency_key=key,
        use_case=uc,
        outcome="NO-GO",
        kind="rollback",
        evidence={"requested_by": who.name, "role": who.role, "reason": text, "champion": lineage[-1]},
        explanation=f"Manual rollback requested by {who.name} ({who.role}): {text}",
        data_fingerprint="manual",
        awaiting="none",
        actor=who.name,
    )
    if not created:  # the same intent, asked again: its first signature stands
        first = session.scalar(select(Approval.id).where(Approval.decision_id == d.id).order_by(Approval.id))
        return d.id, first
    d.resolution = "approved"
    return d.id, _sign(session, d, who, "rollback", text, False, "approval.rollback").id
