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
    while not ((rid := approval_runs.run_id_of(did)) and flow_is_waiting(rid)):
        if waiter.poll() is not None or time.monotonic() > deadline:
            waiter.kill()
            pytest.fail("the approval run did not pause")
        time.sleep(0.2)
    return waiter, rid


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
