"""Deployments: one cron schedule per use case (the `use-case-cycle` flow with that use case's
parameters, cron and time zone from its spec) plus the unscheduled `approval` deployment whose runs
pause for a person. `sparsepilot serve` serves them here with `prefect.serve`; with a Prefect server
configured (PREFECT_API_URL) and `--work-pool`, they are deployed to that pool for its workers (the
approval deployment on the pool's `approvals` queue); the stack's `deploy-flows` (deploy/stack_setup.py)
uses this same path. Either way the cycle deployments of use cases whose spec lost its schedule are
deleted first, or the server would keep scheduling them on the old cron."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout import usecases
from rollout.settings import SettingsError, get_settings, state_db_id

REPO_ROOT = Path(__file__).resolve().parents[1]
# the one approval deployment every state DB on a Prefect server shared before: whoever deployed last
# took the others' approval runs, which then ran against its own state DB (review s50 E3)
LEGACY_APPROVAL_DEPLOYMENT = "sparsepilot-approval"
APPROVAL_FLOW = "approval"  # flows.approval.approval_flow's name
APPROVAL_QUEUE = "approvals"  # the work pool's queue for approval runs (served by its own worker)
CYCLE_FLOW = "use-case-cycle"  # flows.cycle.cycle_flow's name


def deployment_name(use_case: str) -> str:
    return f"sparsepilot-{use_case}"


def approval_deployment_name() -> str:
    """The approval deployment of this process's state DB (`rollout.settings.state_db_id`): the one the
    deploy registers and the cycle's approval requests name, `sparsepilot-approval-<id>`."""
    return f"{LEGACY_APPROVAL_DEPLOYMENT}-{state_db_id(get_settings().database_url)}"


def _approval_tags() -> list[str]:
    return ["sparsepilot", "approval", f"state-db:{state_db_id(get_settings().database_url)}"]


