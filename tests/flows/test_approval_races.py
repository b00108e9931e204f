"""Approvals are atomic (issue 15, item 4): N approvers acting on one GO at once, through the dashboard's
path (rollout.approvals.approve, threads) and the CLI (`sparsepilot approve`, processes), on SQLite and
PostgreSQL: exactly one approval row, one promotion, no paused approval run left behind, and every loser
told who signed (exit 2 on the CLI). Also: an intermediate step's GO promotes only with two approvers."""

from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import func, select

from tests.flows.test_approvals import _pilot_with_decision

N_APPROVERS = 3


def _outcome(name: str, did: int) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    from rollout import registry
    from rollout.db.models import AliasMove, Approval, GateDecision, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        approvals = s.scalars(select(Approval).where(Approval.decision_id == did)).all()
        promotions = s.scalar(
            select(func.count()).select_from(AliasMove).where(AliasMove.idempotency_key == f"promote:{did}")
        )
        phase = s.scalar(select(UseCase.phase).where(UseCase.name == name))
        resolution = s.get(GateDecision, did).resolution
    paused_filter = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    with get_client(sync_client=True) as client:
        paused = [r for r in client.read_flow_runs(flow_run_filter=paused_filter)
                  if (r.parameters or {}).get("decision_id") == did]  # fmt: skip
    aliases = registry.current_aliases(name)
    return {
        "approvals": [a.actor for a in approvals],
        "promotions": promotions,
        "phase": phase,
        "resolution": resolution,
        "paused": paused,
        "champion_is_challenger": aliases.get("champion") == aliases.get("challenger"),
    }


def test_concurrent_dashboard_approvals_sign_once(trust_db: str, flow_use_case) -> None:
    from rollout import approvals
    from rollout.auth import Identity

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    barrier = threading.Barrier(N_APPROVERS)
    results: dict[str, object] = {}

    def sign(who: str) -> None:
        barrier.wait()
        try:
            results[who] = approvals.approve(did, Identity(who, "approver", "local-account"), f"{who} agrees")
        except approvals.ApprovalError as exc:
            results[who] = exc

    threads = [threading.Thread(target=sign, args=(w,)) for w in ("alice", "bob", "carol")]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    winners = [w for w, r in results.items() if not isinstance(r, Exception)]
    assert len(winners) == 1, results
    for w, r in results.items():
        if w != winners[0]:
            assert f"already approved by {winners[0]}" in str(r)
    out = _outcome(name, did)
    assert out["approvals"] == winners and out["promotions"] == 1 and out["phase"] == "promoted"
    assert out["champion_is_challenger"] and not out["paused"]


@pytest.mark.slow
def test_concurrent_cli_approvals_sign_once_and_leave_no_paused_run(trust_db: str, flow_use_case) -> None:
    from prefect.settings import PREFECT_API_URL

    from tests.fixtures.trust import start_cli

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    procs = {
        who: start_cli(
            "approve", name, "--decision", str(did), "--reason", f"{who} agrees", user=who, env=env
        )
        for who in ("alice", "bob", "carol")
    }
    done = {who: (p.wait(timeout=400), p.stdout.read(), p.stderr.read()) for who, p in procs.items()}
    winners = [w for w, (rc, _, _) in done.items() if rc == 0]
    assert len(winners) == 1, done
    for w, (rc, _out, err) in done.items():
        if w != winners[0]:
            assert rc == 2, done
            assert f"already approved by {winners[0]}" in err and "Traceback" not in err, done
    out = _outcome(name, did)
    assert out["approvals"] == winners and out["promotions"] == 1, out
    assert out["phase"] == "promoted" and out["champion_is_challenger"] and not out["paused"], out


def test_rejecting_a_final_go_says_what_it_does(trust_env, flow_use_case) -> None:
    """Rejecting the last step's GO goes against the gate too, but skips no ramp step: the message used to
    say "promoting now skips the remaining ramp steps"."""
    from rollout import approvals
    from rollout.auth import Identity

    did = _pilot_with_decision(flow_use_case(), "GO", "approval")
    first = approvals.approve(did, Identity("alice", "approver", "local-account"), "not yet", reject=True)
    assert first.needs_second_approver and "against the gate's recommendation (GO)" in first.message
    assert "ramp" not in first.message


def test_an_intermediate_go_promotes_only_with_two_approvers(trust_env, flow_use_case) -> None:
    from rollout import approvals, pilots
    from rollout.auth import Identity
    from rollout.db.models import Pilot, PilotStep
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "none")  # shadow step's GO: the ramp steps have not run
    first = approvals.approve(did, Identity("alice", "approver", "local-account"), "ship it early")
    assert first.needs_second_approver and not first.took_effect
    assert "promoting now skips the remaining ramp steps" in first.message
    with session_scope() as s:
        assert s.scalar(select(Pilot.status)) == "running"
    second = approvals.approve(did, Identity("bob", "approver", "local-account"), "agreed, skip the ramp")
    assert second.took_effect and second.against_recommendation
    with session_scope() as s:
        uc = pilots.get_use_case(s, name)
        assert uc.phase == "promoted"
        assert [st.status for st in s.scalars(select(PilotStep).order_by(PilotStep.index))] == ["skipped"]
