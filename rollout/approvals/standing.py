"""Where an approved decision's champion move stands now, in words: in effect (the champion it made, since
when) or superseded (by which later move, and what serves now). `promote NAME --decision N` retried on a
promotion that had taken effect, or that a rollback had since undone, used to answer "already approved by
bob; if it did not take effect, `sparsepilot promote NAME --decision N` finishes it": the command just run,
and no word on which it was (review s47 C1). `standing` gives those words to `check_approvable`'s refusal;
`promotion_in_effect` is `promote`'s answer (docs/flows.md, "Decided but not in effect")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from rollout.approvals import promotion_moves
from rollout.approvals.base import ApprovalError
from rollout.db.models import AliasMove, Approval, GateDecision, UseCase, as_utc
from rollout.db.session import session_scope


@dataclass(frozen=True)
class Standing:
    in_effect: bool  # the decision's move is the champion's last committed move
    words: str  # "it took effect: champion v2 since ...", or what superseded it
    moved: bool = True  # False: its move never took effect, superseded first (`registry.supersede`)


def effect_key(d: GateDecision) -> str:
    """The idempotency key of the champion move an approved decision makes (rollout.approvals.effects)."""
    rollback = d.kind == "rollback" or d.awaiting == "rollback_approval"
    return f"{'rollback' if rollback else 'promote'}:{d.id}"


def standing_of(moves: list[AliasMove], keys: list[str]) -> Standing | None:
    """Where the committed champion move of `keys` (a decision's: a promotion's moves recorded again after
    a stale one among them, `promotion_moves`) stands among the use case's committed champion moves
    (oldest first); None where it never committed (pure)."""
    mine = [i for i, m in enumerate(moves) if m.idempotency_key in keys]
    if not mine:
        return None
    i = mine[-1]
    if i == len(moves) - 1:
        return Standing(True, f"it took effect: champion {_v(moves[i])} since {_at(moves[i])}")
    return Standing(
        False,
        f"it took effect (champion {_v(moves[i])} at {_at(moves[i])}), then was superseded by "
        f"{_by(moves[i + 1])}: champion {_v(moves[-1])} since {_at(moves[-1])}",
    )


def standing(session: Any, d: GateDecision) -> Standing | None:
    """`standing_of` an approved decision's champion move, read in the caller's transaction; a move that
    never took effect and went stale (`registry.supersede`: a rollback came first) says why, from its row."""
    from rollout import registry

    promotion = effect_key(d) == f"promote:{d.id}"
    keys = promotion_moves.keys_of(session, d.id) if promotion else [effect_key(d)]
    found = standing_of(registry.committed_moves(session, d.use_case_id, "champion"), keys)
    if found is not None:
        return found
    move = session.scalar(select(AliasMove).where(AliasMove.idempotency_key == keys[0]))
    if move is None or move.status != registry.SUPERSEDED:
        return None
    return Standing(False, f"it was superseded before it took effect: {move.error}", moved=False)


def promotion_in_effect(decision_id: int, *, db_url: str | None = None) -> str | None:
    """`promote NAME --decision N` on an approved promotion with nothing left to finish (checked first:
    `unfinished_promotion`): where it is in effect, the words that say so, and nothing is done (a retried
    `promote` is fine); where a later champion move superseded it, ApprovalError saying by what (promoting
    on its old evidence again is refused). None where the decision is no such promotion (it still waits
    for a signature, ...): the caller goes on to sign it."""
    from rollout.pilots import pilot_again

    with session_scope(db_url) as session:
        d = session.get(GateDecision, decision_id)
        if d is None or d.resolution != "approved" or effect_key(d) != f"promote:{d.id}":
            return None
        found = standing(session, d)
        if found is None:
            return None
        signers = session.scalars(
            select(Approval.actor)
            .where(Approval.decision_id == d.id, Approval.action == "approve")
            .order_by(Approval.id)
        ).all()
        name = session.get(UseCase, d.use_case_id).name
    head = f"decision {decision_id} was approved" + (f" by {' and '.join(signers)}" if signers else "")
    if found.in_effect:
        return f"{name}: {head}; {found.words}; nothing to do"
    if not found.moved:  # its words say how to pilot again
        raise ApprovalError(f"{head}; {found.words}; nothing was recorded")
    raise ApprovalError(
        f"{head}; {found.words}; nothing was recorded. A promotion now needs a new pilot: {pilot_again(name)}"
    )


def _v(m: AliasMove) -> str:
    return f"v{m.to_version}" if m.to_version else "none"


def _at(m: AliasMove) -> str:
    return f"{as_utc(m.created_at):%Y-%m-%d %H:%M} UTC"


def _by(m: AliasMove) -> str:
    kind, rest = m.idempotency_key.partition(":")[0], promotion_moves.decision_of_key(m.idempotency_key)
    named = {"rollback": "rollback decision", "promote": "promotion decision"}.get(kind)
    return f"{named} {rest}" if named and rest.isdigit() else f"the champion move {m.idempotency_key!r}"
