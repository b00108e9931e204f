"""Who waits in a decision's paused approval run: the process that registered it (its host is on the
`approval.waiting` audit row, its pid in the row's details: `waiter_details`), and whether that process is
gone (`waiter_gone`). Prefect cannot tell: a paused run whose process was killed (an OOM, `kill -9`, a
host restart of `run --serve` or `serve`) reads "Paused" until its pause times out (7 days), and resuming
it carries out nothing. A process of this host that no longer exists is gone; another host's cannot be
seen, and counts as waiting."""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from rollout import audit
from rollout.approvals.checks import lock_decision
from rollout.approvals.resume import cancel_abandoned
from rollout.db.models import AuditEntry, GateDecision, as_utc
from rollout.db.session import session_scope
from rollout.leases import process_gone

WAITING = "approval.waiting"


def waiter_details(run_id: str) -> dict[str, Any]:
    """The `approval.waiting` row's details for `run_id`, registered by this process."""
    return {"flow_run_id": run_id, "pid": os.getpid()}


def _waiting_row(session: Any, d: GateDecision) -> tuple[str | None, dict[str, Any]] | None:
    """(host, details) of the `approval.waiting` row that registered the decision's run, or None."""
    rows = session.execute(
        select(AuditEntry.host, AuditEntry.details)
        .where(
            AuditEntry.action == WAITING,
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(d.id),
        )
        .order_by(AuditEntry.id.desc())
    )
    for host, details in rows:
        if (details or {}).get("flow_run_id") == d.flow_run_id:
            return host, details
    return None


def waiter_elsewhere(session: Any, d: GateDecision) -> str | None:
    """The host of the decision's registered waiter when it is another host than this one (whose process
    this one cannot see), else None."""
    row = _waiting_row(session, d) if d.flow_run_id else None
    return row[0] if row and row[0] and row[0] != socket.gethostname() else None


def waiter_gone(session: Any, d: GateDecision) -> str | None:
    """Why nobody continues the decision's registered approval run ("its process 123 on host-a is
    gone"), or None while its process may be alive (another host's, or a run registered before the pid
    was recorded)."""
    row = _waiting_row(session, d) if d.flow_run_id else None
    if row is None:
        return None
    host, details = row
    pid = details.get("pid")
    return (
        f"its process {pid} on {host} is gone" if isinstance(pid, int) and process_gone(host, pid) else None
    )


WAITER_GONE = "approval.waiter_gone"


def forget_dead_waiter(decision_id: int, *, actor: str, db_url: str | None = None) -> tuple[str, str] | None:
    """Forget an open decision's approval run whose waiting process is gone (`waiter_gone`), audited
    (`approval.waiter_gone`, by `actor`), then cancel that run in Prefect, so neither the state DB nor
    Prefect says anyone waits: (the run, why), else None. Every path that meets such a run calls it
    (an approval, the CLI's, and a new run registering), before it signs or registers."""
    with session_scope(db_url, immediate=True) as session:
        # locked first, as every writer of a decision (use case -> pilot -> decision, the audit chain
        # last): the audit row before the decision's row deadlocked against an approve (review s47 V2)
        if session.get(GateDecision, decision_id) is None:
            return None
        d = lock_decision(session, decision_id)
        why = None if d.resolution is not None else waiter_gone(session, d)
        if why is None:
            return None
        run_id, d.flow_run_id = str(d.flow_run_id), None
        forgotten(session, d, run_id, why, actor)
    cancel_abandoned(run_id, why)
    return run_id, why


def forgotten(session: Any, d: GateDecision, run_id: str, why: str, actor: str) -> None:
    """The audit row of a dead waiter's run forgotten (the caller's transaction, the decision locked)."""
    audit.record(session, actor, WAITER_GONE, on=d, details={"flow_run_id": run_id, "why": why})


TAKEN_UP = "approval.taken_up"  # the resumed run carries the decision out
CARRIED_OUT_BY_SIGNER = "approval.carried_out_by_signer"  # nobody took the resumed run up: the signer did

# How long a signer waits for a resumed run of another host's waiter to take its decision up before
# carrying it out itself: the run's pause polls every 2 s (flows.approval), so a live waiter answers
# within a few seconds.
TAKE_UP_WAIT_S = 15.0


def _marks(session: Any, d: GateDecision, action: str) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(AuditEntry.details).where(
            AuditEntry.action == action,
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(d.id),
        )
    )
    return [r or {} for r in rows]


def taken_up(session: Any, d: GateDecision, run_id: str) -> bool:
    return any(m.get("flow_run_id") == run_id for m in _marks(session, d, TAKEN_UP))


