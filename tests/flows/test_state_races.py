"""Review Q: runs that change one use case's state at the same time, on SQLite and PostgreSQL, with real
threads. A slow gate look (decide() wrapped to wait) or a slow MLflow (`registry._apply_mlflow` wrapped)
opens the window; what lands in it is the real code path: an operator's `pilot --abort`, approvals, a
person's rollback, the monitor's look and rollback, the cycle finishing an approved decision.

- a gate look never acts on a pilot that was aborted or promoted while it looked (finding 1);
- a monitor look whose champion was rolled back while it answered asks nobody for anything (finding 4);
- an abort is refused once the pilot's GO is approved, and a promotion refuses a stopped pilot (finding 5);
- the monitor's rollback and a person's make one move, and the monitor's is not called superseded (3);
- a promotion applied directly is carried out once, committed once in the audit (finding 6)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import select

from tests.flows.test_approvals import _pilot_with_decision
from tests.trust.test_pilot_rules import _challenger, _dataset_ids

ALICE, BOB, CAROL = (("alice", "approver", "local-account"), ("bob", "approver", "local-account"),
                     ("carol", "approver", "local-account"))  # fmt: skip


@pytest.fixture
def use_case(trust_db: str, mlflow_home: Any, tiny_model_dir, pilot_dataset, tmp_path):  # noqa: ANN001, ANN201
    """Factory: a use case on the tiny model in this test's home and state DB (no Prefect server)."""
    from tests.fixtures.flows import use_case_factory

    return use_case_factory(tiny_model_dir, pilot_dataset, tmp_path)


def _identity(who: tuple[str, str, str]):  # noqa: ANN202
    from rollout.auth import Identity

    return Identity(*who)


def _state(name: str) -> dict[str, Any]:
    from rollout import pilots, registry
    from rollout.db.models import AliasMove, AuditEntry, GateDecision, Pilot, PilotStep
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        p = s.scalar(select(Pilot).order_by(Pilot.id.desc()))
        return {
            "phase": uc.phase,
            "pilot": p.status if p is not None else None,
            "steps": [st.status for st in s.scalars(select(PilotStep).order_by(PilotStep.id))],
            "decisions": [
                (d.kind, d.outcome, d.awaiting, d.resolution)
                for d in s.scalars(select(GateDecision).order_by(GateDecision.id))
            ],  # fmt: skip
            "champions": registry.champions(s, uc.id),
            "moves": [
                (m.idempotency_key, m.from_version, m.to_version, m.status)
                for m in s.scalars(
                    select(AliasMove).where(AliasMove.alias == "champion").order_by(AliasMove.id)
                )
            ],  # fmt: skip
            "audit": [a.action for a in s.scalars(select(AuditEntry).order_by(AuditEntry.id))],
        }


def _commits_audited(name: str) -> dict[str, int]:
    """How often each champion move's commit is in the audit log, by its idempotency key."""
    from rollout import pilots
    from rollout.db.models import AliasMove, AuditEntry
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        champion = select(AliasMove).where(AliasMove.use_case_id == uc.id, AliasMove.alias == "champion")
        moves = {str(m.id): m.idempotency_key for m in s.scalars(champion)}
        out: dict[str, int] = {}
        for a in s.scalars(select(AuditEntry).where(AuditEntry.action.like("alias.%.committed"))):
            if a.entity_id in moves:
                out[moves[a.entity_id]] = out.get(moves[a.entity_id], 0) + 1
        return out


def _running_step(name: str, quality_treatment: float = 0.8) -> dict[str, Any]:
    """A running pilot whose step holds a batch both arms answered (the gate judges it)."""
    from rollout import pilot_batches

    _challenger(name)
    info = pilot_batches.ensure_pilot(name)
    rows = [{"request_id": r, "arm": a, "quality": 0.8 if a == "control" else quality_treatment,
             "latency_ms": 100.0, "tokens": 4, "error": False}
            for r in _dataset_ids(name, 60) for a in ("control", "treatment")]  # fmt: skip
    pilot_batches.store_batch(info["step_id"], rows, "b-1", "pilot")
    return info


def _override_half_signed(name: str) -> tuple[dict, int]:
    """A running step whose next look says NO-GO, and an earlier EXTEND that alice has signed to promote
    against the gate (an override: a second approver's signature takes effect). (step info, its id)"""
    from rollout import approvals, pilots
    from rollout.db.models import Pilot
    from rollout.db.session import session_scope

    info = _running_step(name, quality_treatment=0.1)  # the look says NO-GO
    with session_scope() as s:  # an earlier look said EXTEND
        uc, p = pilots.get_use_case(s, name), s.scalar(select(Pilot))
        d, _ = pilots.record_decision(s, idempotency_key="gate:earlier", use_case=uc, pilot=p,
            step=pilots.current_step(s, p), outcome="EXTEND", evidence={"reasons": ["inconclusive"]},
            explanation="EXTEND", data_fingerprint="e" * 64, awaiting="none")  # fmt: skip
        s.flush()
        early = d.id
    assert approvals.approve(early, _identity(ALICE), "ship it early").needs_second_approver
    return info, early


