"""Approval rules (rollout.approvals) on a real state DB, MLflow registry and Prefect API: identity and
reason required, a second different approver for overrides, a clear error when the recorded flow run is
no longer paused, and nothing written when a request is refused."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.fixtures.accounts import cheap_hash

ALICE = ("alice", "approver", "cli-env")
BOB = ("bob", "approver", "cli-env")
VIEWER = ("victor", "viewer", "cli-env")


def _pilot_with_decision(name: str, outcome: str, awaiting: str, key: str = "", tau: float = 0.9) -> int:
    """A registered challenger (the same plan, so the same model version, each time; another ``tau``
    registers another version, to promote after one was), a running pilot and one gate decision (no
    model work needed); `key` tells a later pilot's decision apart."""
    from rollout import pilots, registry
    from rollout.db.models import ModelVersion
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        spec, _ = pilots.load_current_spec(s, uc)
        model_ref = spec.model
    mv = registry.register_version(
        name, SparsePlan(tau=tau), model_ref, actor=registry.SYSTEM_PIPELINE, density=0.5
    )
    registry.set_alias(
        name,
        "challenger",
        model_version_id=mv.id,
        actor=registry.SYSTEM_PIPELINE,
        reason="test",
        idempotency_key="c1" if tau == 0.9 else f"c1-{tau}",
    )
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        spec, _ = pilots.load_current_spec(s, uc)
        pilot = pilots.start_pilot(s, uc, s.get(ModelVersion, mv.id), spec, actor="test")
        step = pilots.current_step(s, pilot)
        d, _ = pilots.record_decision(
            s,
            idempotency_key=f"test:{key or outcome}",
            use_case=uc,
            pilot=pilot,
            step=step,
            outcome=outcome,
            evidence={"reasons": ["inconclusive"]},
            explanation=f"Decision: {outcome}.",
            data_fingerprint="f" * 64,
            awaiting=awaiting,
        )
        if awaiting == "approval":
            pilots.stop_pilot(s, pilot, status="awaiting_approval", actor="test", reason="GO")
        return d.id


def _count(model) -> int:
    from rollout.db.session import session_scope

    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_identity_role_and_reason_are_required(flow_use_case) -> None:
    from rollout import approvals
    from rollout.auth import Identity, PermissionDenied
    from rollout.db.models import Approval, AuditEntry

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    audit_before = _count(AuditEntry)
    with pytest.raises(PermissionDenied, match="nobody is signed in"):
        approvals.approve(did, None, "looks fine")
    with pytest.raises(PermissionDenied, match="is a viewer"):
        approvals.approve(did, Identity(*VIEWER), "looks fine")
    with pytest.raises(approvals.ApprovalError, match="reason is required"):
        approvals.approve(did, Identity(*ALICE), "   ")
    with pytest.raises(PermissionDenied, match="is a viewer"):
        approvals.request_rollback(name, Identity(*VIEWER), "bad")
    assert _count(Approval) == 0 and _count(AuditEntry) == audit_before


def test_override_needs_a_second_different_approver(flow_use_case) -> None:
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.models import Approval, UseCase
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")  # promoting on EXTEND is against the recommendation

    first = approvals.approve(did, Identity(*ALICE), "business needs it now")
    assert first.needs_second_approver and not first.took_effect and first.against_recommendation
    assert "champion" not in registry.current_aliases(name)
    with pytest.raises(approvals.ApprovalError, match="second, different approver"):
        approvals.approve(did, Identity(*ALICE), "really")

    second = approvals.approve(did, Identity(*BOB), "agreed with alice")
    assert second.took_effect and second.applied_directly  # no flow run waited: applied here
    aliases = registry.current_aliases(name)
    assert aliases["champion"] == aliases["challenger"]
    with session_scope() as s:
        rows = s.scalars(select(Approval).order_by(Approval.id)).all()
        assert [(a.actor, a.against_recommendation) for a in rows] == [("alice", True), ("bob", True)]
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "promoted"
    with pytest.raises(approvals.ApprovalError, match="already approved by bob"):
        approvals.approve(did, Identity(*BOB), "again")

    # Nothing to return to (no dense baseline was registered here): refused before anything is written.
    n_approvals = _count(Approval)
    with pytest.raises(approvals.ApprovalError, match="no previous champion"):
        approvals.request_rollback(name, Identity(*ALICE), "quality complaints")
    assert _count(Approval) == n_approvals


