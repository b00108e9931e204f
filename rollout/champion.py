"""Whether a champion of ours serves, and whether the monitor watches it: what the monitor and a person's
rollback follow, whatever the use case's phase (the phase tells the challenger's journey; a second
challenger piloting, a NO-GO of it, or a rollback to the champion before leave a sparse champion serving
production). A champion of ours serves when the promoted pilot (`pilots.promoted_pilot`) is the one whose
model version the champion alias points at (`registry.champions`' top; a rollback of it returns to the
entry under it). A rollback moves the phase only where the phase is the champion's (`phase_is_champions`):
a pilot running meanwhile goes on (its control arm is by default the dense model in its own process,
never the champion; one the spec points at a served endpoint, the champion's maybe, answers with what that
endpoint serves, and its GO is not promoted over a champion that changed since it was signed:
`approvals.promotion_moves`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from rollout.db.models import GateDecision, ModelVersion, Pilot, UseCase


def version_of(session: Any, pilot: Pilot) -> str | None:
    """The MLflow version of `pilot`'s challenger."""
    return session.scalar(
        select(ModelVersion.mlflow_version).where(ModelVersion.id == pilot.model_version_id)
    )


def serving_pilot(session: Any, uc: UseCase) -> Pilot | None:
    """The promoted pilot whose challenger the champion alias points at now, or None (never promoted, the
    dense baseline serves again, or a move the state DB has not caught up with: `rollout.unfinished`)."""
    from rollout import registry
    from rollout.pilots import promoted_pilot

    pilot = promoted_pilot(session, uc)
    if pilot is None or registry.champions(session, uc.id)[-1:] != [version_of(session, pilot)]:
        return None
    return pilot


def waiting_alarm(session: Any, pilot: Pilot) -> int | None:
    """The monitor's alarm about `pilot` that waits for a person's approval of its rollback, if any."""
    return session.scalar(
        select(GateDecision.id)
        .where(
            GateDecision.pilot_id == pilot.id,
            GateDecision.kind == "monitor",
            GateDecision.awaiting == "rollback_approval",
            GateDecision.resolution.is_(None),
        )
        .order_by(GateDecision.id.desc())
    )


def rollback_waiting(session: Any, uc: UseCase) -> int | None:
    """The use case's rollback decision that waits for a person's approval (the monitor's alarm about the
    champion, whatever the phase), if any: no promotion is signed meanwhile
    (`approvals.refuse_promotion_while_rollback_waits`)."""
    return session.scalar(
        select(GateDecision.id)
        .where(
            GateDecision.use_case_id == uc.id,
            GateDecision.awaiting == "rollback_approval",
            GateDecision.resolution.is_(None),
        )
        .order_by(GateDecision.id.desc())
    )


def monitored_pilot(session: Any, uc: UseCase) -> Pilot | None:
    """The serving champion's pilot while the monitor watches it: not while its alarm waits for a person
    (who rolls it back or keeps it; keeping it resumes the monitor)."""
    pilot = serving_pilot(session, uc)
    return None if pilot is None or waiting_alarm(session, pilot) is not None else pilot


def phase_is_champions(session: Any, uc: UseCase) -> bool:
    """Whether the use case's phase is about its champion (promoted, or awaiting the person the monitor
    asked), so a rollback moves it to `rolled_back` and an alarm to `awaiting_approval`; otherwise it is a
    challenger's (calibrated, evaluated, piloting, its GO awaiting approval, stopped, rolled back before)
    and stays as it is."""
    from rollout.pilots import ACTIVE_PILOT

    if uc.phase == "promoted":
        return True
    if uc.phase != "awaiting_approval":
        return False
    live = session.scalar(select(Pilot.id).where(Pilot.use_case_id == uc.id, Pilot.status.in_(ACTIVE_PILOT)))
    return live is None


def rollback_able(session: Any, uc: UseCase) -> bool:
    """Whether a person may roll the use case back now (`approvals.request_rollback`, the approvals page's
    list): it is promoted, or, whatever its phase (another challenger pilots, a rollback returned to an
    earlier champion), a champion of ours serves and no alarm of the monitor about it waits for a person
    (who approves that one instead). What it returns to is the alias history's previous entry
    (`registry.rollback`)."""
    from rollout import lifecycle

    if lifecycle.can(uc.phase, "rollback"):
        return True
    serving = serving_pilot(session, uc)
    return serving is not None and waiting_alarm(session, serving) is None


def monitor_control_caveat(use_case: str, spec: dict[str, Any]) -> str | None:
    """What the monitor's sampled looks can judge where the control arm of the spec version it samples
    under (`spec`, the champion's: `pilot_batches.monitor_target`) is a served endpoint, in words; None
    where it is the dense model in the monitor's process (the default). The monitor answers each request
    with both arms, and its quality and excess-error checks compare the champion with the control: an
    endpoint serving the champion (`sparsepilot serve-model NAME --alias champion`) answers with the
    champion it loaded when it started, the previous champion until it restarts and the champion itself
    after, so those checks can hardly breach; only the error-rate and p95 latency checks watch the
    champion. Said, not redesigned (docs/serving.md "The monitor with an endpoint as control"). Pure."""
    from rollout.approvals.promotion_moves import control_endpoint

    endpoint = control_endpoint(spec)
    if endpoint is None:
        return None
    return (
        f"{use_case}: the monitor's control arm is {endpoint}, not the dense model: its quality and "
        "excess-error checks compare the champion with what that endpoint serves, which, where it is the "
        f"champion's own server (`sparsepilot serve-model {use_case} --alias champion`), is the previous "
        "champion until that server restarts and the champion itself after, so those checks can hardly "
        "breach; only the error-rate and p95 latency checks watch the champion (docs/serving.md)"
    )
