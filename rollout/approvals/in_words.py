"""What a signature does, in the words its message says: what one that takes effect does
(`effect_in_words`), and that a first override signature changes nothing yet and how to take it back."""

from __future__ import annotations

from typing import Any

from rollout.db.models import GateDecision, Pilot, UseCase


def _names(session: Any, d: GateDecision) -> tuple[str, str]:
    """The decision's use-case name and its pilot's label ('pilot 2 of NAME'), or its use case alone."""
    from rollout.pilots import pilot_label

    name = session.get(UseCase, d.use_case_id).name
    pilot = session.get(Pilot, d.pilot_id) if d.pilot_id else None
    return name, (f"{pilot_label(pilot)} of {name}" if pilot is not None else name)


def effect_in_words(session: Any, d: GateDecision, action: str) -> str:
    """What a signature that takes effect does, for its message ('pilot 1 of NAME stopped ...')."""
    name, pilot = _names(session, d)
    if d.awaiting == "rollback_approval":
        return (
            f"{name}'s champion rolls back to the previous one"
            if action == "approve"
            else f"{name}'s champion is kept and its monitor resumes"
        )
    if action == "approve":
        return f"{pilot} promoted (its challenger becomes {name}'s champion)"
    from rollout.pilots import pilot_again

    # this challenger's pilot has ended: `sparsepilot pilot NAME` refuses it (ensure_pilot_in)
    return f"{pilot} stopped (use case phase stopped); {pilot_again(name)}"


def _unchanged_in_words(session: Any, d: GateDecision) -> str:
    """A first override signature changes nothing yet: where the pilot stands, and how to take it back."""
    name, pilot = _names(session, d)
    where = session.get(Pilot, d.pilot_id) if d.pilot_id else session.get(UseCase, d.use_case_id)
    status = where.status if isinstance(where, Pilot) else where.phase
    return (
        f"nothing changed yet ({pilot} is {status}); `sparsepilot approve {name} --decision {d.id} "
        "--withdraw --reason TEXT` takes your signature back"
    )
