"""The paused Prefect approval run a decision points at, asked whether it still waits and resumed with the
signature as its run input: the one module of rollout that calls Prefect (import-linter's
`rollout.approvals.resume -> prefect`, docs/architecture.md)."""

from __future__ import annotations

import uuid

from rollout.approvals.base import ApprovalPayload, FlowNotWaiting


def _flow_run_state(flow_run_id: str) -> tuple[bool, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(uuid.UUID(flow_run_id))
    state = fr.state
    return bool(state and state.is_paused()), (state.name if state else "unknown")


def flow_is_waiting(flow_run_id: str | None) -> bool:
    if not flow_run_id:
        return False
    try:
        return _flow_run_state(flow_run_id)[0]
    except Exception:  # noqa: BLE001 - an unknown run is simply not waiting
        return False


def _flow_run_state_safe(flow_run_id: str) -> tuple[bool, str]:
    try:
        return _flow_run_state(flow_run_id)
    except Exception as exc:  # noqa: BLE001
        return False, f"unreadable ({type(exc).__name__}: {exc})"


def _resume(flow_run_id: str, payload: ApprovalPayload) -> None:
    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(uuid.UUID(flow_run_id), run_input=payload.model_dump())
    except (NotPausedError, FlowPauseTimeout) as exc:
        raise FlowNotWaiting(f"flow run {flow_run_id} can no longer be resumed: {exc}") from None


def cancel_abandoned(flow_run_id: str, why: str) -> None:
    """Mark a paused run nobody continues (its waiting process is gone) Cancelled, so Prefect stops
    showing it as waiting; best effort: the decision no longer points at it either way."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(
                uuid.UUID(flow_run_id),
                Cancelled(message=f"nobody continues this approval run: {why}"),
                force=True,
            )
    except Exception:  # noqa: BLE001, S110 - best effort; the state DB already forgot the run
        pass
