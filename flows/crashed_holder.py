"""What a dead lease holder left running in Prefect, marked Crashed by the run that takes its use case over.

A flow run killed mid-work (its process SIGKILLed, OOM, its worker or `sparsepilot serve` gone) ends only
where something outside it notices: `serve`'s runner marks the run it started Crashed, the stack's
heartbeat detector (deploy/stack_setup.py) the runs whose heartbeats stop. Neither reached the subflows
the run was inside (a cycle's `pilot`, `calibrate`): under `serve` they stayed "Running" in the Prefect UI
forever, while the state DB knew better (review s50 E5). The one place that knows for certain, under
`serve` and work pools alike, on any Prefect server and without heartbeats configured, is the next run of
the use case when it takes over the lease of a holder known dead (`rollout.leases.TakenOver.dead`: its
process on this host is gone, or Prefect ended its flow run): it marks that flow run, and the subflows
that ran in its process, Crashed where Prefect still shows them unfinished, naming the take-over. A holder
whose lease merely lapsed (another host's, maybe stalled, not dead) is left alone, and so are runs of a
deployment started from the dead run (an approval run waits in its own process)."""

from __future__ import annotations

import logging
from typing import Any

from rollout.leases import TakenOver
from rollout.redact import redact

log = logging.getLogger(__name__)


def crashed_message(taken: TakenOver, by: str) -> str:
    """The state message of a run marked Crashed: who took the use case over, from whom, and why."""
    return (
        f"{taken.use_case}: this run stopped without ending; {by} took the use case over from "
        f"{taken.work}: {taken.why}"
    )


def left_running(client: Any, flow_run_id: str) -> list[Any]:
    """The flow run and every subflow run that ran in its process (no deployment of its own), at any
    depth, that Prefect does not have in a final state."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    try:
        top = client.read_flow_run(flow_run_id)
    except Exception:  # noqa: BLE001 - an unknown run (a temporary server's, gone with its command)
        return []
    found, level = [top], [top]
    while level:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[r.id for r in level])
            )
        )
        level = [c for c in children if c.deployment_id is None]
        found += level
    return [r for r in found if r.state is None or not r.state.is_final()]


def crash_left_running(taken: TakenOver, by: str) -> list[str]:
    """Mark Crashed what Prefect still shows unfinished of a dead holder's flow run (`left_running`), each
    with `crashed_message`; returns their names. Never fails the run that took over: a Prefect that cannot
    be asked leaves them as they were, with a warning."""
    if not taken.dead or not taken.flow_run_id:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    message = crashed_message(taken, by)
    marked = []
    try:
        with get_client(sync_client=True) as client:
            for run in left_running(client, taken.flow_run_id):
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked.append(run.name)
    except Exception as exc:  # noqa: BLE001 - the take-over goes on; the runs stay as Prefect shows them
        log.warning(
            "%s: could not mark the flow runs its dead holder left running Crashed: %s",
            taken.use_case,
            redact(exc),
        )
    if marked:
        _run_logger().warning(
            "%s: marked Crashed the flow runs its dead holder left running: %s",
            taken.use_case,
            ", ".join(marked),
        )
    return marked


def _run_logger() -> Any:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log
