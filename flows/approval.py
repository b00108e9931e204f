"""The approval flow: a flow run that records its id on the pending decision, pauses with
`pause_flow_run(wait_for_input=ApprovalInput)`, and when a person approves (CLI or dashboard, through
`rollout.approvals.approve`, which calls `resume_flow_run`) promotes, rejects or rolls back, or (a GO
before the plan's last step whose ramp a person continued) reports the pilot's next step: that effect is
carried out with the signature (it moves no alias), so the resumed run only ends.

Design (so the main job can finish while decisions wait): the gate only *records* a GO decision as awaiting
approval. The paused approval run is a separate flow run, started in a background thread of whichever
process stays alive to wait — `sparsepilot run --serve` (for as long as the dashboard is served) and
`sparsepilot serve`. When that process exits, `release_waiting` cancels its paused runs and clears the
decision's flow_run_id, so the record never claims that someone waits. `sparsepilot approve` starts a
fresh approval run when none is waiting and resumes it: an approval always resumes a paused flow run.
A process killed before it could release its run (`kill -9`, an OOM) leaves it "Paused" in Prefect:
`rollout.approvals.waiter` tells (this host) that nobody waits in it, and a resumed run takes its decision
up (`take_up`) before acting, so the signer can carry out one that no run took up, never both.

One approval run per decision: a run registers itself on the decision under a write lock and refuses
when another live run is registered; approvers acting at once are serialised in
rollout.approvals.approve (one signs, the other is told who did). A CLI whose own run was resumed by
another approver waits for that run to finish its effect instead of cancelling it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from prefect import get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from flows.common import flow_run_id, flow_task, sparsepilot_flow
from rollout import approval_runs
from rollout.approvals import ApprovalPayload
from sparse_core.errors import SparsePilotError

DEFAULT_TIMEOUT_S = 7 * 24 * 3600
_WAITERS: dict[int, tuple[threading.Thread, dict[str, Any]]] = {}
_OWN_RUNS: dict[str, str] = {}  # waiter thread name -> the flow run id it runs
_LOCK = threading.Lock()


class ApprovalInput(RunInput, ApprovalPayload):
    """What the person's decision brings to the paused run: rollout.approvals.ApprovalPayload's fields,
    as Prefect's run input."""


class ApprovalWaitError(SparsePilotError, RuntimeError):
    pass


@flow_task("approval-register-run")
def register_run(decision_id: int, run_id: str) -> dict[str, Any]:
    # Lost a race (another approver signed, or another live run is registered): this run ends without
    # pausing, and the caller signs through the other run or is told who signed.
    return approval_runs.register(decision_id, run_id, _run_is_live)


_STARTING_GRACE_S = 120  # a registered run that has not paused yet is starting, not abandoned


def _run_is_live(flow_run_id: str) -> bool:
    """Paused, or pending/running for less than a grace period (a run killed while starting stays
    "Running" in Prefect forever; it must not block the decision)."""
    import datetime as dt

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 - an unknown run is not live
        return False
    if state is None or state.is_final():
        return False
    if state.is_paused():
        return True
    age = (dt.datetime.now(dt.UTC) - state.timestamp).total_seconds()
    return age < _STARTING_GRACE_S


@flow_task("approval-take-up")
def take_up(decision_id: int, run_id: str) -> str | None:
    return approval_runs.take_up(decision_id, run_id)


@flow_task("approval-clear-run")
def clear_run(decision_id: int, run_id: str) -> None:
    approval_runs.clear(decision_id, run_id)


