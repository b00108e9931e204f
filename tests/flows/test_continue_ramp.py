"""Continuing a short pilot's ramp (review E): a GO before the plan's last step that waits for approval
(`promote_after_step`, the main job's step 1) could only be promoted (two approvers, skipping the later
steps) or rejected. One approver may now continue the ramp: the pilot moves to the plan's next step, as
a GO there would have without `promote_after_step`, and is gated there; later GOs follow the plan (only
the last step's is final). On a real state DB, MLflow registry and Prefect API: the domain rule
(rollout.approvals), the CLI (`sparsepilot approve --continue-ramp`), the Approvals page (AppTest) and the
approval flow, after which the pilot flow really collects at the next step."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import select

from tests.fixtures.trust import cli_here, password_of, run_cli

ALICE = ("alice", "approver", "cli-env")
BOB = ("bob", "approver", "cli-env")
VIEWER = ("victor", "viewer", "cli-env")
RAMP = [{"traffic_pct": pct, "min_samples": 8} for pct in (50, 70, 90)]


def _rows(salt: str, pct: float, prefix: str, n: int) -> list[dict]:
    from rollout import pilots

    return [
        {"request_id": f"{prefix}{i}", "arm": pilots.assign_arm(f"{prefix}{i}", salt, pct), "quality": 1.0,
         "latency_ms": 120.0, "tokens": 0, "error": False}
        for i in range(n)
    ]  # fmt: skip


def _look(name: str, n: int, promote_after_step: int | None = 1) -> dict:
    """Rows at the pilot's current step that show no loss, then the gate's look (as the main job asks)."""
    from rollout import decisions, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    with session_scope() as s:
        pilot = s.scalar(select(Pilot).order_by(Pilot.id.desc()))
        step = pilots.current_step(s, pilot)
        rows = _rows(pilot.salt, step.traffic_pct, f"s{step.index}-", n)
        pilots.record_observations(s, step, rows, batch_id=f"b{step.index}", source="imported")
        step_id = step.id
    return decisions.gate_step(name, step_id, promote_after_step=promote_after_step)


def _short_pilot_go(flow_use_case, *, calibrated: bool = False) -> tuple[str, int]:  # noqa: ANN001
    """A use case whose plan ramps 50% -> 70% -> 90%, its pilot's GO at ramp step 1 waiting for approval
    (`promote_after_step=1`). `calibrated`: the challenger a calibration run made (the pilot flow then
    serves it), else one registered without model work. Returns the use case and the decision."""
    from rollout import pilots
    from rollout.db.models import ModelVersion, Pilot
    from rollout.db.session import session_scope
    from tests.flows.test_approvals import _pilot_with_decision

    name = flow_use_case(rollout={"shadow": {"min_samples": 8}, "steps": RAMP, "batch_size": 8})
    if calibrated:
        from flows.calibrate import calibrate_flow
        from rollout.runs import latest_challenger
        from tests.fixtures.flows import QUICK_CAL

        calibrate_flow(name, limits=QUICK_CAL)
        with session_scope() as s:
            uc = pilots.get_use_case(s, name)
            spec, _ = pilots.load_current_spec(s, uc)
            mv = s.get(ModelVersion, latest_challenger(s, uc.id).model_version_id)
            pilots.start_pilot(s, uc, mv, spec, actor="test")
    else:
        _pilot_with_decision(name, "EXTEND", "none")
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        spec, _ = pilots.load_pilot_spec(s, pilot)
        pilots.advance(s, pilot, spec, actor="test")  # ramp step 1 of 3, 50%
    go = _look(name, 84)
    assert (go["outcome"], go["awaiting"], go["step_index"]) == ("GO", "approval", 1), go["explanation"]
    return name, go["decision_id"]


def _state(name: str) -> dict:
    from rollout import pilots
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        pilot = s.scalar(select(Pilot).where(Pilot.use_case_id == uc.id).order_by(Pilot.id.desc()))
        steps = s.scalars(select(PilotStep).where(PilotStep.pilot_id == pilot.id).order_by(PilotStep.index))
        return {
            "phase": uc.phase,
            "pilot": (pilot.status, pilot.current_step_index),
            "steps": [(st.index, st.traffic_pct, st.status) for st in steps],
        }


def test_one_approver_continues_the_ramp_and_later_gos_follow_the_plan(flow_use_case) -> None:
    from rollout import approvals, registry
    from rollout.auth import Identity, PermissionDenied
    from rollout.db.models import Approval, AuditEntry, GateDecision
    from rollout.db.session import session_scope

    name, did = _short_pilot_go(flow_use_case)
    evidence = approvals_evidence(did)
    assert "continue the ramp to step 2 (70%)" in approvals.skip_note(evidence, waits_for_approval=True)
    # a middle step's GO that asked nobody has moved the pilot on already: no continue offered (s46 T1-1)
    asked_nobody = approvals.skip_note(evidence, waits_for_approval=False)
    assert "two different approvers" in asked_nobody and "continue" not in asked_nobody

    # refused, nothing written: no approver, no reason
    with pytest.raises(PermissionDenied):
        approvals.approve(did, Identity(*VIEWER), "go on", continue_ramp=True)
    with pytest.raises(approvals.ApprovalError, match="a reason is required"):
        approvals.approve(did, Identity(*ALICE), "  ", continue_ramp=True)
    with pytest.raises(approvals.ApprovalError, match="not both"):
        approvals.approve(did, Identity(*ALICE), "go on", reject=True, continue_ramp=True)
    assert _state(name)["pilot"] == ("awaiting_approval", 1)

    # a promotion half-signed first does not stand in the way: one approver continues
    half = approvals.approve(did, Identity(*BOB), "ship it now")
    assert half.needs_second_approver and not half.took_effect
    out = approvals.approve(did, Identity(*ALICE), "more traffic before we promote", continue_ramp=True)
    assert out.took_effect and not out.needs_second_approver and not out.against_recommendation
    assert out.action == "continue" and "runs at step 2 (70%)" in out.message, out.message
    assert _state(name) == {
        "phase": "piloting",
        "pilot": ("running", 2),
        "steps": [(0, 0.0, "passed"), (1, 50.0, "passed"), (2, 70.0, "running")],
    }
    with session_scope() as s:
        d = s.get(GateDecision, did)
        assert d.resolution == "continued"
        signed = s.scalars(select(Approval).where(Approval.decision_id == did).order_by(Approval.id)).all()
        assert [(a.actor, a.action) for a in signed] == [("bob", "approve"), ("alice", "continue")]
        entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "approval.continue"))
        assert entry.actor == "alice" and entry.details["reason"] == "more traffic before we promote"
        assert entry.details["to_step"] == {"index": 2, "traffic_pct": 70.0}
        advance = s.scalars(select(AuditEntry).where(AuditEntry.action == "pilot.advance")).all()[-1]
        moved = (advance.actor, advance.details["decision_id"], advance.details["to_step"])
        assert moved == ("alice", did, 2)
    assert "champion" not in registry.current_aliases(name)  # it promotes nothing

    # the decision is settled: neither a second continue nor bob's co-signature acts on it again
    with pytest.raises(approvals.ApprovalError, match=f"decision {did} was already continued by alice"):
        approvals.approve(did, Identity(*BOB), "again", continue_ramp=True)
    with pytest.raises(approvals.ApprovalError, match="already continued"):
        approvals.approve(did, Identity(*ALICE), "promote after all")

    # step 2's GO, though the job still asks after step 1: the plan goes on to step 3 by itself
    second = _look(name, 120)
    assert (second["outcome"], second["awaiting"], second["step_index"]) == ("GO", "none", 2), second
    assert _state(name)["pilot"] == ("running", 3)
    # the last step's GO is final: one approver promotes, nothing is skipped
    last = _look(name, 200)
    assert (last["outcome"], last["awaiting"], last["step_index"]) == ("GO", "approval", 3), last
    assert "skips" not in last["explanation"]
    with pytest.raises(approvals.ApprovalError, match="no later ramp step"):
        approvals.approve(last["decision_id"], Identity(*ALICE), "go on", continue_ramp=True)
    done = approvals.approve(last["decision_id"], Identity(*BOB), "evidence through 90%")
    assert done.took_effect and not done.against_recommendation
    assert _state(name)["phase"] == "promoted"


def approvals_evidence(decision_id: int) -> dict:
    from rollout import decisions

    return decisions.evidence(decision_id)


def test_only_a_go_that_waits_with_later_steps_can_continue(flow_use_case) -> None:
    """Refused, naming why, and nothing written: a GO that asked nobody, an EXTEND, a GO at the plan's
    last step."""
    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.models import Approval
    from tests.flows.test_approvals import _count, _pilot_with_decision

    name = flow_use_case()  # the default plan: shadow + one ramp step
    extend = _pilot_with_decision(name, "EXTEND", "none")
    with pytest.raises(approvals.ApprovalError, match="only a gate's GO that waits for approval"):
        approvals.approve(extend, Identity(*ALICE), "go on", continue_ramp=True)
    waiting = _pilot_with_decision(name, "EXTEND", "approval", key="waiting")
    with pytest.raises(approvals.ApprovalError, match="only a gate's GO that waits for approval"):
        approvals.approve(waiting, Identity(*ALICE), "go on", continue_ramp=True)
    assert _count(Approval) == 0


def test_the_cli_continues_the_ramp_with_one_approver(trust_env, flow_use_case) -> None:
    """`sparsepilot approve NAME --decision ID --continue-ramp --reason ...`: a real process, which starts
    its approval run, resumes it and reports where the pilot runs now; refused with exit 2 otherwise (the
    refusals in this process: what the command answers, not what a process boundary does)."""
    from prefect.settings import PREFECT_API_URL

    name, did = _short_pilot_go(flow_use_case)
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    both = cli_here(
        "approve", name, "--decision", str(did), "--reason", "x", "--reject", "--continue-ramp",
        user="alice", env=env,
    )  # fmt: skip
    assert both.returncode == 2
    assert "--reject, --continue-ramp and --withdraw exclude each other" in both.stderr
    viewer = cli_here(
        "approve", name, "--decision", str(did), "--reason", "x", "--continue-ramp", user="victor", env=env
    )
    assert viewer.returncode == 2 and "Traceback" not in viewer.stderr, viewer.stderr
    assert _state(name)["pilot"] == ("awaiting_approval", 1)

    done = run_cli(
        "approve", name, "--decision", str(did), "--reason", "ramp on to 70%", "--continue-ramp", "--json",
        user="alice", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"continued the ramp on decision {did}" in done.stdout and "step 2 (70%)" in done.stdout
    assert _state(name)["pilot"] == ("running", 2)
    again = cli_here(
        "approve", name, "--decision", str(did), "--reason", "again", "--continue-ramp", user="bob", env=env
    )
    assert again.returncode == 2 and f"decision {did} was already continued by alice" in again.stderr


def test_a_second_approver_of_an_early_go_co_signs_the_promotion(trust_env, flow_use_case) -> None:
    """Once one approver signed the promotion of a short pilot's GO, the second approver's button says
    what it does, 'Co-sign the promotion'; it said 'Approve promotion', as if it were the first."""
    from rollout import approvals
    from rollout.auth import Identity
    from tests.dashboard.apptest_helpers import button_labels, new_app, open_page, sign_in

    name, did = _short_pilot_go(flow_use_case)
    at = open_page(sign_in(new_app(), "alice", password_of("alice")), "approvals")
    assert "Approve promotion" in button_labels(at), button_labels(at)
    approvals.approve(did, Identity(*BOB), "ship it now")  # the first of two signatures
    at = open_page(sign_in(new_app(), "carol", password_of("carol")), "approvals")
    labels = button_labels(at)
    assert "Co-sign the promotion" in labels and "Approve promotion" not in labels, labels


def test_the_approvals_card_offers_to_continue_the_ramp(trust_env, flow_use_case) -> None:
    """The card of a short pilot's GO offers 'Continue the ramp to step 2 (70%)' beside the promotion
    and the rejection, says one approver decides it, and a click continues the ramp."""
    from tests.dashboard.apptest_helpers import button_labels, new_app, open_page, sign_in

    name, did = _short_pilot_go(flow_use_case)
    at = open_page(sign_in(new_app(), "carol", password_of("carol")), "approvals")
    labels = button_labels(at)
    assert "Continue the ramp to step 2 (70%)" in labels and "Reject" in labels, labels
    assert any("one approver decides it" in c.value for c in at.caption)
    at.text_area(key=f"reason_{did}").input("70% first, then decide")
    at.button(key=f"continue_{did}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("continued the ramp" in s.value for s in at.success), [s.value for s in at.success]
    assert _state(name) == {
        "phase": "piloting",
        "pilot": ("running", 2),
        "steps": [(0, 0.0, "passed"), (1, 50.0, "passed"), (2, 70.0, "running")],
    }
    at = open_page(at, "approvals")  # nothing waits any more
    assert f"continue_{did}" not in {b.key for b in at.button}


def test_a_paused_approval_run_is_resumed_and_the_pilot_collects_at_the_next_step(flow_use_case) -> None:
    """The paused approval run (`run --serve`, `serve`) is resumed by a continue from the dashboard's path
    and ends completed, reporting the next step; the pilot flow then answers requests at that step
    (70% sparse by the pilot's hash), and the gate looks there."""
    from prefect.client.orchestration import get_client

    from flows.approval import join_waiting, start_waiting
    from flows.gate import gate_flow
    from flows.pilot import pilot_flow
    from rollout import approvals, pilots
    from rollout.auth import Identity
    from rollout.db.models import Observation, Pilot, PilotStep
    from rollout.db.session import session_scope

    name, did = _short_pilot_go(flow_use_case, calibrated=True)
    rid = start_waiting(did)
    out = approvals.approve(did, Identity(*ALICE), "on to 70%", continue_ramp=True)
    assert out.took_effect and out.resumed_flow_run_id == rid and not out.applied_directly
    effect = join_waiting(did)
    assert (effect["action"], effect["step_index"], effect["traffic_pct"]) == ("continued", 2, 70.0), effect
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(uuid.UUID(rid)).state.is_completed()

    batch = pilot_flow(name, batches=1)
    assert (batch["step_index"], batch["step_kind"]) == (2, "split"), batch
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        step = s.scalar(select(PilotStep).where(PilotStep.pilot_id == pilot.id, PilotStep.index == 2))
        rows = s.scalars(select(Observation).where(Observation.pilot_step_id == step.id)).all()
        assert len(rows) == 8, len(rows)
        assert all(r.arm == pilots.assign_arm(r.request_id, pilot.salt, 70.0) for r in rows)
    look = gate_flow(name, promote_after_step=1)
    assert look["step_index"] == 2 and look["awaiting"] == "none", look
