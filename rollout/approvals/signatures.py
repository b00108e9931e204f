"""Signatures: one written (`_sign`: the Approval row and its audit entry), the override signatures
given so far and those that still count (`counting_signatures`: neither withdrawn nor lapsed, the signer
still an approver, `rollout.auth.still_approver`), and a first signature taken back by its signer
(`withdraw`: approvals are append-only, so a later `withdraw` row)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select

from rollout import audit
from rollout.approvals.base import ApprovalError, ApprovalResult
from rollout.approvals.checks import lock_decision
from rollout.approvals.in_words import _names
from rollout.auth import Identity, require_approver, same_person, still_approver
from rollout.db.models import Approval, AuditEntry, GateDecision, Pilot
from rollout.db.session import session_scope
from rollout.redact import redact
from rollout.spec import has_visible_text


def checked_reason(reason: str | None) -> str:
    """The reason as every store keeps it (the approvals row, the audit log, an alias move's history,
    the paused run's input): stripped and redacted (`rollout.redact`: a token pasted into a reason would
    stay for good in append-only tables); refused when it says nothing."""
    text = (reason or "").strip()
    if not has_visible_text(text):  # zero-width and other invisible characters alone say nothing
        raise ApprovalError("a reason is required (say why, in a sentence the audit log can keep)")
    return redact(text)


def _sign(
    session: Any,
    d: GateDecision,
    who: Identity,
    action: str,
    text: str,
    against: bool,
    event: str,
    **about: Any,
) -> Approval:
    """A person's signature on the decision: the Approval row and its audit entry (`event`, with the
    reason, the role, `about` and where the identity came from)."""
    row = Approval(
        decision_id=d.id,
        actor=who.name,
        role=who.role,
        action=action,
        reason=text,
        against_recommendation=against,
    )
    session.add(row)
    session.flush()
    details = {"reason": text, "role": who.role, **about, "source": who.source}
    if who.subject:  # an OIDC user: who they are whatever email they were recorded under (`signer_subject`)
        details["subject"] = who.subject
    audit.record(session, who.name, event, on=d, details=details)
    return row


def override_signatures(session: Any, decision_id: int, action: str) -> list[Approval]:
    """The signatures already given to `action` the decision against the gate's recommendation (less
    those their signers withdrew: `withdrawn_signatures`)."""
    gone = withdrawn_signatures(session, decision_id)
    return [
        a
        for a in session.scalars(
            select(Approval).where(
                Approval.decision_id == decision_id,
                Approval.action == action,
                Approval.against_recommendation.is_(True),
            )
        )
        if a.id not in gone
    ]


def signer_subject(session: Any, approval: Approval) -> str:
    """The OIDC ``<issuer>#<subject>`` a signature was given with ("" for a local account, or a
    signature recorded before subjects were kept): from its audit entry, written with the Approval row."""
    return signer_subjects(session, [approval]).get(approval.id, "")


def signer_subjects(session: Any, approvals: Iterable[Approval]) -> dict[int, str]:
    """`signer_subject` of each signature, by its id, read in one query however many there are (the
    Approvals page asks it of every OIDC override signature on the page: one query each, review fix-s)."""
    wanted = list(approvals)
    if not wanted:
        return {}
    entries = session.execute(
        select(AuditEntry.entity_id, AuditEntry.actor, AuditEntry.action, AuditEntry.details)
        .where(
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id.in_({str(a.decision_id) for a in wanted}),
            AuditEntry.actor.in_({a.actor for a in wanted}),
            AuditEntry.action.like("approval.%"),
        )
        .order_by(AuditEntry.id)
    ).all()
    return {a.id: _subject_in(a, entries) for a in wanted}


def _subject_in(approval: Approval, entries: Iterable[Any]) -> str:
    """The first subject among the audit entries (entity_id, actor, action, details) of `approval`'s
    signing: its decision, its signer, an ``approval.<its action>...`` action."""
    action = f"approval.{approval.action}"
    for entity_id, actor, act, details in entries:
        if (
            entity_id == str(approval.decision_id) and actor == approval.actor and act.startswith(action)
            and isinstance(details, dict) and details.get("subject")
        ):  # fmt: skip
            return str(details["subject"])
    return ""


def counting_signatures(
    session: Any, decision_id: int, action: str
) -> tuple[list[tuple[Approval, str]], list[tuple[Approval, str]]]:
    """The override signatures already given (`override_signatures`), split into those that still count
    ([(approval, its signer's OIDC subject)]) and those that lapsed ([(approval, why)]): a signer who
    is no longer an approver (a local account demoted or deleted, an OIDC user taken off the approver
    list; `rollout.auth.still_approver`) does not count, so one current approver cannot complete an
    override on a former approver's signature."""
    counting, lapsed = [], []
    given = override_signatures(session, decision_id, action)
    subjects = signer_subjects(session, given)
    for a in given:
        subject = subjects[a.id]
        ok, what = still_approver(a.actor, subject=subject)
        if ok:
            counting.append((a, subject))
        else:
            lapsed.append((a, what))
    return counting, lapsed


WITHDRAW = "withdraw"  # an Approval row's action: its signer took back their earlier override signature


def withdrawn_signatures(session: Any, decision_id: int) -> set[int]:
    """The ids of the decision's override signatures their signers withdrew (`withdrawals`)."""
    return set(withdrawals(session, decision_id))


def withdrawals(session: Any, decision_id: int) -> dict[int, Approval]:
    """The decision's override signatures their signers withdrew, by id, each with the `withdraw` row
    that took it back (who and when: the Approvals page says so): approvals are append-only (migration
    0003), so a withdrawal is a later `withdraw` row by the same person (`same_person`, by name or by
    OIDC subject, `signer_subject`: an OIDC approver whose email changed is still the one who signed, as
    `approve` knows them); the first such row took it back."""
    rows = list(
        session.scalars(select(Approval).where(Approval.decision_id == decision_id).order_by(Approval.id))
    )
    if not any(w.action == WITHDRAW for w in rows):
        return {}
    return withdrawn_among(rows, signer_subjects(session, rows))


def withdrawn_among(rows: list[Approval], subjects: Mapping[int, str]) -> dict[int, Approval]:
    """`withdrawals` of the approvals ``rows`` (every row of their decisions, in id order; one decision
    or several), given their signers' subjects by id (`signer_subjects`)."""
    gone: dict[int, Approval] = {}
    for w in (w for w in rows if w.action == WITHDRAW):
        for a in rows:
            if (
                a.decision_id == w.decision_id and a.id < w.id and a.id not in gone and a.action != WITHDRAW
                and a.against_recommendation
                and same_person(a.actor, w.actor, subjects=(subjects.get(a.id, ""), subjects.get(w.id, "")))
            ):  # fmt: skip
                gone[a.id] = w
    return gone


def withdraw(
    decision_id: int, identity: Identity | None, reason: str | None, *, db_url: str | None = None
) -> ApprovalResult:
    """Take back the caller's own first signature of an override that no second approver has confirmed:
    audited (`approval.withdraw`), the decision and its pilot unchanged. Refused for a decision already
    resolved (the override was confirmed, or the decision decided otherwise) and where the caller has
    no open override signature (another approver's is theirs to withdraw)."""
    who = require_approver(identity, f"withdraw a signature on decision {decision_id}")
    text = checked_reason(reason)
    with session_scope(db_url, immediate=True) as session:
        d = lock_decision(session, decision_id)
        if d.resolution is not None:
            raise ApprovalError(
                f"decision {d.id} was already {d.resolution}: a signature that took effect cannot be "
                "withdrawn; nothing was recorded"
            )
        gone = withdrawn_signatures(session, d.id)
        open_ = [
            a
            for a in session.scalars(
                select(Approval).where(Approval.decision_id == d.id, Approval.action != WITHDRAW)
            )
            if a.against_recommendation and a.id not in gone
        ]
        # the person, as `approve` knows them: by name, or by OIDC subject whatever email they signed with
        subjects = signer_subjects(session, open_)
        mine = [a for a in open_ if same_person(a.actor, who.name, subjects=(subjects[a.id], who.subject))]
        if not mine:
            others = sorted({a.actor for a in open_})
            raise ApprovalError(
                f"{who.name!r} has no unconfirmed signature on decision {d.id} to withdraw"
                + (f" (signed by {', '.join(others)}: only they can withdraw theirs)" if others else "")
                + "; nothing was recorded"
            )
        row = _sign(
            session,
            d,
            who,
            WITHDRAW,
            text,
            False,
            "approval.withdraw",
            withdrawn=[a.id for a in mine],
            action_withdrawn=mine[0].action,
        )
        _name, pilot = _names(session, d)
        status = session.get(Pilot, d.pilot_id).status if d.pilot_id else None
        message = (
            f"signature withdrawn: {who.name}'s {mine[0].action} of decision {d.id} no longer counts; "
            f"decision {d.id} is unchanged" + (f" and {pilot} is {status}" if status else "")
        )
        return ApprovalResult(
            decision_id=d.id,
            action=WITHDRAW,
            approval_id=row.id,
            message=message,
        )