def test_a_flow_run_that_is_no_longer_paused_is_a_clear_error(flow_use_case) -> None:
    from prefect import flow

    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.models import Approval, GateDecision
    from rollout.db.session import session_scope

    @flow
    def finished() -> str:
        from prefect.runtime import flow_run

        return str(flow_run.get_id())

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    run_id = finished()
    with session_scope() as s:
        s.get(GateDecision, did).flow_run_id = run_id
    with pytest.raises(approvals.FlowNotWaiting, match=f"{run_id} is no longer paused .state: Completed"):
        approvals.approve(did, Identity(*ALICE), "ship it")
    with session_scope() as s:
        assert s.get(GateDecision, did).resolution is None
    assert _count(Approval) == 0
    assert approvals.flow_is_waiting(str(uuid.uuid4())) is False


def test_the_same_person_under_a_second_identity_is_refused_before_any_run_starts(
    flow_use_case, monkeypatch
) -> None:
    """An override's second signature by the person who gave the first (local alice, then OIDC
    alice@corp.example) is refused by `sparsepilot approve` before an approval run is started for it:
    no flow run appears in Prefect and the decision points at none."""
    from prefect.client.orchestration import get_client

    from flows.approval import approve_decision
    from rollout import approvals
    from rollout.auth import ACCOUNTS_ENV, Identity
    from rollout.db.models import Approval, GateDecision
    from rollout.db.session import session_scope

    monkeypatch.setenv(ACCOUNTS_ENV, f"alice:approver:{cheap_hash('pw')}:alice@corp.example")
    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    first = approve_decision(did, Identity(*ALICE), "business needs it now")
    assert first["needs_second_approver"] and not first["took_effect"]
    with get_client(sync_client=True) as client:
        runs_before = len(client.read_flow_runs())
    with pytest.raises(approvals.ApprovalError, match=r"already signed this override .* \(as 'alice'\)"):
        approve_decision(did, Identity("oidc:alice@corp.example", "approver", "oidc"), "me again")
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == runs_before
    with session_scope() as s:
        assert s.get(GateDecision, did).flow_run_id is None
    assert _count(Approval) == 1


def test_cli_approval_starts_a_paused_run_and_resumes_it(flow_use_case) -> None:
    """`sparsepilot approve` when no process waits (e.g. after the main job ended): a fresh approval
    flow run is started, pauses, and the approval resumes it; the run carries out the promotion."""
    from prefect.client.orchestration import get_client

    from flows.approval import approve_decision
    from rollout import registry
    from rollout.auth import Identity
    from rollout.db.models import GateDecision, UseCase
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    out = approve_decision(did, Identity(*ALICE), "reviewed the pilot")
    assert out["took_effect"] and out["resumed_flow_run_id"] and out["effect"]["action"] == "promoted"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(out["resumed_flow_run_id"]))
        assert run.state.is_completed()
    assert registry.current_aliases(name)["champion"] == registry.current_aliases(name)["challenger"]
    with session_scope() as s:
        d = s.get(GateDecision, did)
        assert (d.resolution, d.flow_run_id) == ("approved", out["resumed_flow_run_id"])
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "promoted"


