"""The use case's phase table (rollout.lifecycle), and the gate settings a pilot step gets from its spec
(rollout.pilots.gate_settings through GateSettings.from_spec)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from rollout import audit, lifecycle, pilots
from rollout.db.models import AuditEntry, UseCase
from rollout.db.session import session_scope
from rollout.gate import GateSettings
from rollout.spec import parse_spec

from .usecase_helpers import example_spec


def test_what_may_run_in_each_phase() -> None:
    runs = {name: sorted(p.actions) for name, p in lifecycle.PHASES.items()}
    assert runs == {
        "registered": ["calibrate"],
        "calibrated": ["calibrate"],
        "evaluated": ["pilot"],
        "piloting": ["pilot"],
        "awaiting_approval": ["approve"],
        "promoted": ["monitor", "rollback"],
        "rolled_back": [],
        "stopped": [],
    }
    assert lifecycle.ENDED_PHASES == ("rolled_back", "stopped")
    assert not lifecycle.can("no-such-phase", "pilot")
    with pytest.raises(ValueError, match="unknown phase 'no-such-phase'"):
        lifecycle.phase("no-such-phase")


@pytest.mark.parametrize(
    ("current", "target", "moves"),
    [
        ("registered", "calibrated", True),
        ("stopped", "calibrated", True),  # a new challenger after a NO-GO starts again
        ("piloting", "calibrated", False),  # a calibration while a pilot runs leaves it piloting
        ("promoted", "calibrated", False),
        ("calibrated", "evaluated", True),
        ("piloting", "evaluated", False),
        ("awaiting_approval", "promoted", True),  # a decision's move: from any phase
    ],
)
def test_the_pipeline_moves_only_where_the_table_allows(
    sp_home, current: str, target: str, moves: bool
) -> None:  # noqa: ANN001
    with session_scope() as s:
        uc = UseCase(name="uc", owner="o", criticality="low", phase=current)
        s.add(uc)
        s.flush()
        assert lifecycle.advance(s, uc, target, actor=audit.SYSTEM_ACTOR, reason="test") is moves
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase)) == (target if moves else current)
        rows = s.execute(select(AuditEntry.actor, AuditEntry.action, AuditEntry.details)).all()
    assert rows == ([(audit.SYSTEM_ACTOR, "usecase.phase", {"from": current, "to": target, "reason": "test"})]
                    if moves else [])  # fmt: skip


def _spec(**guardrails: object) -> object:
    data = copy.deepcopy(example_spec("docs-qa"))
    data["gate"]["guardrails"] = {**data["gate"].get("guardrails", {}), **guardrails}
    return parse_spec(data, "docs-qa.yaml")


def test_guardrail_minimum_is_the_guardrails_own_not_the_quality_tests() -> None:
    spec = _spec(min_samples=12, max_error_rate=0.03)
    s = GateSettings.from_spec(spec)
    assert (s.guardrail_min_samples, s.min_samples_per_arm, s.max_error_rate) == (12, 100, 0.03)
    step = SimpleNamespace(min_samples=40, pilot=SimpleNamespace(go_alpha=None))
    at_step = pilots.gate_settings(spec, step)
    assert (at_step.min_samples_per_arm, at_step.guardrail_min_samples) == (40, 12)
    small = pilots.gate_settings(spec, SimpleNamespace(min_samples=5, pilot=step.pilot))  # capped by the step
    assert (small.min_samples_per_arm, small.guardrail_min_samples) == (5, 5)
    assert at_step.latency_slo_ms == (spec.gate.guardrails.p95_latency_ms or spec.latency_slo_ms.p95)