def _slow_gate(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """decide() has judged (the first event), then takes 2 s more: the window another transaction lands
    in; the test sets the second event once what it meant to land there has landed, which closes the
    window early (a transaction that waits for the look's own locks never lands: the 2 s pass)."""
    import rollout.gate as gate

    judged, landed, decide = threading.Event(), threading.Event(), gate.decide

    def slow(*args: Any, **kwargs: Any) -> Any:
        out = decide(*args, **kwargs)
        judged.set()
        landed.wait(2.0)
        return out

    monkeypatch.setattr(gate, "decide", slow)
    return judged, landed


def _slow_mlflow(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The MLflow call of a move is under way (the first event) and takes 1.5 s, or until the test sets
    the second event, once what it meant to land in the window has landed (as `_slow_gate`)."""
    from rollout import registry

    inside, landed, apply = threading.Event(), threading.Event(), registry._apply_mlflow

    def slow(*args: Any) -> Any:
        inside.set()
        landed.wait(1.5)
        return apply(*args)

    monkeypatch.setattr(registry, "_apply_mlflow", slow)
    return inside, landed


def _in_thread(fn, out: dict, key: str) -> threading.Thread:  # noqa: ANN001
    def run() -> None:
        try:
            out[key] = fn()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            out[key] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_gate_look_overlapping_an_abort_records_nothing(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Finding 1(b): the look used to record a final-step GO on the aborted pilot and bring it back to
    "awaiting approval" (its aborted step "passed"); approving it then promoted an aborted pilot."""
    from rollout import decisions, leases, pilot_batches, pilots

    name = use_case()
    info = _running_step(name)
    judged, landed = _slow_gate(monkeypatch)
    out: dict[str, Any] = {}

    def look() -> dict:
        with leases.holding(name, "gate"):
            return decisions.gate_step(name, info["step_id"], promote_after_step=0)

    t = _in_thread(look, out, "gate")
    assert judged.wait(120)
    pilot_batches.abort(name, actor="olga", reason="wrong traffic mix")
    landed.set()
    t.join(120)
    assert isinstance(out["gate"], pilots.PilotStateError), out["gate"]
    assert "it was running at step 0 when this look began" in str(out["gate"])
    assert "stopped" in str(out["gate"])
    state = _state(name)
    assert (state["phase"], state["pilot"], state["steps"], state["decisions"]) == (
        "stopped", "stopped", ["aborted"], [],
    )  # fmt: skip


def test_a_gate_look_overlapping_an_override_promotion_leaves_the_champion_promoted(
    use_case,
    monkeypatch,  # noqa: ANN001
) -> None:
    """Finding 1(a): a NO-GO look that ended after two approvers promoted early used to stop the pilot
    and the use case: the sparse champion served, unmonitored, and no rollback could reach it."""
    from rollout import approvals, decisions, leases, pilot_batches, pilots

    name = use_case()
    info, early = _override_half_signed(name)
    judged, landed = _slow_gate(monkeypatch)
    out: dict[str, Any] = {}

    def look() -> dict:
        with leases.holding(name, "gate"):
            return decisions.gate_step(name, info["step_id"])

    t = _in_thread(look, out, "gate")
    assert judged.wait(120)
    assert approvals.approve(early, _identity(BOB), "agreed").took_effect
    landed.set()
    t.join(120)
    assert isinstance(out["gate"], pilots.PilotStateError), out["gate"]
    assert "promoted" in str(out["gate"])
    state = _state(name)
    assert (state["phase"], state["pilot"], len(state["champions"])) == ("promoted", "promoted", 1)
    assert [d[1] for d in state["decisions"]] == ["EXTEND"]
    assert pilot_batches.monitor_target(name) is not None  # the monitor watches the new champion


def _promoted(name: str) -> dict[str, Any]:
    """The dense baseline and the challenger both champions (the GO approved): one to roll back to."""
    from rollout import approvals, pilot_batches, pilots, registry
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    with session_scope() as s:
        model = pilots.load_current_spec(s, pilots.get_use_case(s, name))[0].model
    plan = SparsePlan(estimator="pooled", tau=1.0, dense_layers=(0, 1), metadata={"baseline": "dense"})
    registry.register_version(name, plan, model, actor=registry.SYSTEM_PIPELINE, density=1.0)
    did = _pilot_with_decision(name, "GO", "approval")
    approvals.approve(did, _identity(ALICE), "ship it")
    return pilot_batches.monitor_target(name)


def test_a_monitor_look_after_a_manual_rollback_asks_nobody(use_case) -> None:  # noqa: ANN001
    """Finding 4: a look that answered its batch while a person rolled back used to record its breach
    afterwards and pull the rolled-back use case into "awaiting approval" for a rollback nobody could
    approve ("keeping" it left a use case "promoted" with nothing to monitor)."""
    from rollout import approvals, decisions, leases, pilot_batches

    name = use_case(rollback="manual")
    _promoted(name)
    answering, answered = threading.Event(), threading.Event()
    ids = _dataset_ids(name, 40)
    out: dict[str, Any] = {}

    def monitor() -> dict:
        with leases.holding(name, "monitor"):
            info = pilot_batches.monitor_target(name)
            answering.set()
            assert answered.wait(120)  # the model answers the batch meanwhile
            rows = [{"request_id": r, "arm": a, "quality": 0.8, "latency_ms": 100.0, "tokens": 4,
                     "error": a == "treatment" and i % 2 == 0}
                    for i, r in enumerate(ids) for a in ("control", "treatment")]  # fmt: skip
            pilot_batches.store_batch(info["step_id"], rows, "m-1", "monitor")
            passed = {"passed": True, "failures": [], "report": {}}
            return decisions.monitor_look(name, info, rows, passed, "m-1")

    t = _in_thread(monitor, out, "monitor")
    assert answering.wait(120)
    approvals.request_rollback(name, _identity(BOB), "users complain")
    answered.set()
    t.join(120)
    look = out["monitor"]
    assert isinstance(look, dict), look
    assert (look["outcome"], look["awaiting"], look["resolution"], look["automatic_rollback"]) == (
        "NO-GO", "none", "superseded", False,
    )  # fmt: skip
    assert "no longer serves as promoted" in look["explanation"]
    state = _state(name)
    assert (state["phase"], state["pilot"]) == ("rolled_back", "rolled_back")
    assert decisions.latest_waiting(name) is None  # nothing for anyone to approve


def test_an_abort_is_refused_while_an_approved_promotion_is_carried_out(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Finding 5: `pilot --abort` during the approved promotion's MLflow call used to report success,
    then the promotion undid it (phase promoted, the aborted step still "aborted")."""
    from rollout import approvals, pilot_batches, pilots, registry

    name = use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    inside, landed = _slow_mlflow(monkeypatch)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: approvals.approve(did, _identity(ALICE), "ship it"), out, "approve")
    assert inside.wait(120)
    with pytest.raises(pilots.PilotStateError, match=f"decision {did} is approved and its promotion"):
        pilot_batches.abort(name, actor="olga", reason="wrong traffic mix")
    landed.set()
    t.join(120)
    assert out["approve"].took_effect, out["approve"]
    state = _state(name)
    assert (state["phase"], state["pilot"], state["steps"]) == ("promoted", "promoted", ["passed"])
    assert "pilot.abort" not in state["audit"]
    assert registry.current_aliases(name)["champion"] == state["champions"][-1]


def test_a_promotion_refuses_a_pilot_stopped_since_its_approval(use_case) -> None:  # noqa: ANN001
    """apply_promotion checks the pilot under its lock before any move: a stopped one is not promoted."""
    from rollout import approvals
    from rollout.db.models import Approval, GateDecision, Pilot
    from rollout.db.session import session_scope

    name = use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    with session_scope() as s:  # signed, then the pilot stopped (as a crash-left state might have it)
        d = s.get(GateDecision, did)
        approval = approvals._sign(s, d, _identity(ALICE), "approve", "ship it", False, "approval.approve")
        d.resolution = "approved"
        s.get(Pilot, d.pilot_id).status = "stopped"
        s.flush()
        aid = approval.id
    with pytest.raises(approvals.ApprovalError, match=f"decision {did}: pilot .* is stopped.*nothing moved"):
        approvals.apply_promotion(did, aid, reason="finishing")
    assert _state(name)["moves"] == []
    with session_scope() as s:
        assert s.scalar(select(Approval.id).where(Approval.id == aid)) == aid


def test_the_monitors_rollback_and_a_persons_at_once_make_one_move(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Finding 3: both committed a rollback move (MLflow moved twice) and the monitor's decision, whose
    move committed, was closed "superseded". Now the person is told the monitor's rollback is under way."""
    from rollout import approvals, audit, leases, pilots, registry
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    name = use_case()  # rollback: auto
    info = _promoted(name)
    with session_scope() as s:  # the alarm monitor_look records under `rollback: auto`
        d, _ = pilots.record_decision(s, idempotency_key=f"monitor:{info['step_id']}:m-1",
            use_case=pilots.get_use_case(s, name), pilot=s.get(Pilot, info["pilot_id"]),
            step=s.get(PilotStep, info["step_id"]), kind="monitor", outcome="NO-GO",
            evidence={"batch_id": "m-1"}, explanation="Monitor: NO-GO. rolled back automatically.",
            data_fingerprint="m-1", awaiting="none", actor=audit.MONITOR_ACTOR)  # fmt: skip
        s.flush()
        alarm = d.id
    inside, landed = _slow_mlflow(monkeypatch)
    out: dict[str, Any] = {}

    def monitor() -> dict:
        with leases.holding(name, "monitor"):
            return approvals.apply_rollback(alarm, None, reason="guardrail breached", automatic=True)

    t = _in_thread(monitor, out, "monitor")
    assert inside.wait(120)
    with pytest.raises(registry.MoveInProgress, match=f"automatic rollback \\(decision {alarm}"):
        approvals.request_rollback(name, _identity(BOB), "users complain")
    landed.set()
    t.join(120)
    assert out["monitor"]["action"] == "rolled_back", out["monitor"]
    state = _state(name)
    rollbacks = [m for m in state["moves"] if m[0].startswith("rollback:")]
    assert rollbacks == [(f"rollback:{alarm}", rollbacks[0][1], rollbacks[0][2], "committed")]
    assert state["audit"].count("alias.rollback.committed") == 1
    assert state["decisions"][-1][3] == "auto_rolled_back" and state["phase"] == "rolled_back"
    assert "rollback.superseded" not in state["audit"]


def test_a_persons_rollback_under_way_makes_the_monitors_give_way(use_case, monkeypatch) -> None:  # noqa: ANN001
    """The other order: the person's rollback is moving the champion when the monitor's starts; the
    monitor's moves nothing (its own move never began) and is closed superseded."""
    from rollout import approvals, audit, leases, pilots
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    name = use_case()
    info = _promoted(name)
    inside, landed = _slow_mlflow(monkeypatch)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: approvals.request_rollback(name, _identity(BOB), "users complain"), out, "person")
    assert inside.wait(120)
    with session_scope() as s:
        d, _ = pilots.record_decision(s, idempotency_key=f"monitor:{info['step_id']}:m-2",
            use_case=pilots.get_use_case(s, name), pilot=s.get(Pilot, info["pilot_id"]),
            step=s.get(PilotStep, info["step_id"]), kind="monitor", outcome="NO-GO",
            evidence={"batch_id": "m-2"}, explanation="Monitor: NO-GO.", data_fingerprint="m-2",
            awaiting="none", actor=audit.MONITOR_ACTOR)  # fmt: skip
        s.flush()
        alarm = d.id
    with leases.holding(name, "monitor"):
        mine = approvals.apply_rollback(alarm, None, reason="guardrail breached", automatic=True)
    landed.set()
    t.join(120)
    assert mine["action"] == "none" and "is being carried out" in mine["reason"], mine
    state = _state(name)
    assert [m[3] for m in state["moves"] if m[0].startswith("rollback:")] == ["committed"]
    assert state["phase"] == "rolled_back" and state["decisions"][-1][3] == "superseded"


def test_a_direct_approval_and_the_cycles_finishing_carry_a_promotion_out_once(
    use_case,
    monkeypatch,  # noqa: ANN001
) -> None:
    """Finding 6: the cycle's finish_unfinished carried out a promotion the dashboard was applying at that
    moment: MLflow called twice per move, "retried" and two "committed" entries per move in the audit.
    Now the cycle leaves a just-signed decision alone; and two callers of one move (the cycle's finish
    after the grace, racing a slow apply) audit its commit once."""
    from flows.promote import finish_unfinished
    from rollout import approvals, leases, unfinished

    name = use_case()
    from rollout import pilots, registry
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    with session_scope() as s:
        model = pilots.load_current_spec(s, pilots.get_use_case(s, name))[0].model
    plan = SparsePlan(estimator="pooled", tau=1.0, dense_layers=(0, 1), metadata={"baseline": "dense"})
    registry.register_version(name, plan, model, actor=registry.SYSTEM_PIPELINE, density=1.0)
    did = _pilot_with_decision(name, "GO", "approval")
    inside, landed = _slow_mlflow(monkeypatch)
    out: dict[str, Any] = {}
    t = _in_thread(
        lambda: approvals.approve(did, _identity(ALICE), "ship it", apply_if_no_flow=True), out, "dashboard"
    )
    assert inside.wait(120)
    with leases.holding(name, "use-case cycle"):
        assert unfinished.unfinished_of(name) is not None  # decided, not yet in effect
        assert finish_unfinished(name) is None  # signed a moment ago: its approver is carrying it out
        u = unfinished.unfinished_of(name)
        late = approvals.apply_promotion(u.decision_id, u.approval_id, reason="finishing") if u else None
    landed.set()
    t.join(120)
    assert out["dashboard"].took_effect, out["dashboard"]
    state = _state(name)
    assert state["phase"] == "promoted" and late is not None
    committed = _commits_audited(name)
    assert committed == {m[0]: 1 for m in state["moves"]}, committed
    assert sorted(committed) == [f"baseline:{did}", f"promote:{did}"]
    assert [m[3] for m in state["moves"]] == ["committed", "committed"]


def _slow_check_approvable(monkeypatch: pytest.MonkeyPatch, hold: float) -> threading.Event:
    """check_approvable has passed, then takes `hold` s more: approve's locks are held meanwhile."""
    from rollout import approvals
    from rollout.approvals import signing

    passed, check = threading.Event(), approvals.check_approvable

    def slow(session: Any, d: Any) -> None:
        check(session, d)
        passed.set()
        time.sleep(hold)

    monkeypatch.setattr(signing, "check_approvable", slow)  # what `approve` calls
    return passed


def test_an_abort_during_an_approval_waits_and_is_refused_without_a_deadlock(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Review T, finding 1: approve locked the decision first and abort the use case, pilot, then the
    decisions: PostgreSQL found a deadlock and the approver got a raw OperationalError. Now both lock use
    case -> pilot -> decision: the abort waits for the signature and is refused, clearly."""
    from rollout import approvals, pilot_batches, pilots

    name = use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    passed = _slow_check_approvable(monkeypatch, 1.5)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: approvals.approve(did, _identity(ALICE), "ship it"), out, "approve")
    assert passed.wait(120)
    with pytest.raises(pilots.PilotStateError) as refused:
        pilot_batches.abort(name, actor="olga", reason="wrong traffic mix")
    t.join(120)
    assert isinstance(out["approve"], approvals.ApprovalResult), out["approve"]
    assert out["approve"].took_effect
    assert f"decision {did} is approved" in str(refused.value) or "no active pilot" in str(refused.value)
    state = _state(name)
    assert (state["phase"], state["pilot"]) == ("promoted", "promoted")
    assert "pilot.abort" not in state["audit"]


def test_an_override_signed_during_a_gate_look_is_promoted_and_the_look_records_nothing(
    use_case,
    monkeypatch,  # noqa: ANN001
) -> None:
    """Review T, finding 3: the second approver's check of the pilot held no pilot lock; a NO-GO look in
    the window stopped the pilot (PostgreSQL), the override stood "approved" and its promotion was refused.
    Now the look waits for the signature and records nothing on a pilot whose promotion is approved."""
    from rollout import approvals, decisions, leases, pilots

    name = use_case()
    info, early = _override_half_signed(name)
    passed = _slow_check_approvable(monkeypatch, 3.0)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: approvals.approve(early, _identity(BOB), "agreed"), out, "approve")
    assert passed.wait(120)
    with pytest.raises(pilots.PilotStateError, match="is promoted at step|approved and its promotion"):
        with leases.holding(name, "gate"):
            decisions.gate_step(name, info["step_id"])
    t.join(120)
    assert isinstance(out["approve"], approvals.ApprovalResult), out["approve"]
    assert out["approve"].took_effect
    state = _state(name)
    assert (state["phase"], state["pilot"], len(state["champions"])) == ("promoted", "promoted", 1)
    assert [d[1] for d in state["decisions"]] == ["EXTEND"]


def _monitor_rows(name: str, batch: str, n: int = 40, skip: int = 0) -> list[dict]:
    ids = _dataset_ids(name, skip + n)[skip:]
    return [{"request_id": f"{batch}-{r}", "arm": a, "quality": 0.8, "latency_ms": 100.0, "tokens": 4,
             "error": False} for r in ids for a in ("control", "treatment")]  # fmt: skip


def _slow_monitor_judgement(
    monkeypatch: pytest.MonkeyPatch,
    then=None,  # noqa: ANN001
) -> tuple[threading.Event, threading.Event]:
    """The monitor's guardrails have judged (the first event), then `then()` runs (first call only), which
    lands what it writes in the window itself, or 2 s pass, or fewer once the test sets the second event
    (what it meant to land there has landed, as `_slow_gate`)."""
    from rollout import pilots

    judged, landed, guardrails = threading.Event(), threading.Event(), pilots.monitor_guardrails

    def slow(*args: Any, **kwargs: Any) -> Any:
        out = guardrails(*args, **kwargs)
        if not judged.is_set():
            judged.set()
            if then is not None:
                then()
                landed.set()
            landed.wait(2.0)
        return out

    monkeypatch.setattr(pilots, "monitor_guardrails", slow)
    return judged, landed


def test_a_monitor_look_judges_without_holding_the_write_lock(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Review T, finding 2: the look read and judged the monitor's whole history under SQLite's write lock
    (seconds at a million rows): another use case's run waited for it, and was refused after 5 s. Now it
    judges without the lock and takes it only to re-check and record."""
    from rollout import decisions, leases, pilot_batches

    name = use_case(rollback="manual")
    info = _promoted(name)
    other = use_case("other-uc")
    rows = _monitor_rows(name, "m-1")
    pilot_batches.store_batch(info["step_id"], rows, "m-1", "monitor")
    judged, landed = _slow_monitor_judgement(monkeypatch)
    passed = {"passed": True, "failures": [], "report": {}}
    out: dict[str, Any] = {}

    def look() -> dict:
        with leases.holding(name, "monitor"):
            return decisions.monitor_look(name, info, rows, passed, "m-1")

    t = _in_thread(look, out, "monitor")
    assert judged.wait(120)
    t0 = time.monotonic()
    with leases.holding(other, "gate"):
        waited = time.monotonic() - t0
    landed.set()
    t.join(120)
    assert waited < 1.0, f"another use case's lease waited {waited:.2f}s for the monitor look"
    assert isinstance(out["monitor"], dict), out["monitor"]
    assert (out["monitor"]["outcome"], out["monitor"]["created"]) == ("GO", True)


def test_a_monitor_look_judges_again_rows_stored_while_it_judged(use_case, monkeypatch) -> None:  # noqa: ANN001
    """What a look records is the judgement of the rows its `judged_through` says: a batch stored while it
    judged without the lock is judged again, under the lock."""
    from rollout import decisions, pilot_batches, pilots
    from rollout.db.models import PilotStep
    from rollout.db.session import session_scope

    name = use_case(rollback="manual")
    info = _promoted(name)
    rows = _monitor_rows(name, "m-1", n=20)
    pilot_batches.store_batch(info["step_id"], rows, "m-1", "monitor")
    late = _monitor_rows(name, "m-2", n=20, skip=20)
    for r in late:
        r["error"] = r["arm"] == "treatment"  # every sparse answer fails: a breach once judged
    judgements: list[int] = []
    judge = pilots.monitor_observations
    monkeypatch.setattr(pilots, "monitor_observations", lambda s, st: judgements.append(1) or judge(s, st))
    _slow_monitor_judgement(
        monkeypatch, then=lambda: pilot_batches.store_batch(info["step_id"], late, "m-2", "monitor")
    )
    passed = {"passed": True, "failures": [], "report": {}}
    look = decisions.monitor_look(name, info, rows, passed, "m-1")
    assert len(judgements) == 2
    with session_scope() as s:
        last = pilots.last_observation_id(s, s.get(PilotStep, info["step_id"]))
    assert decisions.evidence(look["decision_id"])["judged_through"] == last
    assert look["outcome"] == "NO-GO", look


def _alarm_waiting(name: str) -> tuple[dict[str, Any], int]:
    """A promoted use case whose monitor look breached a guardrail (manual policy): its rollback decision
    waits for a person, the use case awaiting approval."""
    from rollout import decisions, pilot_batches

    info = _promoted(name)
    rows = _monitor_rows(name, "m-1")
    for i, r in enumerate(rows):
        r["error"] = r["arm"] == "treatment" and i % 4 == 1
    pilot_batches.store_batch(info["step_id"], rows, "m-1", "monitor")
    look = decisions.monitor_look(name, info, rows, {"passed": True, "failures": [], "report": {}}, "m-1")
    assert (look["outcome"], look["awaiting"]) == ("NO-GO", "rollback_approval"), look
    return info, look["decision_id"]


def test_a_persons_rollback_while_another_carries_out_the_approved_alarm_moves_once(
    use_case,
    monkeypatch,  # noqa: ANN001
) -> None:
    """Review T, finding 7: Bob's `sparsepilot rollback` just after Alice approved the monitor's rollback
    took over her rollback at once (MLflow called twice, "retried" in the audit). Now, within the grace
    after her signature, Bob is told it is being carried out, and nothing is applied twice."""
    from rollout import approvals, registry

    name = use_case(rollback="manual")
    _, alarm = _alarm_waiting(name)
    inside, landed = _slow_mlflow(monkeypatch)
    out: dict[str, Any] = {}
    t = _in_thread(lambda: approvals.approve(alarm, _identity(ALICE), "roll it back"), out, "alice")
    assert inside.wait(120)
    with pytest.raises(
        registry.MoveInProgress, match=f"alice's rollback \\(decision {alarm}\\).*being carried"
    ):
        approvals.request_rollback(name, _identity(BOB), "users complain")
    landed.set()
    t.join(120)
    assert out["alice"].took_effect, out["alice"]
    state = _state(name)
    assert state["phase"] == "rolled_back"
    assert "alias.rollback.retried" not in state["audit"]
    assert state["audit"].count("alias.rollback.committed") == 1


def test_a_persons_rollback_while_the_monitors_alarm_waits_names_the_decision_to_approve(use_case) -> None:  # noqa: ANN001
    """Review T, finding 8: `sparsepilot rollback NAME` while the monitor's alarm waited for approval said
    there was no champion of ours to roll back, though one served and the alarm asked for exactly that."""
    from rollout import approvals

    name = use_case(rollback="manual")
    _, alarm = _alarm_waiting(name)
    with pytest.raises(approvals.ApprovalError) as refused:
        approvals.request_rollback(name, _identity(BOB), "users complain")
    assert f"the monitor's rollback decision {alarm} waits for approval" in str(refused.value)
    assert f"`sparsepilot approve {name} --decision {alarm} --reason" in str(refused.value)
    assert "no champion" not in str(refused.value)
    assert _state(name)["phase"] == "awaiting_approval"


@pytest.mark.parametrize("trust_db", ["postgres"], indirect=True)
def test_a_rollbacks_last_transaction_and_a_writer_of_the_use_case_do_not_deadlock(
    use_case, monkeypatch
) -> None:  # noqa: ANN001
    """apply_rollback's last transaction took the audit chain's lock (the pilot's status change, audited)
    before the use case's row (its phase), the reverse of every writer of a use case (use case -> pilot ->
    decision, the audit chain last: `pilots.locked`, `approvals.lock_decision`). A writer holding the use
    case's row and queueing for the chain then deadlocked against it on PostgreSQL: one of the two failed
    (the rollback's move committed, its use case never marked rolled back). Made to meet here: a person's
    rollback holds the chain's lock in its last transaction when the pipeline registers a challenger
    (`registry.set_alias`, whose first step locks the use case, then audits)."""
    from sqlalchemy import event, text
    from sqlalchemy.engine import Engine

    from rollout import approvals, pilots, registry
    from rollout.db.session import get_engine, session_scope
    from sparse_core import SparsePlan

    name = use_case(rollback="manual")
    _promoted(name)
    with session_scope() as s:
        model = pilots.load_current_spec(s, pilots.get_use_case(s, name))[0].model
    mv = registry.register_version(name, SparsePlan(tau=0.7), model, actor=registry.SYSTEM_PIPELINE)
    moved, rollback = threading.Event(), registry.rollback

    def rollback_then_last_transaction(*args: Any, **kwargs: Any) -> Any:
        out = rollback(*args, **kwargs)
        moved.set()
        return out

    monkeypatch.setattr(registry, "rollback", rollback_then_last_transaction)
    out: dict[str, Any] = {}

    def recalibrated() -> Any:
        return registry.set_alias(name, "challenger", model_version_id=mv.id, actor=registry.SYSTEM_PIPELINE,
                                  reason="recalibrated", idempotency_key="c2")  # fmt: skip

    def someone_waits() -> bool:
        with get_engine().connect() as c:
            return bool(c.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")))  # fmt: skip

    def meet(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        # the person's rollback, in its last transaction, holds the chain's lock: the pipeline comes in
        if moved.is_set() and "pg_advisory_xact_lock" in statement and "met" not in out:
            out["met"] = False
            out["pipeline"] = _in_thread(recalibrated, out, "challenger")
            deadline = time.monotonic() + 10
            while not someone_waits() and out["pipeline"].is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            out["met"] = someone_waits()  # the pipeline waits for a lock the rollback holds

    event.listen(Engine, "after_cursor_execute", meet)
    try:
        t = _in_thread(
            lambda: approvals.request_rollback(name, _identity(BOB), "users complain"), out, "person"
        )
        t.join(120)
        out["pipeline"].join(120)
    finally:
        event.remove(Engine, "after_cursor_execute", meet)
    assert out["met"] and isinstance(out["person"], dict), out["person"]
    assert out["person"]["effect"]["action"] == "rolled_back"
    assert not isinstance(out["challenger"], Exception), out["challenger"]
    state = _state(name)
    assert (state["phase"], state["pilot"]) == ("rolled_back", "rolled_back")
    assert registry.current_aliases(name)["challenger"] == str(out["challenger"].to_version)


def _approved_run_slow_to_wake(name: str, effect: str, monkeypatch) -> tuple[int, str, int]:  # noqa: ANN001
    """alice approved a decision of `name` (a promotion, or the monitor's alarm for "rollback"), resuming
    its approval run, whose process is slow to wake: the grace has passed and it has not taken it up.
    (Prefect's side stands in for itself: these tests have no Prefect server.) (decision, run, signature)."""
    from rollout import approval_runs, approvals, pilots, registry, unfinished
    from rollout.approvals import signing
    from rollout.db.session import session_scope
    from sparse_core import SparsePlan

    if effect != "rollback":
        with session_scope() as s:
            model = pilots.load_current_spec(s, pilots.get_use_case(s, name))[0].model
        plan = SparsePlan(estimator="pooled", tau=1.0, dense_layers=(0, 1), metadata={"baseline": "dense"})
        registry.register_version(name, plan, model, actor=registry.SYSTEM_PIPELINE, density=1.0)
        did = _pilot_with_decision(name, "GO", "approval")
    else:
        _, did = _alarm_waiting(name)
    run = "5b0c7d1e-0000-4000-8000-00000000a11c"
    assert "skip" not in approval_runs.register(did, run, lambda _run: False)
    monkeypatch.setattr(signing, "_flow_run_state_safe", lambda _run: (True, "Paused"))
    monkeypatch.setattr(signing, "_resume", lambda _run, _payload: None)  # resumed; its process is slow
    approved = approvals.approve(did, _identity(ALICE), "ship it")
    assert approved.resumed_flow_run_id == run, approved
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)  # the grace has passed
    return did, run, approved.approval_id


@pytest.mark.parametrize("effect", ["promotion", "rollback", "the cycle's promotion"])
def test_a_persons_finishing_claims_the_decision_from_its_run_which_then_declines_it(
    use_case, monkeypatch, effect: str
) -> None:  # noqa: ANN001
    """alice's approval resumed the decision's approval run, whose process is slow to wake: past the grace
    it has not taken the decision up. bob's `promote --decision` (or `rollback`) found no run at work and
    finished it; the run, taking it up just after his check, carried it out too (the alias moved twice, a
    double audit). Now bob's check claims the decision from the run under the decision's lock, which the
    run's take-up takes too: the run declines it, and it is carried out once. (Prefect's side, pausing and
    resuming the run, stands in for itself: this test has no Prefect server.) The cycle's finishing claims
    it alike (`unfinished.claim_to_finish`, by the one rule `run_at_work`): it asked Prefect, and a run
    waking after that carried the decision out beside it."""
    from rollout import approval_runs, approvals, unfinished

    name, bob = use_case(rollback="manual"), "sparsepilot-pipeline" if "cycle" in effect else "bob"
    did, run, signed_id = _approved_run_slow_to_wake(name, effect, monkeypatch)
    if effect == "promotion":
        signed = approvals.unfinished_promotion(did, by="bob")
        finish = lambda: approvals.apply_promotion(did, signed, reason="finish", finished_by="bob")  # noqa: E731
    elif "cycle" in effect:
        assert unfinished.claim_to_finish(name, bob).decision_id == did  # as `finish_unfinished` asks
        finish = lambda: approvals.apply_promotion(did, signed_id, reason="finish", finished_by=bob)  # noqa: E731
    else:
        ids = approvals.request_rollback(name, _identity(BOB), "finish", apply=False)
        assert (ids["decision_id"], ids["finishing"]) == (did, True), ids
        signed = ids["approval_id"]
        finish = lambda: approvals.apply_rollback(did, signed, reason="finish", finished_by="bob")  # noqa: E731
    declined = approval_runs.take_up(did, run)  # the run wakes just after bob's check
    assert declined is not None and f"decision {did} is being finished by {bob}" in declined
    finish()
    state = _state(name)
    assert state["phase"] == ("rolled_back" if effect == "rollback" else "promoted")
    assert "approval.taken_up" not in state["audit"] and state["audit"].count("approval.finish_claimed") == 1
    assert state["audit"].count("approval.finished") == 1


@pytest.mark.parametrize("first,second", [("bob", "cycle"), ("cycle", "bob"), ("bob", "carol")])
def test_a_finishers_claim_keeps_every_other_finisher_out_until_its_move_fails(
    use_case, monkeypatch, first: str, second: str
) -> None:  # noqa: ANN001
    """Review V8: a finisher's claim kept out only the decision's approval run: bob's `promote --decision`
    and the cycle's finishing (or two people) both claimed it and both carried it out (MLflow called
    twice, "retried", `approval.finished` twice). Now a recent claim counts as a take-up does: the cycle
    finds nothing to finish, a person is told who is finishing it since when. A claim whose move then
    fails keeps nobody out: the other finishes it, once."""
    from rollout import approvals, registry, unfinished

    name = use_case()
    did, _run, signed = _approved_run_slow_to_wake(name, "promotion", monkeypatch)
    pipeline = "sparsepilot-pipeline"

    def claim(who: str) -> Any:  # as `finish_unfinished` / `promote_cmd` ask
        if who == "cycle":
            return unfinished.claim_to_finish(name, pipeline)
        return approvals.unfinished_promotion(did, by=who)

    assert claim(first) is not None
    if second == "cycle":
        assert claim(second) is None
    else:
        with pytest.raises(registry.MoveInProgress) as busy:
            claim(second)
        said = str(busy.value)
        who = pipeline if first == "cycle" else first
        assert f"alice's promotion (decision {did}) is being finished by {who}, who claimed it at " in said
        assert f"`sparsepilot promote {name} --decision {did}` finishes it" in said

    def mlflow_down(*_a: Any, **_k: Any) -> None:
        raise ConnectionError("MLflow is down")

    with monkeypatch.context() as mp:
        mp.setattr(registry, "_apply_mlflow", mlflow_down)
        with pytest.raises(registry.RegistryError):
            approvals.apply_promotion(
                did, signed, reason="finish", finished_by=pipeline if first == "cycle" else first
            )
    assert claim(second) is not None  # the first's move failed after its claim: the second finishes it
    approvals.apply_promotion(
        did, signed, reason="finish", finished_by=pipeline if second == "cycle" else second
    )
    state = _state(name)
    assert state["phase"] == "promoted"
    assert (
        state["audit"].count("approval.finish_claimed") == 2
        and state["audit"].count("approval.finished") == 1
    )


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
# who calls the effect after bob's claim: carol, who claimed nothing; bob, whose move failed and whose
# claim carol then took over (his task's retry); the approval run (`finished_by` None)
@pytest.mark.parametrize("caller", ["carol", "bob", None])
def test_an_effect_is_carried_out_only_by_the_holder_of_its_claim(
    use_case, monkeypatch, caller: str | None
) -> None:  # noqa: ANN001
    """Review s50 A1: the effects trusted their caller. bob claimed alice's stalled promotion to finish it;
    carol, who claimed nothing, carried it out beside him (`apply_promotion(finished_by="carol")`), as did
    bob after his move failed and carol took his claim over (his task's retry), or the approval run once
    the claim was made. Now the effect asks, under the decision's lock, whether its caller holds the
    newest claim: the others are refused naming its holder, before anything moves."""
    from rollout import approvals, registry

    name = use_case()
    did, _run, signed = _approved_run_slow_to_wake(name, "promotion", monkeypatch)
    assert approvals.unfinished_promotion(did, by="bob") == signed
    holder = "bob"
    if caller == "bob":

        def mlflow_down(*_a: Any, **_k: Any) -> None:
            raise ConnectionError("MLflow is down")

        with monkeypatch.context() as mp:
            mp.setattr(registry, "_apply_mlflow", mlflow_down)
            with pytest.raises(registry.RegistryError):
                approvals.apply_promotion(did, signed, reason="finish", finished_by="bob")
        assert approvals.unfinished_promotion(did, by="carol") == signed  # bob's move failed: carol's now
        holder = "carol"
    before = _state(name)
    with pytest.raises(approvals.ClaimRefused) as refused:
        approvals.apply_promotion(did, signed, reason="finish", finished_by=caller)
    assert f"decision {did} is being finished by {holder}, who claimed it at " in str(refused.value)
    assert str(refused.value).endswith("gives way; nothing was moved")
    assert _state(name) == before  # nothing moved, nothing recorded
    approvals.apply_promotion(did, signed, reason="finish", finished_by=holder)
    state = _state(name)
    assert state["phase"] == "promoted" and state["audit"].count("approval.finished") == 1
    assert _commits_audited(name) == {f"baseline:{did}": 1, f"promote:{did}": 1}


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("effect", ["reject", "keep"])
def test_a_rejection_being_finished_is_not_finished_again_beside_its_claimant(
    use_case, monkeypatch, effect: str
) -> None:  # noqa: ANN001
    """Review s50 A2: `approve --decision N --reject` again, on a rejection whose signer's process died,
    finished it without a claim or a look at who else was: beside the cycle that had claimed it (both
    stopped the pilot, or kept the champion), or within the grace its signer is applying it in. Now it
    asks the rule of `promote --decision` and `rollback` (`unfinished.refuse_while_applied`) and claims
    it: refused naming the cycle, who claimed it since when; and the effect refuses a caller without the
    claim."""
    from rollout import approvals, registry, unfinished
    from rollout.approvals import signing

    name = use_case(rollback="manual")
    did = _alarm_waiting(name)[1] if effect == "keep" else _pilot_with_decision(name, "GO", "approval")

    class Killed(BaseException):
        """The signer's process dies before the effect."""

    def died(*_a: Any, **_k: Any) -> None:
        raise Killed

    approvals.approve(did, _identity(ALICE), "not now", reject=True)  # the first of an override
    with monkeypatch.context() as mp:
        mp.setattr(signing, "apply_decision", died)
        with pytest.raises(Killed):
            approvals.approve(did, _identity(BOB), "agreed", reject=True)
    with pytest.raises(
        registry.MoveInProgress, match=f"bob's rejection.*\\(decision {did}\\) was signed a moment"
    ):
        approvals.unfinished_rejection(did, by="carol")  # bob's process is applying it
    monkeypatch.setattr(unfinished, "APPLY_GRACE", unfinished.APPLY_GRACE * 0)  # ... it died
    pipeline = "sparsepilot-pipeline"
    u = unfinished.claim_to_finish(name, pipeline)
    assert (u.decision_id, u.action) == (did, effect)
    with pytest.raises(registry.MoveInProgress) as busy:
        approvals.unfinished_rejection(did, by="carol")
    assert f"(decision {did}) is being finished by {pipeline}, who claimed it at " in str(busy.value)
    assert f"`sparsepilot approve {name} --decision {did} --reject` finishes it" in str(busy.value)
    apply = approvals.apply_keep if effect == "keep" else approvals.apply_rejection
    with pytest.raises(approvals.ClaimRefused, match=f"being finished by {pipeline}"):
        apply(did, u.approval_id, reason="finish", finished_by="carol")
    assert apply(did, u.approval_id, reason="finish", finished_by=pipeline)["done"] is True
    state = _state(name)
    assert state["phase"] == ("promoted" if effect == "keep" else "stopped")
    assert (
        state["audit"].count("approval.finish_claimed") == 1
        and state["audit"].count("approval.finished") == 1
    )


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_a_claim_whose_process_has_exited_is_taken_over_at_once(use_case, monkeypatch) -> None:  # noqa: ANN001
    """Review s50 A3: does a finisher that crashed after its claim keep the others out for
    `STALLED_AFTER`? No (since e19b8bb; untested until now): the claim records its pid (the audit row
    its host), and on this host a claim whose process has exited is free at once, while a live one
    keeps the others out."""
    import os
    import subprocess

    from rollout import approvals, registry

    name = use_case()
    did, _run, signed = _approved_run_slow_to_wake(name, "promotion", monkeypatch)
    exited = subprocess.Popen(["true"])
    exited.wait()
    with monkeypatch.context() as mp:
        mp.setattr(os, "getpid", lambda: exited.pid)  # bob's claim, made by a process that has exited
        assert approvals.unfinished_promotion(did, by="bob") == signed
    assert approvals.unfinished_promotion(did, by="carol") == signed  # taken over at once
    with pytest.raises(registry.MoveInProgress, match="being finished by carol, who claimed it at "):
        approvals.unfinished_promotion(did, by="dave")  # carol's process (this one) is alive
    approvals.apply_promotion(did, signed, reason="finish", finished_by="carol")
    assert _state(name)["phase"] == "promoted"


@pytest.mark.parametrize("trust_db", ["sqlite"], indirect=True)
def test_promote_with_a_refused_reason_claims_nothing(use_case, trust_accounts, monkeypatch) -> None:  # noqa: ANN001
    """Review V2: `promote --decision` claimed the decision, then refused its reason (a space, a zero-width
    one): the audit log said bob was finishing it, and its approval run, waking, declined it for a finisher
    who did nothing. The reason is checked first now, as `rollback` does: nothing is claimed, the run
    carries the decision out."""
    from rollout import approval_runs
    from tests.flows.test_unfinished_effects import _cli_as

    name = use_case()
    did, run, _ = _approved_run_slow_to_wake(name, "promotion", monkeypatch)
    args = ("promote", name, "--decision", str(did), "--reason", "\u200b ")
    res = _cli_as("bob", *args, monkeypatch=monkeypatch, accounts=trust_accounts)
    assert res.exit_code == 2 and "a reason is required" in res.output, res.output
    assert "approval.finish_claimed" not in _state(name)["audit"]
    assert approval_runs.take_up(did, run) is None  # the run wakes and carries it out