def test_run_serve_keeps_the_run_paused_for_an_approval_from_another_process(
    flow_use_case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sparsepilot run --serve`: the job keeps a paused approval run while the dashboard (another
    process, pointed at the job's Prefect server) approves; the job's run resumes and promotes."""
    import os
    import subprocess
    import sys
    import time

    from flows.approval import waiting_here
    from flows.main_job import serve_after
    from rollout import registry
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    approve_elsewhere = (
        "from rollout.approvals import approve; from rollout.auth import Identity; "
        f"r = approve({did}, Identity('alice', 'approver', 'local-account'), 'approved in the dashboard'); "
        "print(r.resumed_flow_run_id)"
    )

    def dashboard() -> int:
        assert waiting_here() == [did]
        out = subprocess.run([sys.executable, "-c", approve_elsewhere], env=dict(os.environ),
                             capture_output=True, text=True, timeout=180)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "champion" not in registry.current_aliases(name):
            time.sleep(0.5)
        return 0

    try:
        assert serve_after([{"awaiting": "approval", "decision_id": did}], dashboard) == 0
    finally:
        os.environ.pop("PREFECT_API_URL", None)
    assert registry.current_aliases(name)["champion"] == registry.current_aliases(name)["challenger"]
    with session_scope() as s:
        assert s.get(GateDecision, did).resolution == "approved"


def test_monitor_breach_with_manual_policy_waits_for_a_rollback_approval(flow_use_case, tmp_path) -> None:
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.models import GateDecision, UseCase
    from rollout.db.session import session_scope

    name = flow_use_case(rollback="manual")
    promoted = _promoted(name)

    mon = _breach_waits_for_a_person(name, tmp_path, promoted)
    assert "treatment_error_rate 0.4 > 0.05" in mon["explanation"]

    result = approvals.approve(mon["decision_id"], Identity(*BOB), "error rate too high")
    assert result.took_effect and not result.against_recommendation
    assert registry.current_aliases(name)["champion"] != promoted
    history = registry.alias_history(name)
    assert (history[-1]["from_version"], history[-1]["actor"]) == (promoted, "bob")
    with session_scope() as s:
        assert s.get(GateDecision, mon["decision_id"]).resolution == "approved"
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "rolled_back"


def test_a_breach_with_nothing_to_roll_back_to_waits_for_a_person(flow_use_case, tmp_path) -> None:
    """`rollback: auto`, but no earlier champion is recorded (no dense baseline was registered before the
    first promotion): the alarm used to be recorded NO-GO with nobody asked, and the rollback then failed
    with a traceback. Now it waits for a person, and says why."""
    from rollout import approvals, registry
    from rollout.auth import Identity

    name = flow_use_case(rollback="auto")
    approvals.approve(_pilot_with_decision(name, "GO", "approval"), Identity(*ALICE), "ship it")
    champion = registry.current_aliases(name)["champion"]
    mon = _breach_waits_for_a_person(name, tmp_path, champion)
    assert "No earlier champion is recorded to roll back to, so a person must decide" in mon["explanation"]
    # approving a rollback with nothing to return to is refused before anything is recorded (it used to
    # commit the approval, fail the alias move and leave the use case stuck); keeping the champion works
    with pytest.raises(approvals.ApprovalError, match="no earlier champion to roll back to; nothing was"):
        approvals.approve(mon["decision_id"], Identity(*BOB), "roll it back")
    _kept_by_two(name, mon["decision_id"], champion, ("keep it", "keep it"))


def _kept_by_two(name: str, decision_id: int, champion: str, reasons: tuple[str, str]):  # noqa: ANN202
    """Keeping the champion against the monitor's alarm: a first signature, then a second approver's,
    which takes effect; the champion stays and the use case is promoted again."""
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.models import UseCase
    from rollout.db.session import session_scope

    first = approvals.approve(decision_id, Identity(*ALICE), reasons[0], reject=True)
    assert first.needs_second_approver and not first.took_effect
    kept = approvals.approve(decision_id, Identity(*BOB), reasons[1], reject=True)
    assert kept.took_effect and registry.current_aliases(name)["champion"] == champion
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "promoted"
    return kept


def breach_export(tmp_path) -> Path:  # noqa: ANN001
    """A production export of 20 champion answers, 8 of them errors, against a 5% error ceiling: evidence
    of a breach (3 in 10 would not yet be), for a monitor look."""
    import json

    prod = tmp_path / "prod.jsonl"
    rows = [
        {"request_id": f"p{i}", "arm": "treatment", "quality": 0.9, "latency_ms": 500.0, "error": i < 8}
        for i in range(20)
    ]
    prod.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prod


def _breach_waits_for_a_person(name: str, tmp_path, promoted: str) -> dict:  # noqa: ANN001
    """A monitor look on 8 errors in 20 production requests against a 5% ceiling (evidence of a breach; 3
    in 10 would not yet be): NO-GO, the rollback waits for a person, nothing moved without one."""

    from flows.monitor import monitor_flow
    from rollout import registry
    from rollout.db.models import AuditEntry, UseCase
    from rollout.db.session import session_scope

    mon = monitor_flow(name, observations_file=str(breach_export(tmp_path)))
    assert (mon["outcome"], mon["awaiting"], mon["automatic_rollback"]) == (
        "NO-GO",
        "rollback_approval",
        False,
    )
    assert registry.current_aliases(name)["champion"] == promoted  # nothing moved without a person
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "awaiting_approval"
        recorded = s.scalar(
            select(AuditEntry.actor).where(
                AuditEntry.action == "decision.monitor", AuditEntry.entity_id == str(mon["decision_id"])
            )
        )
        assert recorded == "sparsepilot-monitor"  # the monitor's decision is its own (docs/operations.md)
    return mon


def test_the_monitor_accumulates_evidence_over_its_looks_and_a_kept_alarm_resumes_it(
    flow_use_case, tmp_path
) -> None:
    """Batches of 12 production rows with 2 errors each (17% against a 5% ceiling): no batch alone shows a
    breach, their looks together do, and the alarm says where its evidence begins. A person who keeps the
    champion (two approvers: it goes against the monitor) returns the use case to `promoted`, and the
    detector starts again after the kept alarm."""
    import json

    from flows.monitor import monitor_flow
    from flows.promote import keep_flow
    from rollout import pilots
    from rollout.db.models import Pilot, PilotStep, UseCase
    from rollout.db.session import session_scope

    name = flow_use_case(rollback="manual")
    promoted = _promoted(name)

    def look(i: int, errors: int) -> dict:
        path = tmp_path / f"prod{i}.jsonl"
        rows = [
            {
                "request_id": f"b{i}-{j}",
                "arm": "treatment",
                "quality": 0.9,
                "latency_ms": 500.0,
                "error": j < errors,
            }
            for j in range(12)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return monitor_flow(name, observations_file=str(path))

    looks = []
    for i in range(1, 13):
        mon = look(i, 2)
        looks.append(mon)
        if mon["outcome"] != "GO":
            break
    assert looks[0]["outcome"] == "GO" and "over 1 look:" in looks[0]["explanation"]
    assert "over 2 looks:" in looks[1]["explanation"]
    assert mon["outcome"] == "NO-GO" and 3 <= len(looks) <= 12, [m["outcome"] for m in looks]
    assert (
        mon["awaiting"] == "rollback_approval" and "the evidence begins with look 1 of" in mon["explanation"]
    )
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "awaiting_approval"
        step = s.scalar(select(PilotStep).where(PilotStep.kind == "monitor"))
        judged = pilots.monitor_observations(s, step)
        salt = s.get(Pilot, step.pilot_id).salt
    # imported rows enter the evidence by their salted stream key, not in the file's order
    first_look = judged.loc[judged["look"] == judged["look"].iloc[0], "request_id"].tolist()
    assert first_look == sorted(first_look, key=lambda rid: pilots.stream_key(rid, salt))
    assert sorted(first_look) == sorted(f"b1-{j}" for j in range(12)) and first_look != [
        f"b1-{j}" for j in range(12)
    ]

    kept = _kept_by_two(
        name, mon["decision_id"], promoted, ("a known upstream outage", "the outage is fixed")
    )
    # what a paused approval run does on this answer: safe to repeat, the use case stays promoted
    assert keep_flow(mon["decision_id"], kept.approval_id, "the outage is fixed")["action"] == "kept"
    healthy = look(99, 0)
    assert healthy["outcome"] == "GO" and "over 1 look:" in healthy["explanation"], healthy["explanation"]


def _promoted(name: str) -> str:
    """A pilot's GO approved (no flow waits: applied directly) over a registered dense baseline; the new
    champion's version."""
    from rollout import registry

    _promote_on_a_go(name)
    return registry.current_aliases(name)["champion"]


def _promote_on_a_go(name: str) -> int:
    """The GO decision a person approved, over a registered dense baseline."""
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    did = _pilot_with_decision(name, "GO", "approval")
    with session_scope() as s:
        model_ref = _spec_model(s, name)
    baseline = SparsePlan(tau=1.0, dense_layers=(0, 1), metadata={"baseline": "dense"})
    registry.register_version(name, baseline, model_ref, actor=registry.SYSTEM_PIPELINE, density=1.0)
    approvals.approve(did, Identity(*ALICE), "ship it")
    return did


def _spec_model(session, name: str) -> str:
    from rollout import pilots

    return pilots.load_current_spec(session, pilots.get_use_case(session, name))[0].model


def test_a_manual_rollback_moves_the_champion_once_however_often_it_is_asked(flow_use_case) -> None:
    """Two approvers asking at once, or a person retrying after the run died between MLflow's move and
    the use case's: one rollback, one alias move. Each request used to take a fresh key, and the
    champion went 3 -> 2 -> 1. And a promotion a rollback undid is not "unfinished": `promote` used to
    re-promote it on the old evidence without moving the alias."""
    from rollout import approvals, registry
    from rollout.auth import Identity
    from rollout.db.models import AliasMove, UseCase
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    name = flow_use_case()
    did = _promote_on_a_go(name)
    with session_scope() as s:
        model_ref = _spec_model(s, name)
    second = registry.register_version(name, SparsePlan(tau=0.95), model_ref, actor=registry.SYSTEM_PIPELINE)
    registry.promote(
        name, model_version_id=second.id, actor=Identity(*ALICE), reason="v3", idempotency_key="p3"
    )
    top = registry.current_aliases(name)["champion"]

    def moves() -> int:
        with session_scope() as s:
            return len(s.scalars(select(AliasMove).where(AliasMove.alias == "champion")).all())

    before = moves()
    asked = [approvals.request_rollback(name, Identity(*BOB), "p95 regressed", apply=False)]
    # the same intent a moment later: one decision, whose signer is carrying it out (review T, finding 7:
    # taking it over at once applied it twice)
    with pytest.raises(
        registry.MoveInProgress, match=f"bob's rollback \\(decision {asked[0]['decision_id']}"
    ):
        approvals.request_rollback(name, Identity(*ALICE), "p95 regressed", apply=False)
    # the run dies after MLflow moved the alias and before the use case was marked rolled back ...
    registry.rollback(
        name, actor=Identity(*BOB), reason="p95", idempotency_key=f"rollback:{asked[0]['decision_id']}"
    )
    back = registry.current_aliases(name)["champion"]
    assert back != top and moves() == before + 1
    # ... and a person asks again: that rollback is finished, no second version is rolled back
    again = approvals.request_rollback(name, Identity(*ALICE), "retry")
    assert again["decision_id"] == asked[0]["decision_id"]
    assert registry.current_aliases(name)["champion"] == back and moves() == before + 1
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "rolled_back"
    assert approvals.unfinished_promotion(did) is None  # the rollback undid it: nothing to finish


def test_an_approved_promotion_that_did_not_complete_stays_in_view(flow_use_case, monkeypatch) -> None:
    """MLflow down while the approval's promotion runs: the decision is resolved (it waits for no one),
    yet nothing is in effect. The approvals page said "Nothing is waiting" and gave no way on; it now
    names the decision and the command that finishes it, and the command does."""
    from mlflow import MlflowClient

    from rollout import approvals, queries, registry
    from rollout.auth import Identity
    from tests.dashboard.apptest_helpers import new_app, open_page

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")

    def down(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise ConnectionError("tracking server unreachable")

    with monkeypatch.context() as mp:
        mp.setattr(MlflowClient, "set_registered_model_alias", down)
        with pytest.raises(registry.RegistryError, match="unreachable"):
            approvals.approve(did, Identity(*ALICE), "ship it")
    [row] = queries.read(queries.approved_not_applied)
    assert (row["id"], row["use_case"], [a["actor"] for a in row["approvals"]]) == (did, name, ["alice"])
    at = open_page(new_app(), "approvals")
    shown = " ".join(w.value for w in at.warning)
    assert f"Decision \\#{did} of {name} was approved by alice, but the promotion did not complete" in shown
    assert f"sparsepilot promote {name} --decision {did}" in shown
    assert not any("Nothing is waiting" in s.value for s in at.success)
    # what the page says finishes it: the approval's own promotion, then nothing is left in view
    approvals.apply_promotion(did, approvals.unfinished_promotion(did), reason="finish")
    assert registry.current_aliases(name)["champion"] and queries.read(queries.approved_not_applied) == []


def test_a_go_before_the_plans_last_step_needs_two_approvers_and_says_what_it_skips(flow_use_case) -> None:
    """Review G3: the main job asks for promotion after ramp step 1 (`promote_after_step=1`); its GO was
    promoted on one signature, skipping the plan's later steps, though docs/operations.md asks two
    different approvers for that. Now it takes two, and the decision, the first signature's message and
    the Approvals card name the steps a promotion skips."""
    from types import SimpleNamespace

    from rollout import approvals, decisions, pilots
    from rollout.auth import Identity
    from rollout.db.models import Pilot, UseCase
    from rollout.db.session import session_scope
    from tests.dashboard.apptest_helpers import new_app, open_page

    ramp = [{"traffic_pct": pct, "min_samples": 8} for pct in (50, 70, 90)]
    name = flow_use_case(rollout={"shadow": {"min_samples": 8}, "steps": ramp, "batch_size": 8})
    _pilot_with_decision(name, "EXTEND", "none")
    with session_scope() as s:
        pilot = s.scalar(select(Pilot))
        spec, _ = pilots.load_pilot_spec(s, pilot)
        step = pilots.advance(s, pilot, spec, actor="test")  # ramp step 1 of 3, 50%
        rows = [
            {"request_id": f"q{i}", "arm": pilots.assign_arm(f"q{i}", pilot.salt, 50.0), "quality": 1.0,
             "latency_ms": 120.0, "tokens": 0, "error": False}
            for i in range(84)
        ]  # fmt: skip
        pilots.record_observations(s, step, rows, batch_id="b1", source="imported")
        step_id = step.id
    go = decisions.gate_step(name, step_id, promote_after_step=1)  # as flows/main_job.py asks
    assert (go["outcome"], go["awaiting"]) == ("GO", "approval"), go["explanation"]
    assert "skips ramp steps 2 (70%) and 3 (90%)" in go["explanation"]
    assert "two different approvers" in go["explanation"]

    first = approvals.approve(go["decision_id"], Identity(*ALICE), "looks good")
    assert first.needs_second_approver and not first.took_effect and first.against_recommendation
    assert "skips ramp steps 2 (70%) and 3 (90%)" in first.message
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "awaiting_approval"
    at = open_page(new_app(), "approvals")
    shown = " ".join(w.value for w in at.warning)
    assert "Promoting on this decision skips ramp steps 2 (70%) and 3 (90%)" in shown, shown
    said = " ".join(m.value for m in at.markdown)  # a GO is not shown as "the gate recommends: reject"
    assert "GO at this step" in said and "recommends" not in said, said
    evidence = decisions.evidence(go["decision_id"])
    card = SimpleNamespace(awaiting="approval", outcome="GO", evidence=evidence)
    assert approvals.recommended_action(card) == "reject"  # the card's rule: approving is the override

    second = approvals.approve(go["decision_id"], Identity(*BOB), "agreed: skip the ramp")
    assert second.took_effect and second.against_recommendation
    with session_scope() as s:
        assert s.scalar(select(UseCase.phase).where(UseCase.name == name)) == "promoted"


def test_a_former_approvers_first_signature_lapses(flow_use_case, monkeypatch) -> None:
    """Review s46 A7: alice signs "promote anyway" on an EXTEND, then is demoted (or her account is
    deleted). Bob's signature does not complete the override on hers: hers lapses (said, and audited)
    and his is the first; a second current approver (carol) completes it."""
    from rollout import approvals, registry
    from rollout.auth import ACCOUNTS_ENV, Identity
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    h = cheap_hash("pw-pw-pw-pw")
    monkeypatch.setenv(ACCOUNTS_ENV, f"alice:approver:{h};bob:approver:{h};carol:approver:{h}")
    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    assert approvals.approve(did, Identity(*ALICE), "business needs it now").needs_second_approver

    monkeypatch.setenv(ACCOUNTS_ENV, f"alice:viewer:{h};bob:approver:{h};carol:approver:{h}")  # demoted
    from rollout import queries

    with session_scope() as s:  # the Approvals page reads the same rule: no second approver is awaited
        pending = [r["id"] for r in queries.pending_decisions(s)]
        startable = [r["id"] for r in queries.overridable_decisions(s)]
        rows = queries.approvals(s, [did])
    assert did not in pending and did in startable
    assert [(r["actor"], r["lapsed"]) for r in rows] == [("alice", "now a viewer")]
    second = approvals.approve(did, Identity(*BOB), "agreed with alice")
    assert second.needs_second_approver and not second.took_effect
    assert "alice's signature no longer counts (alice is now a viewer)" in second.message
    assert "champion" not in registry.current_aliases(name)
    with session_scope() as s:
        lapsed = s.scalars(select(AuditEntry).where(AuditEntry.action == "approval.approve.signature_lapsed"))
        assert [(e.actor, e.details["signer"], e.details["why"]) for e in lapsed] == [
            ("bob", "alice", "now a viewer")
        ]
    third = approvals.approve(did, Identity("carol", "approver", "cli-env"), "agreed with bob")
    assert third.took_effect


def test_a_deleted_approvers_first_signature_lapses(flow_use_case, monkeypatch) -> None:
    from rollout import approvals
    from rollout.auth import ACCOUNTS_ENV, Identity

    h = cheap_hash("pw-pw-pw-pw")
    monkeypatch.setenv(ACCOUNTS_ENV, f"alice:approver:{h};bob:approver:{h}")
    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    approvals.approve(did, Identity(*ALICE), "business needs it now")
    monkeypatch.setenv(ACCOUNTS_ENV, f"bob:approver:{h}")  # alice left
    second = approvals.approve(did, Identity(*BOB), "agreed with alice")
    assert second.needs_second_approver and not second.took_effect
    assert "alice's signature no longer counts (alice is no longer an account)" in second.message


@pytest.mark.parametrize(
    ("listed_now", "by_dashboard", "lapses"),
    [
        ("ben@corp.example", False, True),
        ("ben@corp.example", True, True),
        ("ben@corp.example,https://idp.example#ann-1", False, False),
    ],
    ids=["taken-off-the-list", "taken-off-the-dashboards-list", "still-listed-by-subject"],
)
def test_an_oidc_approver_taken_off_the_list_no_longer_counts(
    flow_use_case, monkeypatch, listed_now: str, by_dashboard: bool, lapses: bool
) -> None:
    """A local approver demoted since their first signature lapses (above); an OIDC approver taken off
    the approver list still counted, so one current approver completed an override on a former
    approver's signature. Hers lapses the same way (said, audited, the Approvals page's rule), whether
    the list is the environment's or the dashboard's own; listed by <issuer>#<subject> she still counts."""
    from contextlib import nullcontext

    from rollout import approvals, auth, queries
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    claims = {
        "iss": "https://idp.example",
        "sub": "ann-1",
        "email": "ann@corp.example",
        "email_verified": True,
    }
    ann = auth.identity_from_oidc(claims, ["ann@corp.example", "ben@corp.example"])
    ben = auth.Identity("oidc:ben@corp.example", "approver", "oidc", subject="https://idp.example#ben-1")
    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    assert approvals.approve(did, ann, "business needs it now").needs_second_approver

    monkeypatch.setenv("SPARSEPILOT_OIDC_APPROVERS", "" if by_dashboard else listed_now)
    with auth.oidc_approvers_known(listed_now.split(",")) if by_dashboard else nullcontext():
        with session_scope() as s:
            rows = queries.approvals(s, [did])
            counting, _ = approvals.counting_signatures(s, did, "approve")
        gone = "no longer on the OIDC approver list"
        assert [(r["actor"], r["lapsed"]) for r in rows] == [
            ("oidc:ann@corp.example", gone if lapses else None)
        ]
        assert [a.actor for a, _ in counting] == ([] if lapses else ["oidc:ann@corp.example"])
        if not lapses:
            return
        second = approvals.approve(did, ben, "agreed with ann")
    assert second.needs_second_approver and not second.took_effect
    assert f"oidc:ann@corp.example's signature no longer counts (oidc:ann@corp.example is {gone})" in (
        second.message
    )
    with session_scope() as s:
        audited = s.scalars(
            select(AuditEntry).where(AuditEntry.action == "approval.approve.signature_lapsed")
        )
        assert [(e.actor, e.details["signer"], e.details["why"]) for e in audited] == [
            ("oidc:ben@corp.example", "oidc:ann@corp.example", gone)
        ]


def test_one_oidc_subject_under_two_emails_is_one_person(flow_use_case) -> None:
    """Review s46 A2: an approver listed by <issuer>#<subject> whose email changed at the provider (or
    whose email is not verified on one sign-in) is recorded under two names, but is one person: the
    second half of their own override is refused, before any approval run starts."""
    from flows.approval import approve_decision
    from rollout import approvals
    from rollout.auth import identity_from_oidc
    from rollout.db.models import Approval

    listed = ["https://idp.example#248289761001"]
    claims = {"iss": "https://idp.example", "sub": "248289761001", "email_verified": True}
    before = identity_from_oidc(claims | {"email": "alice@corp.example"}, listed)
    after = identity_from_oidc(claims | {"email": "alice.smith@corp.example"}, listed)
    unverified = identity_from_oidc(claims | {"email": "a@corp.example", "email_verified": False}, listed)
    assert before.name != after.name and before.can_approve and after.can_approve and unverified.can_approve
    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    assert approvals.approve(did, before, "business needs it now").needs_second_approver
    refused = r"already signed .* \(as 'oidc:alice@corp\.example'\)"
    for again in (after, unverified):
        with pytest.raises(approvals.ApprovalError, match=refused):
            approve_decision(did, again, "me again")
    assert _count(Approval) == 1


def test_rejecting_a_decision_that_asked_nobody_is_refused_and_points_at_abort(flow_use_case) -> None:
    """Review U9: rejecting a running pilot's EXTEND (what a new approver tries, to take back a mistaken
    override signature) used to stop the whole pilot on one signature, saying "rejected decision 1
    (none)". It is refused, naming `pilot --abort` and `--withdraw`, and nothing is written."""
    from rollout import approvals
    from rollout.auth import Identity
    from rollout.db.models import Approval, AuditEntry, Pilot
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    audit_before = _count(AuditEntry)
    with pytest.raises(approvals.ApprovalError) as err:
        approvals.approve(did, Identity(*ALICE), "changed my mind", reject=True)
    assert f"sparsepilot pilot {name} --abort --reason" in str(err.value)
    assert "--withdraw" in str(err.value) and "nothing was recorded" in str(err.value)
    assert _count(Approval) == 0 and _count(AuditEntry) == audit_before
    with session_scope() as s:
        assert s.scalars(select(Pilot.status)).all() == ["running"]


def test_an_approver_withdraws_their_own_unconfirmed_override_signature(flow_use_case) -> None:
    """Review U9: a first override signature can be taken back by its signer (audited); the pilot keeps
    running, the decision stays open, another approver cannot withdraw it, and a signature that took
    effect cannot be withdrawn. After a withdrawal a second approver's signature is a first one again."""
    from rollout import approvals, queries
    from rollout.auth import Identity
    from rollout.db.models import AuditEntry, GateDecision, Pilot
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    first = approvals.approve(did, Identity(*ALICE), "thought approve meant reviewed")
    assert first.needs_second_approver and "--withdraw" in first.message and "is running" in first.message

    with pytest.raises(approvals.ApprovalError, match="only they can withdraw"):
        approvals.withdraw(did, Identity(*BOB), "not mine")
    gone = approvals.withdraw(did, Identity(*ALICE), "signed by mistake")
    assert gone.message.startswith("signature withdrawn") and "pilot 1 of" in gone.message
    with session_scope() as s:
        assert s.scalars(select(Pilot.status)).all() == ["running"]
        assert s.get(GateDecision, did).resolution is None
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "approval.withdraw")).one()
        assert entry.actor == "alice" and entry.details["reason"] == "signed by mistake"
    with pytest.raises(approvals.ApprovalError, match="no unconfirmed signature"):
        approvals.withdraw(did, Identity(*ALICE), "again")
    with session_scope() as s:  # the dashboard no longer lists it as waiting for a second approver
        assert did not in [r["id"] for r in queries.pending_decisions(s)]
        assert queries.portfolio(s)[0]["waits_for"] != "a second approver"

    # bob's signature is now a first one, not a confirmation of alice's withdrawn one
    again = approvals.approve(did, Identity(*BOB), "I do want it promoted")
    assert again.needs_second_approver and not again.took_effect
    done = approvals.approve(did, Identity(*ALICE), "agreed with bob after all")
    assert done.took_effect and "pilot 1 of" in done.message and "promoted" in done.message
    with pytest.raises(approvals.ApprovalError, match="already approved"):
        approvals.withdraw(did, Identity(*BOB), "too late")


def test_a_decision_that_does_not_exist_is_not_called_another_use_cases(flow_use_case) -> None:
    """Review U4: `approve NAME --decision 999` said "does not belong to use case"."""
    from rollout import approvals

    name = flow_use_case()
    with pytest.raises(approvals.ApprovalError) as err:
        approvals.check_decision_of(name, 999)
    assert "decision 999 does not exist" in str(err.value) and f"sparsepilot gate {name}" in str(err.value)
    other = flow_use_case("other-chat")
    did = _pilot_with_decision(other, "EXTEND", "none")
    elsewhere = f"decision {did} belongs to use case 'other-chat', not '{name}'"
    with pytest.raises(approvals.ApprovalError, match=elsewhere):
        approvals.check_decision_of(name, did)


def test_the_cli_refuses_to_reject_an_unasked_extend_and_withdraws_a_signature(
    trust_env, flow_use_case
) -> None:
    """Review U9 on the real command line: `approve --reject` on a running pilot's EXTEND exits 2 naming
    `pilot --abort`, starts no approval flow run and leaves the pilot running; `approve --withdraw`
    takes alice's first override signature back, and says so (the signature and its withdrawal in this
    process: what the command answers, not what a process boundary does)."""
    import os

    from prefect.settings import PREFECT_API_URL

    from rollout.db.models import Pilot
    from rollout.db.session import session_scope
    from tests.fixtures.trust import cli_here, run_cli

    name = flow_use_case()
    did = _pilot_with_decision(name, "EXTEND", "none")
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    base = ("approve", name, "--decision", str(did), "--reason")
    runs_before = _approval_runs(env)  # the Prefect server is shared with earlier tests
    rejected = run_cli(*base, "oops", "--reject", user="alice", env=env)
    assert rejected.returncode == 2, rejected.stdout + rejected.stderr
    assert f"sparsepilot pilot {name} --abort --reason" in rejected.stderr
    signed = cli_here(*base, "I reviewed it", user="alice", env=env)
    assert signed.returncode == 0 and "--withdraw" in signed.stdout, signed.stdout + signed.stderr
    taken = cli_here(*base, "signed by mistake", "--withdraw", user="alice", env=env)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert "signature withdrawn" in taken.stdout and "pilot 1 of" in taken.stdout
    with session_scope() as s:
        assert s.scalars(select(Pilot.status)).all() == ["running"]
    assert _approval_runs(env) == runs_before  # no approval flow run was started


def _approval_runs(env: dict) -> int:
    """How many approval flow runs the Prefect API holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["approval"]))))