@sparsepilot_flow("approval")
def approval_flow(
    decision_id: int, timeout_s: int = DEFAULT_TIMEOUT_S, poll_interval_s: int = 2
) -> dict[str, Any]:
    """Wait for a person, then carry out their decision (promotion flow, rejection, rollback, or the
    continued ramp's report)."""
    from flows.promote import continue_flow, keep_flow, promote_flow, reject_flow, rollback_flow

    logger = get_run_logger()
    run_id = flow_run_id()
    assert run_id is not None
    _OWN_RUNS[threading.current_thread().name] = run_id
    info = register_run(decision_id, run_id)
    if "skip" in info:
        logger.info("%s; this run ends without waiting", info["skip"])
        return {"action": "none", "decision_id": decision_id, "reason": info["skip"]}
    logger.info("decision %s (%s) waits for approval in flow run %s", decision_id, info["outcome"], run_id)
    try:
        answer = pause_flow_run(
            wait_for_input=ApprovalInput,
            timeout=timeout_s,
            poll_interval=poll_interval_s,
            key=f"approval-{decision_id}",
        )
    except Exception:
        clear_run(decision_id, run_id)
        raise
    logger.info(
        "decision %s: %s by %s (%s)",
        decision_id,
        "ramp continued" if answer.continue_ramp else "approved" if answer.approve else "rejected",
        answer.actor,
        answer.reason,
    )
    if answer.decision_id != decision_id:
        raise ApprovalWaitError(
            f"run input names decision {answer.decision_id}, this run waits for {decision_id}"
        )
    declined = take_up(decision_id, run_id)  # the signer waits for this, then carries it out itself
    if declined:
        logger.info("%s; this run ends", declined)
        return {"action": "none", "decision_id": decision_id, "reason": declined}
    kw = {
        "decision_id": decision_id,
        "approval_id": answer.approval_id,
        "reason": answer.reason,
        "actor": answer.actor,
    }
    if answer.continue_ramp:
        return continue_flow(**kw)
    if info["awaiting"] == "rollback_approval":
        if answer.approve:
            return rollback_flow(**kw)
        return keep_flow(**kw)
    if answer.approve:
        return promote_flow(**kw)
    return reject_flow(**kw)


# --- running approval flows in the background ------------------------------------------------------


def _run_in_thread(decision_id: int, timeout_s: int, poll_interval_s: int, box: dict[str, Any]) -> None:
    try:
        box["result"] = approval_flow(decision_id, timeout_s=timeout_s, poll_interval_s=poll_interval_s)
    except BaseException as exc:  # noqa: BLE001 - reported to whoever joins the thread
        box["error"] = exc


def start_waiting(
    decision_id: int, *, timeout_s: int = DEFAULT_TIMEOUT_S, poll_interval_s: int = 2, wait_s: float = 120
) -> str:
    """Start the approval flow for this decision in a background thread of this process and return its
    flow run id once the run is paused (so `resume_flow_run` can reach it)."""
    from rollout.approvals import flow_is_waiting

    with _LOCK:
        existing = _WAITERS.get(decision_id)
        if existing and existing[0].is_alive():
            rid = approval_runs.run_id_of(decision_id)
            if rid:
                return rid
        box: dict[str, Any] = {}
        t = threading.Thread(
            target=_run_in_thread,
            args=(decision_id, timeout_s, poll_interval_s, box),
            name=f"approval-{decision_id}",
            daemon=True,
        )
        _WAITERS[decision_id] = (t, box)
        t.start()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if "error" in box:
            raise ApprovalWaitError(
                f"approval flow for decision {decision_id} failed: {box['error']}"
            ) from box["error"]
        if "result" in box:  # ended without pausing: another approver's run or signature came first
            raise ApprovalWaitError(box["result"].get("reason") or "the approval run ended without waiting")
        rid = approval_runs.run_id_of(decision_id)
        # our own run, paused (another process's run may be the one registered on the decision)
        if rid and rid == _OWN_RUNS.get(t.name) and flow_is_waiting(rid):
            box["flow_run_id"] = rid
            return rid
        time.sleep(0.3)
    raise ApprovalWaitError(f"approval flow for decision {decision_id} did not pause within {wait_s:.0f} s")


def join_waiting(decision_id: int, timeout_s: float = 600) -> dict[str, Any] | None:
    """Wait for this process's approval run of the decision to finish; its result (or raise its error)."""
    with _LOCK:
        entry = _WAITERS.get(decision_id)
    if entry is None:
        return None
    t, box = entry
    t.join(timeout_s)
    if t.is_alive():
        raise ApprovalWaitError(
            f"approval flow for decision {decision_id} still running after {timeout_s:.0f} s"
        )
    with _LOCK:
        _WAITERS.pop(decision_id, None)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def waiting_here() -> list[int]:
    with _LOCK:
        return [d for d, (t, _) in _WAITERS.items() if t.is_alive()]