def taken_up_at(session: Any, d: GateDecision, run_id: str) -> dt.datetime | None:
    """When the resumed run `run_id` took the decision up (`approval_runs.take_up`), or None."""
    rows = session.execute(
        select(AuditEntry.ts, AuditEntry.details).where(
            AuditEntry.action == TAKEN_UP,
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(d.id),
        )
    )
    return next((as_utc(ts) for ts, m in rows if (m or {}).get("flow_run_id") == run_id), None)


def carried_out_by_signer(session: Any, d: GateDecision, run_id: str) -> bool:
    return any(m.get("flow_run_id") == run_id for m in _marks(session, d, CARRIED_OUT_BY_SIGNER))


# a person's `promote --decision` / `rollback` finishes a decision its resumed run `flow_run_id` has not taken
# up: recorded in the transaction that found the run not at work, under the decision's lock, which the run's
# take-up also takes, so a run waking later declines it (before, both carried it out)
FINISH_CLAIMED = "approval.finish_claimed"


def claim_for_finisher(session: Any, d: GateDecision, run_id: str | None, by: str) -> None:
    """`by` finishes decision `d`, which its approval run `run_id` (None: it has none) has not taken up
    (the caller's transaction, holding the decision's lock: `lock_decision`, or its use case's row). The
    row's host and pid tell whether the finisher's process is gone (`newest_claim`)."""
    audit.record(session, by, FINISH_CLAIMED, on=d, details={"flow_run_id": run_id, "pid": os.getpid()})


@dataclass(frozen=True)
class Claim:
    """A finisher's claim of a decision (`claim_for_finisher`): who, when, and the process that made it."""

    actor: str
    at: dt.datetime
    host: str | None
    pid: int | None

    def made_here(self, actor: str) -> bool:
        """Made by `actor` in this process (the finisher now carrying the effect out claimed it)."""
        return (self.actor, self.host, self.pid) == (actor, audit.origin()[1], os.getpid())

    def words(self) -> str:
        """ "bob, who claimed it at 14:03:10 UTC (process 123 on host-a)"."""
        return f"{self.actor}, who claimed it at {self.at:%H:%M:%S} UTC (process {self.pid} on {self.host})"


def claim_of(session: Any, d: GateDecision) -> Claim | None:
    """The newest finisher's claim of decision `d` (`claim_for_finisher`, whichever run it was claimed
    from), or None."""
    row = session.execute(
        select(AuditEntry.actor, AuditEntry.ts, AuditEntry.host, AuditEntry.details)
        .where(
            AuditEntry.action == FINISH_CLAIMED,
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(d.id),
        )
        .order_by(AuditEntry.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    actor, ts, host, details = row
    pid = (details or {}).get("pid")
    return Claim(actor, as_utc(ts), host, pid if isinstance(pid, int) else None)


def newest_claim(session: Any, d: GateDecision) -> tuple[str, dt.datetime, bool] | None:
    """The newest finisher's claim of decision `d` (`claim_of`): (who, when, whether their process is
    known to be gone: a process of this host that no longer exists, `leases.process_gone`), or None."""
    claim = claim_of(session, d)
    if claim is None:
        return None
    return claim.actor, claim.at, claim.pid is not None and process_gone(claim.host, claim.pid)


def effect_refusal(claim: Claim | None, decision_id: int, finished_by: str | None) -> str | None:
    """Whether a caller may carry decision `decision_id`'s effect out now, asked by the effect itself under
    the decision's lock (`rollout.approvals.effects`): why not, else None. A finisher (`finished_by`) only
    on the newest claim, made by them in this process: one that did not claim, or whose claim another
    finisher has since taken over (theirs stalled or failed), gives way. The signer's own effect (its
    approval run, or the process that signed: `finished_by` None) gives way to any finisher's claim, made
    once that effect was no longer at work (`unfinished.run_at_work`). Pure."""
    if finished_by is None:
        if claim is None:
            return None
        return f"decision {decision_id} is being finished by {claim.words()}; its signer's effect gives way"
    if claim is None:
        return (
            f"{finished_by} finishes decision {decision_id} without having claimed it (`promote --decision`, "
            "`rollback`, `approve --reject` and the cycle claim a decision before they finish it)"
        )
    if not claim.made_here(finished_by):
        return f"decision {decision_id} is being finished by {claim.words()}; {finished_by} gives way"
    return None


def finisher_of(session: Any, d: GateDecision, run_id: str) -> str | None:
    """Who claimed decision `d` from its run `run_id` (`claim_for_finisher`), or None."""
    rows = session.execute(
        select(AuditEntry.actor, AuditEntry.details).where(
            AuditEntry.action == FINISH_CLAIMED,
            AuditEntry.entity == "gate_decision",
            AuditEntry.entity_id == str(d.id),
        )
    )
    return next((actor for actor, m in rows if (m or {}).get("flow_run_id") == run_id), None)
