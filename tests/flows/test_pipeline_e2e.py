"""End to end on a tiny real model, real Prefect (test server), real MLflow (SQLite), real GX, real
SQLite state: calibrate -> evaluate -> pilot (shadow + one split step) -> gate -> approval (a paused
flow run, resumed programmatically through rollout.approvals) -> promote -> monitor -> forced guardrail
breach -> automatic rollback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sparsepilot.commands.pipeline import monitor_said
from tests.fixtures.flows import QUICK_CAL, QUICK_EVAL, skip_if_host_overloaded

APPROVER = ("alice", "approver")


def _pilot_until_decided(name: str, kind: str, max_rounds: int = 10) -> dict:
    """Pilot batches + gate looks at the current step until the gate leaves EXTEND. At the fixture's 0.2
    margin a first pilot's shadow step needs ~18 identical pairs and the 50% split step ~55 requests
    (the betting sequence's cap for a split stream, docs/gate.md); the spec allows 10 looks of 8."""
    from flows.gate import gate_flow
    from flows.pilot import pilot_flow

    decision: dict = {}
    for _ in range(max_rounds):
        pilot_flow(name, batches=1, pilot_anyway=True)  # the tiny plan on a CPU does not pay: piloted anyway
        decision = gate_flow(name)
        assert decision["step_kind"] == kind
        if decision["outcome"] != "EXTEND":
            return decision
    skip_if_host_overloaded(decision)
    raise AssertionError(
        f"gate still EXTEND after {max_rounds} looks at the {kind} step: "
        f"{decision.get('reasons')} {decision.get('explanation')}"
    )


@pytest.mark.slow  # calibrate, evaluate, pilot to a GO, promote, monitor, roll back: 147 s at load 10
def test_pipeline_promote_monitor_breach_rolls_back(flow_use_case, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.approval import join_waiting, start_waiting
    from flows.calibrate import calibrate_flow
    from flows.common import load_context
    from flows.evaluate import evaluate_flow
    from flows.monitor import monitor_flow
    from rollout import approvals, registry, runs
    from rollout.auth import Identity
    from rollout.db.models import (
        Approval,
        AuditEntry,
        CalibrationRun,
        EvaluationRun,
        GateDecision,
        Observation,
        Pilot,
        PilotStep,
        UseCase,
    )
    from rollout.db.session import session_scope
    from sparse_core.corpus import text_fingerprint

    name = flow_use_case()

    cal = calibrate_flow(name, limits=QUICK_CAL)
    assert cal["reused"] is False and cal["mlflow_version"]
    assert registry.current_aliases(name) == {"challenger": cal["mlflow_version"]}
    assert calibrate_flow(name, limits=QUICK_CAL)["reused"] is True  # idempotent re-run

    ev = evaluate_flow(name, suite=QUICK_EVAL)
    assert ev["device"].startswith("cpu") and ev["speedup"] > 0
    assert ev["speedup_low"] <= ev["speedup"] <= ev["speedup_high"]
    assert ev["savings_month_low"] <= ev["savings_month_usd"] <= ev["savings_month_high"]
    assert -1 <= ev["quality_low"] <= ev["quality_delta"] <= ev["quality_high"] <= 1  # recorded bounds

    shadow = _pilot_until_decided(name, "shadow")
    skip_if_host_overloaded(shadow)
    assert shadow["outcome"] == "GO" and shadow["awaiting"] == "none"  # advances to the split step
    split = _pilot_until_decided(name, "split")
    skip_if_host_overloaded(split)
    assert split["outcome"] == "GO" and split["awaiting"] == "approval", (
        split["reasons"],
        split["explanation"],
    )

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        assert uc.phase == "awaiting_approval"
        pilot = s.scalar(select(Pilot).where(Pilot.use_case_id == uc.id))
        assert pilot.status == "awaiting_approval"
        steps = {st.index: st for st in s.scalars(select(PilotStep).where(PilotStep.pilot_id == pilot.id))}
        assert steps[0].kind == "shadow" and steps[1].kind == "split" and steps[1].traffic_pct == 50
        # shadow: both arms for every request; split: one arm per request, assigned by the salted hash
        shadow_obs = s.execute(
            select(Observation.arm, func.count())
            .where(Observation.pilot_step_id == steps[0].id)
            .group_by(Observation.arm)
        ).all()
        assert dict(shadow_obs)["control"] == dict(shadow_obs)["treatment"] >= 8
        split_ids = s.scalars(
            select(Observation.request_id).where(Observation.pilot_step_id == steps[1].id)
        ).all()
        assert len(split_ids) == len(set(split_ids))
        decision = s.get(GateDecision, split["decision_id"])
        assert decision.evidence["quality"]["interval_low"] > -decision.evidence["settings"]["margin"]
        assert decision.evidence["data_check"]["ok"] is True
        assert len(decision.data_fingerprint) == 64 and decision.explanation.startswith("Decision: GO")

    # The approval: a separate flow run that pauses; resumed through rollout.approvals (as the CLI and
    # dashboard do), after which it promotes.
    run_id = start_waiting(split["decision_id"], poll_interval_s=1)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(uuid.UUID(run_id)).state.is_paused()
    alice = Identity(*APPROVER, source="cli-env")
    result = approvals.approve(split["decision_id"], alice, "pilot evidence reviewed")
    assert result.took_effect and result.resumed_flow_run_id == run_id and not result.against_recommendation
    effect = join_waiting(split["decision_id"], timeout_s=180)
    assert effect["action"] == "promoted"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(uuid.UUID(run_id)).state.is_completed()

    aliases = registry.current_aliases(name)
    assert aliases["champion"] == cal["mlflow_version"] == aliases["challenger"]
    history = registry.alias_history(name)
    champion_moves = [m for m in history if m["alias"] == "champion"]
    baseline_version = champion_moves[0]["to_version"]
    assert [m["status"] for m in history] == ["committed"] * len(history)
    assert [(m["from_version"], m["to_version"]) for m in champion_moves] == [
        (None, baseline_version),
        (baseline_version, cal["mlflow_version"]),
    ]
    assert {m["actor"] for m in champion_moves} == {"alice"}

    # Monitor: every production request far above the latency SLO -> automatic rollback.
    breach = tmp_path / "prod.jsonl"
    with breach.open("w") as fh:
        for i in range(10):
            fh.write(json.dumps({"request_id": f"prod-{i}", "arm": "treatment", "quality": 0.5,
                                 "latency_ms": 90000.0, "error": False}) + "\n")  # fmt: skip
    mon = monitor_flow(name, observations_file=str(breach))
    assert mon["outcome"] == "NO-GO" and mon["automatic_rollback"] is True
    assert "treatment_latency_over_slo 1 > 0.05" in mon["explanation"]
    assert mon["rollback"]["action"] == "rolled_back"

    assert registry.current_aliases(name)["champion"] == baseline_version
    said = monitor_said(name, mon)  # what `sparsepilot monitor` prints: the look, then who serves now
    assert said.startswith(mon["explanation"]), said
    assert said.endswith(f"; champion {cal['mlflow_version']} -> {baseline_version} (committed)"), said
    last = registry.alias_history(name)[-1]
    assert (last["alias"], last["from_version"], last["to_version"], last["actor"], last["status"]) == (
        "champion",
        cal["mlflow_version"],
        baseline_version,
        "sparsepilot-monitor",
        "committed",
    )

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        assert uc.phase == "rolled_back"
        assert s.scalar(select(Pilot.status).where(Pilot.use_case_id == uc.id)) == "rolled_back"
        assert s.scalar(select(func.count()).select_from(CalibrationRun)) == 1
        assert s.scalar(select(EvaluationRun.status)) == "succeeded"
        # calibration read the calibration rows' prompts only; the evaluation scored the rows kept apart
        ctx = load_context(name)
        cal_rows, eval_rows = ctx.split()
        plan_meta = runs.latest_calibrated_version(ctx.use_case_id)["plan"]["metadata"]
        assert plan_meta["data_fingerprint"] == text_fingerprint([r["prompt"] for r in cal_rows])
        tasks = s.scalar(select(EvaluationRun.report))["tasks"]
        expected = {"split": "evaluation", "rows": len(eval_rows), "dataset_rows": len(ctx.rows)}
        assert tasks["rows_from"] == expected and 0 < len(eval_rows) < len(ctx.rows)
        approvals_rows = s.scalars(select(Approval)).all()
        assert [(a.actor, a.role, a.action, a.reason) for a in approvals_rows] == [
            ("alice", "approver", "approve", "pilot evidence reviewed")
        ]
        monitor_d = s.get(GateDecision, mon["decision_id"])
        assert (monitor_d.kind, monitor_d.resolution) == ("monitor", "auto_rolled_back")
        actions = [a for (a,) in s.execute(select(AuditEntry.action).order_by(AuditEntry.id))]
        for expected in (
            "calibration.succeeded",
            "alias.set.committed",
            "evaluation.succeeded",
            "pilot.start",
            "pilot.advance",
            "decision.gate",
            "approval.waiting",
            "approval.approve",
            "alias.promote.committed",
            "decision.monitor",
            "alias.rollback.committed",
        ):
            assert expected in actions, expected
        assert actions.index("approval.approve") < actions.index("alias.promote.committed")
        assert actions.index("alias.promote.committed") < actions.index("alias.rollback.committed")