def release_waiting() -> list[int]:
    """Cancel this process's paused approval runs and clear their decisions' flow_run_id: called when
    the waiting process is about to exit, so no decision points at a run nobody will continue."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    released = []
    with _LOCK:
        entries = list(_WAITERS.items())
    from rollout.approvals import flow_is_waiting

    for decision_id, (t, box) in entries:
        if not t.is_alive():
            continue
        rid = box.get("flow_run_id") or approval_runs.run_id_of(decision_id)
        if not rid or not flow_is_waiting(rid):  # resumed: it is carrying out a decision, leave it be
            continue
        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(
                    uuid.UUID(rid),
                    Cancelled(
                        message="the waiting process exited; `sparsepilot approve` starts a new approval run"
                    ),
                    force=True,
                )
        except Exception:  # noqa: BLE001, S110 - best effort at exit; the DB is cleared below either way
            pass
        clear_run.fn(decision_id, rid)
        released.append(decision_id)
    return released


def approve_decision(
    decision_id: int,
    identity: Any,
    reason: str | None,
    *,
    reject: bool = False,
    continue_ramp: bool = False,
) -> dict[str, Any]:
    """The CLI's approval: make sure a paused approval run waits for the decision (start one here if
    not), resume it through rollout.approvals, and wait for what it does (promotion, rejection, the
    continued ramp's report)."""
    from rollout import approvals
    from rollout.auth import require_approver

    what = "continue the ramp on" if continue_ramp else "reject" if reject else "approve"
    require_approver(identity, f"{what} decision {decision_id}")
    approvals.checked_reason(reason)  # fail before starting anything
    subject = getattr(identity, "subject", "")
    if continue_ramp:
        approval_runs.check_continuable(decision_id)  # refused before any approval run starts
    elif reject:
        approval_runs.check_rejectable(decision_id)  # a decision that asked nobody is not rejected
    else:
        approval_runs.check_promotable(decision_id)  # not while a rollback waits, nor an uncalibrated plan
    # a paused run whose waiting process died (this host) reads "Paused" for days: resuming it would carry
    # out nothing, so it is forgotten and a run of this process waits instead
    abandoned = approval_runs.release_abandoned(decision_id)
    takes_effect = continue_ramp or approval_runs.will_take_effect(
        decision_id, identity.name, reject, subject=subject
    )
    if not takes_effect:
        # The first signature of an override: recorded, nothing to resume yet.
        return approvals.approve(decision_id, identity, reason, reject=reject).to_dict()
    started_here = False
    rid = approval_runs.run_id_of(decision_id)
    if not approvals.flow_is_waiting(rid):
        approval_runs.check_open(decision_id)
        if rid and not _run_is_live(rid):  # a run was recorded but nobody waits on it any more
            clear_run.fn(decision_id, rid)
        try:
            start_waiting(decision_id)
            started_here = True
        except ApprovalWaitError:
            # Another approver's run registered first: sign through it once it pauses (or be told who
            # already signed); never a second run.
            _wait_for_other_run(decision_id)
    try:
        result = approvals.approve(
            decision_id, identity, reason, reject=reject, continue_ramp=continue_ramp, apply_if_no_flow=False
        )
    except BaseException:
        if started_here:
            _settle_own_run(decision_id)
        raise
    out = result.to_dict()
    if result.took_effect and result.resumed_flow_run_id and started_here:
        out["effect"] = join_waiting(decision_id)
    if abandoned:
        out["message"] += f" (flow run {abandoned[0]} was paused, but {abandoned[1]}; not resumed)"
    return out


def _wait_for_other_run(decision_id: int, wait_s: float = 150) -> None:
    from rollout.approvals import flow_is_waiting

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        resolved, rid = approval_runs.state(decision_id)
        if resolved or flow_is_waiting(rid):
            return  # approvals.approve now resumes that run, or says who already signed
        time.sleep(0.3)
    raise ApprovalWaitError(
        f"decision {decision_id}: another approval run is registered but did not pause within {wait_s:.0f} s"
    )


def _settle_own_run(decision_id: int) -> None:
    """This process's approval run after our signature was refused: still paused -> nobody resumed it,
    cancel it; resumed by another approver -> it is carrying out their decision here, so wait for it
    (never cancel a run mid-promotion)."""
    from rollout.approvals import flow_is_waiting

    with _LOCK:
        entry = _WAITERS.get(decision_id)
    rid = entry[1].get("flow_run_id") if entry else None
    if rid and entry[0].is_alive() and approval_runs.is_resolved(decision_id):
        # another approver's signature resolved the decision and resumes this run right after its commit:
        # seen still paused in that moment, it was cancelled, and their approval took no effect (a CI
        # run of three concurrent CLI approvals: approved, nothing promoted). Give their resume a while.
        deadline = time.monotonic() + 60
        while flow_is_waiting(rid) and time.monotonic() < deadline:
            time.sleep(0.25)
    if rid and not flow_is_waiting(rid) and entry[0].is_alive():
        try:
            join_waiting(decision_id)
        except Exception:  # noqa: BLE001, S110 - their run's outcome is theirs to report; ours is the refusal
            pass
        return
    release_waiting()
