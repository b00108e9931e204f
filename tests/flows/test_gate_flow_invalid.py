"""Bad observations in a step never crash the gate flow and never decide: the flow records INVALID with
the reason naming the column (rows that reached the state DB through a faulty importer or a hand edit)."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from tests.flows.test_approvals import _pilot_with_decision


def _shadow_rows(n: int) -> list[dict]:
    return [
        {"request_id": f"q{i}", "arm": arm, "quality": 0.8, "latency_ms": 120.0, "tokens": 0, "error": False}
        for i in range(n)
        for arm in ("control", "treatment")
    ]


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("quality", 1.5, "column 'quality': outside [0, 1]"),
        ("latency_ms", 0.0, "column 'latency_ms': zero or negative"),
        ("arm", "treatmnt", "column 'arm': unknown arm"),
        (None, None, "no observations"),
    ],
)
def test_gate_flow_records_invalid_naming_the_column(flow_use_case, column, value, problem) -> None:
    from flows.gate import gate_flow
    from rollout import pilots
    from rollout.db.models import GateDecision, Observation, Pilot
    from rollout.db.session import session_scope

    name = flow_use_case()
    _pilot_with_decision(name, "EXTEND", "none")
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        step = pilots.current_step(s, s.get(Pilot, pilots.active_pilot(s, uc).id))
        if column is not None:
            pilots.record_observations(s, step, _shadow_rows(10), batch_id="b1", source="imported")
            s.flush()
            s.execute(
                update(Observation)
                .where(Observation.pilot_step_id == step.id, Observation.request_id == "q3")
                .where(Observation.arm == "treatment")
                .values({column: value})
            )
    summary = gate_flow(name)
    assert summary["outcome"] == "INVALID" and summary["reasons"] == ["invalid-input"]
    with session_scope() as s:
        d = s.get(GateDecision, summary["decision_id"])
        assert any(problem in p for p in d.evidence["input_problems"]), d.evidence["input_problems"]
        assert problem.split(":")[0] in d.explanation
        assert s.get(Pilot, d.pilot_id).status == "running"  # INVALID neither promotes nor stops
    assert gate_flow(name)["created"] is False  # a re-run on the same data returns the same decision
