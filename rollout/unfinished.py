"""What was decided but is not in effect, and what finishes it.

A decision's effect runs after the decision is recorded: a person's approval commits, then its run moves
the aliases (rollout.registry: pending -> committed) and the use case's phase (rollout.approvals). A run
that dies in between (MLflow down, a deploy, an OOM) leaves a decision that waits for no one, yet:

- a **rollback** whose alias move committed while the use case was never marked rolled back (the monitor
  would judge a model MLflow no longer serves);
- an approved **rollback** (a person's, or one a person approved after the monitor asked) whose move
  failed or never ran: the champion that breached keeps serving;
- the monitor's **automatic rollback** whose move failed: its decision says "rolled back automatically";
- an approved **promotion** whose moves did not complete: MLflow may serve the challenger while the use
  case still waits for approval, unmonitored.

`unfinished_in` finds the one a use case has (the newest), `finish` carries it out through the same
effect the approval's run would have run, under the same idempotency key, so finishing twice, or
finishing while that run completes after all, converges on one move. The scheduled cycle and the monitor
finish one before they do anything else; `sparsepilot rollback` / `promote --decision` finish one on a
person's request; `stalled` lists them for the approvals page."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select

from rollout import registry
from rollout.db.models import AliasMove, Approval, GateDecision, Pilot, UseCase
from rollout.db.session import session_scope

# An effect not in effect this long after it was decided is shown as stalled (a promotion or rollback
# takes seconds; one whose alias move failed is shown at once).
STALLED_AFTER = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Unfinished:
    use_case: str
    decision_id: int
    action: str  # "rollback" / "promote"
    approval_id: int | None  # the person's signature it carries out; None: the monitor's own rollback
    decided_at: dt.datetime  # when it was decided (the approval's time, or the decision's)
    failed_move: bool  # an alias move of it failed (MLflow unreachable, ...)
    moved: bool  # its alias move committed: only the state DB's side is left to do
    flow_run_id: str | None  # the approval run that was to carry it out (may still be doing so)

    @property
    def automatic(self) -> bool:
        return self.approval_id is None

    def command(self) -> str:
        """What a person runs to finish it."""
        if self.action == "rollback":
            return f"sparsepilot rollback {self.use_case} --reason ..."
        return f"sparsepilot promote {self.use_case} --decision {self.decision_id} --reason ..."

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "automatic": self.automatic, "command": self.command()}


def unfinished_in(session: Any, uc: UseCase) -> Unfinished | None:
    """The use case's decided-but-not-in-effect decision (module docstring), or None."""
    from rollout.approvals import rollback_about, unfinished_promotion_in
    from rollout.pilots import promoted_pilot

    moves = registry.committed_moves(session, uc.id, "champion")
    serving = registry.champion_lineage(moves)[-1:]
    # a rollback's last transaction stops the promoted pilot and marks the use case rolled back: while a
    # pilot is still marked promoted (and the use case promoted, or awaiting the person the monitor asked)
    # a rollback may be unfinished; after it, a later pilot's phases are none of a rollback's business
    in_effect = uc.phase in ("promoted", "awaiting_approval") and promoted_pilot(session, uc) is not None
    if in_effect and moves and moves[-1].idempotency_key.startswith("rollback:"):
        d = session.get(GateDecision, int(moves[-1].idempotency_key.split(":", 1)[1]))
        return _unfinished(session, uc, d, "rollback")
    if in_effect:
        candidates = session.scalars(
            select(GateDecision)
            .where(
                GateDecision.use_case_id == uc.id,
                GateDecision.kind.in_(("monitor", "rollback")),
                GateDecision.outcome != "GO",
                or_(
                    GateDecision.resolution == "approved",
                    and_(GateDecision.resolution.is_(None), GateDecision.awaiting == "none"),
                ),
            )
            .order_by(GateDecision.id.desc())
        )
        for d in candidates:
            about = rollback_about(session, d)
            if (
                about is None
                or [about] != serving
                or _move_status(session, f"rollback:{d.id}") == "committed"
            ):
                continue  # about a champion that no longer serves (superseded), or carried out
            approved = d.resolution == "approved" and (
                d.kind == "rollback" or d.awaiting == "rollback_approval"
            )
            automatic = d.kind == "monitor" and d.resolution is None and uc.phase == "promoted"
            if approved or automatic:
                return _unfinished(session, uc, d, "rollback")
    # a promotion's last transaction marks its pilot promoted and the use case too: one whose pilot still
    # runs or awaits approval after it was approved is unfinished (a pilot promoted since is not)
    latest_pilot = session.scalar(select(func.max(Pilot.id)).where(Pilot.use_case_id == uc.id))
    pilot = None if latest_pilot is None else session.get(Pilot, latest_pilot)
    if (
        uc.phase not in ("promoted", "rolled_back")
        and pilot is not None
        and pilot.status
        in (
            "running",
            "awaiting_approval",
        )
    ):
        latest = session.scalar(
            select(GateDecision)
            .where(
                GateDecision.pilot_id == latest_pilot,
                GateDecision.kind == "gate",
                GateDecision.resolution == "approved",
            )
            .order_by(GateDecision.id.desc())
            .limit(1)
        )
        if latest is not None and unfinished_promotion_in(session, latest) is not None:
            return _unfinished(session, uc, latest, "promote")
    return None


def unfinished_of(use_case: str, *, db_url: str | None = None) -> Unfinished | None:
    """`unfinished_in` by use-case name, in its own transaction."""
    from rollout.pilots import get_use_case

    with session_scope(db_url) as session:
        return unfinished_in(session, get_use_case(session, use_case))


def stalled(session: Any, *, now: dt.datetime | None = None) -> list[Unfinished]:
    """Every use case's unfinished decision that is not simply still running: one whose alias move
    failed, or decided longer than `STALLED_AFTER` ago. Oldest first (the approvals page)."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for uc in session.scalars(select(UseCase).order_by(UseCase.id)):
        u = unfinished_in(session, uc)
        if u is not None and (u.failed_move or now - _aware(u.decided_at) >= STALLED_AFTER):
            out.append(u)
    return sorted(out, key=lambda u: _aware(u.decided_at))


def _unfinished(session: Any, uc: UseCase, d: GateDecision, action: str) -> Unfinished:
    signature = session.scalar(
        select(Approval)
        .where(Approval.decision_id == d.id, Approval.action.in_(("approve", "rollback")))
        .order_by(Approval.id.desc())
    )
    keys = [f"rollback:{d.id}"] if action == "rollback" else [f"promote:{d.id}", f"baseline:{d.id}"]
    status = [_move_status(session, k) for k in keys]
    return Unfinished(
        use_case=uc.name,
        decision_id=d.id,
        action=action,
        approval_id=None if signature is None else signature.id,
        decided_at=d.created_at if signature is None else signature.created_at,
        failed_move="failed" in status,
        moved=status[0] == "committed",
        flow_run_id=d.flow_run_id,
    )


def _move_status(session: Any, key: str) -> str | None:
    return session.scalar(select(AliasMove.status).where(AliasMove.idempotency_key == key))


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)