def legacy_approval_note() -> list[str]:
    """Where the server still has the one approval deployment of every state DB that builds before the
    per-DB name registered: a line saying it is left alone (another state DB's older build may still
    request it) and how to delete it. Nothing requests it from this build."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(f"{APPROVAL_FLOW}/{LEGACY_APPROVAL_DEPLOYMENT}")
        except ObjectNotFound:
            return []
    return [
        f"{LEGACY_APPROVAL_DEPLOYMENT}: the approval deployment that every state DB on this server shared "
        f"before; this state DB's approval runs go to {approval_deployment_name()} now. Left alone; once "
        "no state DB on this server runs an older SparsePilot, delete it: "
        f"prefect deployment delete {APPROVAL_FLOW}/{LEGACY_APPROVAL_DEPLOYMENT}"
    ]


def scheduled_use_cases(names: list[str] | None = None) -> list[dict[str, Any]]:
    """(name, cron, timezone) for every use case with a schedule in its current spec."""
    return usecases.schedules(names)


def build_deployments(names: list[str] | None = None) -> list[Any]:
    """RunnerDeployments for `prefect.serve` (local code)."""
    from prefect.schedules import Cron

    from flows.approval import approval_flow
    from flows.cycle import cycle_flow

    deps = [
        cycle_flow.to_deployment(
            name=deployment_name(s["use_case"]),
            schedules=[Cron(s["cron"], timezone=s["timezone"])],
            parameters={"use_case": s["use_case"]},
            tags=["sparsepilot", s["use_case"]],
            description=f"SparsePilot cycle for {s['use_case']} ({s['cron']} {s['timezone']})",
        )
        for s in scheduled_use_cases(names)
    ]
    deps.append(approval_flow.to_deployment(name=approval_deployment_name(), tags=_approval_tags()))
    return deps


def stale_cycle_deployments(deployed: dict[str, str], unscheduled: dict[str, int]) -> dict[str, str]:
    """Cycle deployments on the server (deployment name -> its `use_case` parameter) whose use case's
    current spec has no schedule (`unscheduled`: use case -> spec version), each with why. A deployment
    for a name that is no use case here is left alone: it belongs to another state DB on the same
    server."""
    return {
        dep: f"no schedule in spec v{unscheduled[use_case]}"
        for dep, use_case in sorted(deployed.items())
        if use_case in unscheduled
    }


@dataclass(frozen=True)
class WorkPoolDeployment:
    """What `deploy_to_work_pool` did: `deployed` ('name -> pool[/queue]') and `removed` ('name: why', and the
    legacy approval deployment's note, `legacy_approval_note`)."""

    deployed: list[str]
    removed: list[str]


def _ensure_queue(client: Any, pool: str, queue: str) -> None:
    from prefect.exceptions import ObjectAlreadyExists

    try:
        client.create_work_queue(name=queue, work_pool_name=pool)
    except ObjectAlreadyExists:
        pass


def remove_unscheduled_cycles() -> list[str]:
    """Delete the cycle deployments of use cases that lost their schedule (with their scheduled runs:
    Prefect deletes those with the deployment), so no worker runs them on the old cron and no served
    deployment's runs wait, Late, for a runner that no longer serves it. Returns 'name: why, deleted'."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        on_server = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[CYCLE_FLOW])))
        by_name = {d.name: d for d in on_server}
        stale = stale_cycle_deployments(
            {d.name: str((d.parameters or {}).get("use_case")) for d in on_server}, usecases.unscheduled()
        )
        for name in stale:
            client.delete_deployment(by_name[name].id)
    return [f"{name}: {why}, deleted" for name, why in stale.items()]


def deploy_to_work_pool(
    names: list[str] | None,
    work_pool: str,
    *,
    gpu_pool: str | None = None,
    gpu_use_cases: frozenset[str] | set[str] = frozenset(),
) -> WorkPoolDeployment:
    """Deploy from this source tree to a work pool (process workers run the flows), the one path for both
    `sparsepilot serve --work-pool` and the stack's `deploy-flows`: each scheduled use case's cycle on the
    pool's default queue (on `gpu_pool` when named in `gpu_use_cases`); the approval deployment on the
    pool's `approvals` queue, because an approval run waits (in its process, up to days) for a person
    and must not hold a model worker's slot; and the cycle deployment of every use case whose current
    spec has no schedule any more deleted, or it would keep running on its old cron."""
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    from flows.approval import approval_flow  # noqa: F401 - checks the entrypoint imports
    from flows.cycle import cycle_flow  # noqa: F401

    common = {"build": False, "push": False, "print_next_steps": False}
    deployed = []
    for s in scheduled_use_cases(names):
        pool = gpu_pool if gpu_pool and s["use_case"] in gpu_use_cases else work_pool
        remote = cycle_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/cycle.py:cycle_flow")
        remote.deploy(
            name=deployment_name(s["use_case"]),
            work_pool_name=pool,
            schedules=[Cron(s["cron"], timezone=s["timezone"])],
            parameters={"use_case": s["use_case"]},
            tags=["sparsepilot", s["use_case"]],
            **common,
        )
        deployed.append(f"{deployment_name(s['use_case'])} -> {pool}")
    with get_client(sync_client=True) as client:
        _ensure_queue(client, work_pool, APPROVAL_QUEUE)
    approval = approval_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/approval.py:approval_flow")
    approval.deploy(
        name=approval_deployment_name(),
        work_pool_name=work_pool,
        work_queue_name=APPROVAL_QUEUE,
        tags=_approval_tags(),
        **common,
    )
    deployed.append(f"{approval_deployment_name()} -> {work_pool}/{APPROVAL_QUEUE}")
    return WorkPoolDeployment(deployed, remove_unscheduled_cycles() + legacy_approval_note())


def serve_schedules(
    names: list[str] | None = None, *, work_pool: str | None = None, console: Any = None
) -> None:
    if work_pool and not os.environ.get("PREFECT_API_URL"):  # refused before anything is printed
        raise SettingsError("--work-pool needs a Prefect server: set PREFECT_API_URL")
    deps_info = scheduled_use_cases(names)
    if console is not None:
        for s in deps_info:
            console.print(f"schedule {deployment_name(s['use_case'])}: {s['cron']} ({s['timezone']})")
    if work_pool:
        done = deploy_to_work_pool(names, work_pool)
        if console is not None:
            for line in done.removed:
                console.print(line)
            console.print(
                f"deployed {len(done.deployed)} deployment(s) to work pool {work_pool!r}: "
                f"{'; '.join(done.deployed)}; start workers with `prefect worker start --pool {work_pool}` "
                f"and, for approvals, `prefect worker start --pool {work_pool} --work-queue {APPROVAL_QUEUE}`"
            )
        return
    from prefect import serve

    removed = remove_unscheduled_cycles() + legacy_approval_note()  # a lost schedule's deployment
    if console is not None:
        for line in removed:
            console.print(line)
    serve(*build_deployments(names))
