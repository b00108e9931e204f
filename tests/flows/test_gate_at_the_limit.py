"""A pilot step ends at its limit even when its rows stop changing (review G1, G2): an inconclusive or
INVALID step looked at again on the same rows once `gate.max_duration_days` has passed records the NO-GO
the limit promises, once (a retried look returns it), and an INVALID step names the real way out."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from tests.flows.test_approvals import _pilot_with_decision


def _rows(ids: range, arms: dict[str, float]) -> list[dict]:
    return [
        {"request_id": f"q{i}", "arm": arm, "quality": q, "latency_ms": 120.0, "tokens": 0, "error": False}
        for i in ids
        for arm, q in arms.items()
    ]


def _store(name: str, rows: list[dict], *, batch: str, source: str = "imported", split: bool = False):  # noqa: ANN202
    """Rows stored in the use case's running step (moved on to the first split step when `split`); returns
    the step's id."""
    from rollout import pilots
    from rollout.db.session import session_scope

    with session_scope() as s:
        pilot = pilots.active_pilot(s, pilots.get_use_case(s, name))
        if split:
            spec, _ = pilots.load_pilot_spec(s, pilot)
            pilots.advance(s, pilot, spec, actor="test")
        step = pilots.current_step(s, pilot)
        pilots.record_observations(s, step, rows, batch_id=batch, source=source)
        return step.id


def _age_pilot(name: str, days: float) -> None:
    """The pilot started `days` ago (the use case's spec allows 7)."""
    from rollout import pilots
    from rollout.db.session import session_scope

    with session_scope() as s:
        pilot = pilots.active_pilot(s, pilots.get_use_case(s, name))
        pilot.started_at = pilot.started_at - dt.timedelta(days=days)


def _state(name: str) -> tuple[str, str, int]:
    from rollout import pilots
    from rollout.db.models import GateDecision, Pilot
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        pilot = s.scalar(select(Pilot).where(Pilot.use_case_id == uc.id).order_by(Pilot.id.desc()))
        n = s.scalar(select(func.count()).select_from(GateDecision).where(GateDecision.kind == "gate"))
        return uc.phase, pilot.status, n


def test_an_inconclusive_step_ends_at_the_maximum_duration_without_new_rows(flow_use_case) -> None:
    """G1: the look's key was the step and its rows, so once the rows stopped changing (a used-up traffic
    source: the samples' expected end) every look returned the EXTEND recorded before the limit, and the
    pilot ran for good. Now the first look past the limit on the same rows records NO-GO, once."""
    from rollout import decisions

    name = flow_use_case()
    _pilot_with_decision(name, "EXTEND", "none")
    step_id = _store(name, _rows(range(12), {"control": 0.8, "treatment": 0.7}), batch="b1")
    first = decisions.gate_step(name, step_id)
    assert first["outcome"] == "EXTEND" and first["created"]
    again = decisions.gate_step(name, step_id)  # unchanged rows, before the limit: the same look
    assert (again["decision_id"], again["created"]) == (first["decision_id"], False)
    before = _state(name)

    _age_pilot(name, 30)
    at_max = decisions.gate_step(name, step_id)
    assert at_max["created"] and at_max["outcome"] == "NO-GO", at_max["explanation"]
    assert at_max["reasons"][0] == "max-duration-inconclusive"
    assert "maximum duration" in at_max["explanation"]
    assert _state(name) == ("stopped", "stopped", before[2] + 1)
    retried = decisions.gate_step(name, step_id)  # a retry of that look: the NO-GO, nothing new
    assert (retried["decision_id"], retried["created"]) == (at_max["decision_id"], False)
    assert _state(name) == ("stopped", "stopped", before[2] + 1)


def test_a_persistent_sample_ratio_mismatch_ends_at_the_maximum_and_names_the_way_out(flow_use_case) -> None:
    """G2: a split step fed by the serving system's own assignment at another share than planned (1 in 11
    to sparse, the step plans 50%) stays INVALID whatever comes after (stored rows are kept). It said
    "rerun this step", which no command does, and stayed INVALID past every limit. Now it names the abort
    and the share to set, and at the limit ends NO-GO, its own reason first."""
    from rollout import decisions

    name = flow_use_case()
    _pilot_with_decision(name, "EXTEND", "none")
    rows = [
        {**r, "arm": "treatment" if i % 11 == 0 else "control"}
        for i, r in enumerate(_rows(range(66), {"control": 0.9}))
    ]
    step_id = _store(name, rows, batch="s1", source="imported-external", split=True)
    look = decisions.gate_step(name, step_id)
    assert look["outcome"] == "INVALID" and "sample-ratio-mismatch" in look["reasons"]
    text = look["explanation"]
    assert "rerun" not in text, text
    assert f'sparsepilot pilot {name} --abort --reason "..."' in text
    assert "sending 50% of the requests to the sparse model" in text
    assert "still counts toward the use case's false-GO alpha" in text
    assert _state(name)[1] == "running"

    _age_pilot(name, 30)
    at_max = decisions.gate_step(name, step_id)
    assert at_max["created"] and at_max["outcome"] == "NO-GO", at_max["explanation"]
    assert at_max["reasons"][:2] == ["max-duration-invalid", "sample-ratio-mismatch"]
    assert "To pilot again" in at_max["explanation"] and "--abort" not in at_max["explanation"]
    assert _state(name)[:2] == ("stopped", "stopped")
    retried = decisions.gate_step(name, step_id)
    assert (retried["decision_id"], retried["created"]) == (at_max["decision_id"], False)
