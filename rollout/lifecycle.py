"""A use case's phases, in one table: what each means, what the scheduled cycle runs in it, what it waits
for, and from which phases the pipeline may move a use case into it. Every flow and the dashboard ask
this module (`can`, `may_enter`, `waits_for`); `set_phase` / `advance` are the only writers of
`UseCase.phase`, each move with its audit row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rollout import audit

ANY = None  # `enters_from` of a phase that a decision (the gate's or a person's) enters from any phase


@dataclass(frozen=True)
class Phase:
    meaning: str
    # what may run in this phase: "calibrate" (the cycle calibrates + evaluates), "pilot" (pilot batches +
    # gate looks), "approve" (a decision waits for a person), "monitor" and "rollback" (after promotion;
    # in any other phase too where a champion of ours serves: they follow `rollout.champion`, not the phase)
    actions: frozenset[str]
    waits_for: str  # in words, when no decision or running pilot says more (rollout.queries.waits_for)
    enters_from: frozenset[str] | None = ANY  # phases the pipeline's automatic moves may leave for this one
    ended: bool = False  # the pilot is over; a new spec version and a calibration start again


PHASES: dict[str, Phase] = {
    "registered": Phase("spec stored, nothing run yet", frozenset({"calibrate"}), "calibration"),
    "calibrated": Phase(
        "a challenger plan exists",
        frozenset({"calibrate"}),
        "evaluation",
        enters_from=frozenset({"registered", "calibrated", "evaluated", "stopped", "rolled_back"}),
    ),
    "evaluated": Phase(
        "quality/speed/ROI measured offline",
        frozenset({"pilot"}),
        "a pilot",
        enters_from=frozenset({"registered", "calibrated"}),
    ),
    "piloting": Phase("a pilot is running (shadow or split step)", frozenset({"pilot"}), "-"),
    "awaiting_approval": Phase(
        "the gate said GO (or a rollback is pending) and a person must decide", frozenset({"approve"}), "-"
    ),
    "promoted": Phase("challenger became champion; monitor runs", frozenset({"monitor", "rollback"}), "-"),
    "rolled_back": Phase("champion returned to the previous version", frozenset(), "-", ended=True),
    "stopped": Phase("NO-GO, rejected or aborted", frozenset(), "-", ended=True),
}
ENDED_PHASES = tuple(name for name, p in PHASES.items() if p.ended)
# the phases with no pilot of the use case's current challenger yet (starting one moves it to
# `piloting`): a decision recorded before belongs to an earlier plan (rollout.queries' current decision)
BEFORE_PILOT = ("registered", "calibrated", "evaluated")


def phase(name: str) -> Phase:
    try:
        return PHASES[name]
    except KeyError:
        raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}") from None


def can(current: str, action: str) -> bool:
    """May `action` run for a use case in phase `current`? (Nothing may in a phase not in the table.)"""
    known = PHASES.get(current)
    return known is not None and action in known.actions


def may_enter(current: str, target: str) -> bool:
    """May the pipeline move a use case from `current` to `target`?"""
    allowed = phase(target).enters_from
    return allowed is ANY or current in allowed


def waits_for(current: str) -> str:
    return phase(current).waits_for


def set_phase(session: Any, use_case: Any, target: str, *, actor: str, reason: str = "") -> None:
    """Move the use case to `target` (a decision's move: from any phase) with its audit row."""
    phase(target)
    if use_case.phase == target:
        return
    before = use_case.phase
    use_case.phase = target
    audit.record_change(
        session, actor, "usecase.phase", on=use_case, before=before, after=target, reason=reason
    )


def advance(session: Any, use_case: Any, target: str, *, actor: str, reason: str = "") -> bool:
    """The pipeline's move to `target` where the table allows it from the current phase (a calibration
    while a pilot runs leaves the use case piloting); returns whether it moved."""
    if not may_enter(use_case.phase, target):
        return False
    set_phase(session, use_case, target, actor=actor, reason=reason)
    return True
