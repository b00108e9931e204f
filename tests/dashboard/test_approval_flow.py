"""Approvals from the dashboard resume a real paused Prefect flow (prefect_test_harness), write the
approval and audit rows, and need a second approver when they go against the gate's recommendation."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run as runtime_flow_run
from sqlalchemy import select

from flows.approval import ApprovalInput
from rollout import approvals
from rollout.db.models import Approval, AuditEntry, GateDecision
from rollout.db.session import session_scope
from tests.dashboard.apptest_helpers import new_app, open_page, sign_in, texts
from tests.fixtures.dashboard import later_look_awaiting_approval


@flow(name="dashboard-test-approval", persist_result=False)
def wait_for_approval(decision_id: int, db_url: str) -> dict[str, Any]:
    """The smallest real approval flow: record which run waits, pause for input, return it."""
    with session_scope(db_url) as s:
        s.get(GateDecision, decision_id).flow_run_id = str(runtime_flow_run.id)
    got = pause_flow_run(wait_for_input=ApprovalInput, timeout=180, poll_interval=1)
    return got.model_dump(exclude={"metadata"})


@pytest.fixture
def prefect_server(prefect_harness: str) -> None:
    """The session's Prefect test server (tests/fixtures/flows.py: the flow tests start it in every
    worker anyway); a server of this module's own cost a second start (~10 s wall on the 2-core host)."""


class PausedFlow:
    def __init__(self, decision_id: int, db_url: str) -> None:
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(
            target=lambda: self.result.update(out=wait_for_approval(decision_id, db_url)), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 90
        self.flow_run_id: str | None = None
        while time.monotonic() < deadline:
            with session_scope(db_url) as s:
                self.flow_run_id = s.get(GateDecision, decision_id).flow_run_id
            if approvals.flow_is_waiting(self.flow_run_id):
                return
            time.sleep(0.5)
        raise AssertionError(f"the flow for decision {decision_id} never paused")

    def output(self) -> dict[str, Any]:
        self.thread.join(timeout=90)
        assert not self.thread.is_alive(), "the flow did not finish after being resumed"
        return self.result["out"]


def _approve_in_ui(at: Any, decision_id: int, reason: str) -> None:
    open_page(at, "approvals")
    at.text_area(key=f"reason_{decision_id}").input(reason)
    at.button(key=f"approve_{decision_id}").click().run()
    assert not at.exception, [e.value for e in at.exception]


def test_approval_resumes_the_paused_flow(
    prefect_server: None, seeded: dict[str, Any], dash_env: Any
) -> None:
    decision_id = seeded["contract-summarisation:decision"]
    paused = PausedFlow(decision_id, dash_env.database_url)
    at = sign_in(new_app(), "alice")
    _approve_in_ui(at, decision_id, "quality interval is inside the margin")
    assert f"Done: approved decision {decision_id}" in at.success[0].value
    assert paused.flow_run_id in at.success[0].value
    out = paused.output()
    assert out["approve"] is True and out["actor"] == "alice" and out["decision_id"] == decision_id
    assert out["reason"] == "quality interval is inside the margin"
    with session_scope() as s:
        rows = s.scalars(select(Approval).where(Approval.decision_id == decision_id)).all()
        assert [(a.actor, a.role, a.action, a.against_recommendation) for a in rows] == [
            ("alice", "approver", "approve", False)
        ]
        assert s.get(GateDecision, decision_id).resolution == "approved"
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "approval.approve")).one()
        assert entry.actor == "alice" and entry.entity_id == str(decision_id)
        assert entry.details["reason"] == "quality interval is inside the margin"
    assert "Nothing is waiting for a decision." in texts(at)

    # a decision whose recorded flow run is finished cannot be approved: clear error, nothing written
    with session_scope() as s:
        old = s.get(GateDecision, decision_id)
        stale = GateDecision(
            idempotency_key="stale",
            use_case_id=old.use_case_id,
            pilot_id=old.pilot_id,
            pilot_step_id=old.pilot_step_id,
            outcome="GO",
            awaiting="approval",
            evidence=old.evidence,
            explanation="a later look",
            data_fingerprint="0" * 64,
            flow_run_id=paused.flow_run_id,
        )
        s.add(stale)
        s.flush()
        stale_id = stale.id
    _approve_in_ui(at, stale_id, "approve again")
    assert any("The flow is no longer waiting" in e.value for e in at.error)
    with session_scope() as s:
        assert s.scalars(select(Approval).where(Approval.decision_id == stale_id)).all() == []
        assert s.get(GateDecision, stale_id).resolution is None


def test_override_needs_a_second_approver(
    prefect_server: None, seeded: dict[str, Any], dash_env: Any
) -> None:
    with session_scope() as s:  # a later look, EXTEND, waiting for a person: approving overrides the gate
        decision_id = later_look_awaiting_approval(s, seeded["document-qa:decision"])
    paused = PausedFlow(decision_id, dash_env.database_url)
    at = sign_in(new_app(), "alice")
    open_page(at, "approvals")
    assert "needs a second approver" in texts(at)
    _approve_in_ui(at, decision_id, "business needs it this quarter")
    assert "Signature recorded, not yet in effect" in at.warning[0].value
    assert approvals.flow_is_waiting(paused.flow_run_id)  # one signature resumes nothing
    _approve_in_ui(at, decision_id, "signing twice")
    assert any("a second, different approver must confirm it" in e.value for e in at.error)

    at = sign_in(new_app(), "carol")
    open_page(at, "approvals")
    assert "alice signed an override (approve)" in texts(at)
    _approve_in_ui(at, decision_id, "agreed, risk accepted")
    assert f"Done: approved decision {decision_id}" in at.success[0].value
    out = paused.output()
    assert out["actor"] == "carol" and out["approve"] is True
    with session_scope() as s:
        rows = s.scalars(select(Approval).where(Approval.decision_id == decision_id)).all()
        assert [(a.actor, a.against_recommendation) for a in rows] == [("alice", True), ("carol", True)]
        actions = s.scalars(select(AuditEntry.action).where(AuditEntry.entity_id == str(decision_id))).all()
        assert "approval.approve.first_signature" in actions and "approval.approve" in actions
        assert s.get(GateDecision, decision_id).resolution == "approved"
