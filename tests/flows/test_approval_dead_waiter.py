"""Review C2: the process that kept a decision's approval run paused (`run --serve`, `serve`) is killed
(`kill -9`, an OOM: `release_waiting` never runs). Prefect still says the run is Paused (for the pause's
7 days), and resuming it carried out nothing while the approver was told "promoted". Now a paused run
whose waiting process (this host) is gone counts as not waiting: the dashboard's approval applies the
decision directly, the CLI's waits in a run of its own, each says so, and the dead run is cancelled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.flows.test_approval_races import _outcome
from tests.flows.test_approvals import _pilot_with_decision


def _paused(did: int, env: dict[str, str], host: str = "") -> tuple[subprocess.Popen[str], str]:
    """An approval run paused for `did` in a process of its own (as `run --serve` keeps one), as on
    `host` if given (its audit rows name that host): the process and the run's id."""
    from rollout import approval_runs
    from rollout.approvals import flow_is_waiting

    code = f"from flows.approval import approval_flow; print(approval_flow({did}, poll_interval_s=1))"
    if host:
        code = f"import socket; socket.gethostname = lambda: {host!r}; {code}"
    waiter = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 120
    while not ((rid := approval_runs.run_id_of(did)) and flow_is_waiting(rid) and _input_saved(rid)):
        if waiter.poll() is not None or time.monotonic() > deadline:
            waiter.kill()
            pytest.fail("the approval run did not pause")
        time.sleep(0.2)
    return waiter, rid


def _input_saved(run_id: str) -> bool:
    """Prefect saves a paused run's input schema just after its Paused state; a waiter stopped or killed in
    between leaves a run nobody can resume ("Run input schema not found"), not the waiter these tests
    stand for (a clean-clone CI run met it once)."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.input.actions import read_flow_run_input

    with get_client(sync_client=True) as client:
        keyset = client.read_flow_run(uuid.UUID(run_id)).state.state_details.run_input_keyset
    return bool(keyset) and read_flow_run_input(keyset["schema"], flow_run_id=uuid.UUID(run_id)) is not None


def _paused_then_killed(did: int, env: dict[str, str]) -> str:
    """The same, then that process SIGKILLed."""
    from rollout.approvals import flow_is_waiting

    waiter, rid = _paused(did, env)
    waiter.kill()
    waiter.wait()
    assert flow_is_waiting(rid)  # Prefect alone cannot tell: the dead run still reads Paused
    return rid


@pytest.mark.parametrize("path", ["dashboard", pytest.param("cli", marks=pytest.mark.slow)])
def test_approving_when_the_paused_runs_process_is_dead_promotes_at_once(
    trust_env, flow_use_case, path: str
) -> None:  # noqa: ANN001
    from prefect.settings import PREFECT_API_URL

    from rollout import approvals
    from rollout.auth import Identity
    from tests.fixtures.trust import run_cli

    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    rid = _paused_then_killed(did, env)
    if path == "dashboard":
        result = approvals.approve(did, Identity("alice", "approver", "local-account"), "looks good")
        assert result.applied_directly and result.resumed_flow_run_id is None, result
        message = result.message
    else:
        cli = run_cli(
            "approve", name, "--decision", str(did), "--reason", "looks good", user="alice", env=env
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        message = cli.stdout
    assert f"approved decision {did}: pilot 1 of {name} promoted" in message, message
    assert f"flow run {rid} was paused, but its process" in message and "is gone" in message, message
    out = _outcome(name, did)  # promoted now, not 5 minutes later by whoever finishes unfinished effects
    assert out["promotions"] == 1 and out["phase"] == "promoted" and out["champion_is_challenger"], out
    assert not out["paused"], out  # the dead run is cancelled, not left "waiting" in Prefect


def test_a_resumed_run_nobody_takes_up_is_carried_out_by_the_signer_once(
    trust_env, flow_use_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """A waiter on another host cannot be seen to die: its run is resumed, and when it does not take the
    decision up in time, the signer carries it out; the run, should it wake, declines. A stopped waiter
    (SIGSTOP: alive, not answering) whose host name reads "approvals-worker-2" stands in for it."""
    from prefect.settings import PREFECT_API_URL

    from rollout import approvals
    from rollout.approvals import signing
    from rollout.auth import Identity

    monkeypatch.setattr(signing, "TAKE_UP_WAIT_S", 2.0)
    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    waiter, rid = _paused(did, env, host="approvals-worker-2")
    try:
        waiter.send_signal(signal.SIGSTOP)
        result = approvals.approve(did, Identity("alice", "approver", "local-account"), "looks good")
        assert result.applied_directly and result.resumed_flow_run_id is None, result
        assert (
            f"flow run {rid} was resumed, but did not take it up within 2 s on approvals-worker-2"
            in result.message
        ), result
        assert f"approved decision {did}: pilot 1 of {name} promoted" in result.message, result
        waiter.send_signal(signal.SIGCONT)
        out, _ = waiter.communicate(timeout=60)
    finally:
        waiter.kill()
    assert "carried out by its signer" in out, out  # it woke, and did not carry it out a second time
    out = _outcome(name, did)
    assert out["promotions"] == 1 and out["phase"] == "promoted" and out["champion_is_challenger"], out


def _registered_to_a_dead_process(did: int, run_id: str) -> None:
    """The decision's approval run registered by a process of this host that is gone (its pid reused by
    nothing: a child that exited), as `approval_runs.register` records it."""
    from rollout import audit
    from rollout.approvals.waiter import WAITING
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with session_scope() as s:
        d = s.get(GateDecision, did)
        d.flow_run_id = run_id
        audit.record(s, audit.SYSTEM_ACTOR, WAITING, on=d, details={"flow_run_id": run_id, "pid": dead.pid})


def _forgotten_by(did: int) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    with session_scope() as s:
        rows = s.execute(
            select(AuditEntry.actor, AuditEntry.details).where(
                AuditEntry.action == "approval.waiter_gone", AuditEntry.entity_id == str(did)
            )
        ).all()
    return [(actor, details["flow_run_id"]) for actor, details in rows]


def test_a_dead_waiter_is_forgotten_by_a_first_signature_and_by_a_new_run(trust_env, flow_use_case) -> None:  # noqa: ANN001
    """Review s47 V4: an override's first signature on a decision whose waiter died forgot the run but
    returned before it was cancelled, and told its signer nothing; a new approval run registering over a
    dead waiter's run (a restarted `run --serve`) took the decision over without a word. Each forgets
    it now in one place (`waiter.forget_dead_waiter`: audited, then cancelled), and the signer is told."""
    from rollout import approval_runs, approvals
    from rollout.auth import Identity
    from rollout.db.models import GateDecision
    from rollout.db.session import session_scope

    name = flow_use_case()
    did = _pilot_with_decision(name, "INCONCLUSIVE", "approval")  # promoting it is an override
    dead_run = "00000000-0000-4000-8000-000000000002"
    _registered_to_a_dead_process(did, dead_run)
    first = approvals.approve(did, Identity("alice", "approver", "local-account"), "override: ship it")
    assert first.needs_second_approver, first
    assert f"(flow run {dead_run} was paused, but its process" in first.message, first.message
    with session_scope() as s:
        assert s.get(GateDecision, did).flow_run_id is None
    assert _forgotten_by(did) == [("alice", dead_run)]

    other = _pilot_with_decision(name, "GO", "approval", key="b")
    _registered_to_a_dead_process(other, dead_run)
    new_run = "00000000-0000-4000-8000-000000000004"
    assert approval_runs.register(other, new_run, lambda run: True).get("skip") is None
    with session_scope() as s:
        assert s.get(GateDecision, other).flow_run_id == new_run
    assert _forgotten_by(other) == [("sparsepilot-pipeline", dead_run)]


def test_a_resume_that_fails_after_prefect_resumed_the_run_is_carried_out_once(
    trust_env, flow_use_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """Review s47 V3: when the resume call failed after Prefect had resumed the run (a read timeout), the
    signer applied the decision with no claim and the run took it up too: both carried it out, and the
    signer was told "no flow run was waiting". The signer claims it first now: exactly one of them does."""
    from prefect.settings import PREFECT_API_URL
    from sqlalchemy import select

    from rollout import approvals
    from rollout.approvals import signing
    from rollout.auth import Identity
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    real = signing._resume

    def resumed_then_timed_out(run_id: str, payload: object) -> None:
        real(run_id, payload)
        raise TimeoutError("read timeout")

    monkeypatch.setattr(signing, "_resume", resumed_then_timed_out)
    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    waiter, rid = _paused(did, env)
    try:
        result = approvals.approve(did, Identity("alice", "approver", "local-account"), "looks good")
        out, _ = waiter.communicate(timeout=120)
    finally:
        waiter.kill()
    with session_scope() as s:
        marks = s.scalars(
            select(AuditEntry.action).where(
                AuditEntry.action.in_(["approval.taken_up", "approval.carried_out_by_signer"]),
                AuditEntry.entity_id == str(did),
            )
        ).all()
        committed = s.scalars(
            select(AuditEntry.id).where(AuditEntry.action == "alias.promote.committed")
        ).all()
    assert len(marks) == 1 and len(committed) == 1, (marks, committed, result.message, out)
    if marks == ["approval.carried_out_by_signer"]:  # the signer won: the run woke and declined
        assert result.applied_directly and "carried out by its signer" in out, (result, out)
        assert f"flow run {rid} could not be resumed (TimeoutError: read timeout)" in result.message
    else:  # the run took it up first: the signer left it to the run
        assert not result.applied_directly and f"resumed flow run {rid}" in result.message, result
    assert _outcome(name, did)["phase"] == "promoted"


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_forgetting_a_dead_waiter_takes_the_decisions_locks_in_every_writers_order(
    db: str, request: pytest.FixtureRequest, trust_env, flow_use_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """Review s47 V2: `release_abandoned` (the CLI approve's first step on a dead waiter) wrote its audit
    row (the chain's lock) before the decision's row, the reverse of every writer that locks use case ->
    pilot -> decision and the chain last: against a dashboard approval of the same decision, PostgreSQL
    found a deadlock. The dashboard's approver is held between its locks and its audit row while the
    CLI's step starts: the CLI's now waits, then finds the run already forgotten."""
    import threading

    from rollout import approval_runs, approvals
    from rollout.approvals import signing
    from rollout.auth import Identity

    if db == "postgres":
        url = request.getfixturevalue("pg_migrated_url")
        monkeypatch.setenv("SPARSEPILOT_DATABASE_URL", url)
    name = flow_use_case()
    did = _pilot_with_decision(name, "GO", "approval")
    _registered_to_a_dead_process(did, "00000000-0000-4000-8000-000000000001")
    locked, go = threading.Event(), threading.Event()
    real = signing.lock_decision

    def held(session, decision_id):  # noqa: ANN001, ANN202
        d = real(session, decision_id)
        locked.set()
        go.wait(10)
        return d

    monkeypatch.setattr(signing, "lock_decision", held)
    said: dict[str, object] = {}

    def dashboard() -> None:
        try:
            said["dashboard"] = approvals.approve(
                did, Identity("alice", "approver", "local-account"), "ok"
            ).message
        except Exception as exc:  # noqa: BLE001
            said["dashboard"] = exc

    def cli() -> None:
        try:
            said["cli"] = approval_runs.release_abandoned(did)
        except Exception as exc:  # noqa: BLE001
            said["cli"] = exc

    first = threading.Thread(target=dashboard)
    first.start()
    assert locked.wait(60)
    second = threading.Thread(target=cli)
    second.start()
    time.sleep(1.0)  # the CLI's step waits for the decision's locks
    go.set()
    first.join(60)
    second.join(60)
    assert isinstance(said["dashboard"], str) and "promoted" in said["dashboard"], said
    assert said["cli"] is None, said  # forgotten already, by the approval
