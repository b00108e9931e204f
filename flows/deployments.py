"""Deployments: one cron schedule per use case (the `use-case-cycle` flow with that use case's
parameters, cron and time zone from its spec) plus the unscheduled `approval` deployment whose runs
pause for a person. `sparsepilot serve` serves them here with `prefect.serve`; with a Prefect server
configured (PREFECT_API_URL) and `--work-pool`, they are deployed to that pool for its workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rollout import usecases
from rollout.settings import SettingsError

REPO_ROOT = Path(__file__).resolve().parents[1]
APPROVAL_DEPLOYMENT = "sparsepilot-approval"


def deployment_name(use_case: str) -> str:
    return f"sparsepilot-{use_case}"


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
    deps.append(approval_flow.to_deployment(name=APPROVAL_DEPLOYMENT, tags=["sparsepilot", "approval"]))
    return deps


def deploy_to_work_pool(names: list[str] | None, work_pool: str) -> list[str]:
    """Deploy from this source tree to a work pool (process workers run the flows)."""
    from prefect.schedules import Cron

    from flows.approval import approval_flow  # noqa: F401 - checks the entrypoint imports
    from flows.cycle import cycle_flow  # noqa: F401

    ids = []
    for s in scheduled_use_cases(names):
        remote = cycle_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/cycle.py:cycle_flow")
        ids.append(
            str(
                remote.deploy(
                    name=deployment_name(s["use_case"]),
                    work_pool_name=work_pool,
                    schedules=[Cron(s["cron"], timezone=s["timezone"])],
                    parameters={"use_case": s["use_case"]},
                    tags=["sparsepilot", s["use_case"]],
                    build=False,
                    push=False,
                    print_next_steps=False,
                )
            )
        )
    approval = approval_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/approval.py:approval_flow")
    ids.append(
        str(
            approval.deploy(
                name=APPROVAL_DEPLOYMENT,
                work_pool_name=work_pool,
                tags=["sparsepilot", "approval"],
                build=False,
                push=False,
                print_next_steps=False,
            )
        )
    )
    return ids


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
        ids = deploy_to_work_pool(names, work_pool)
        if console is not None:
            console.print(f"deployed {len(ids)} deployment(s) to work pool {work_pool!r}; start workers with "
                          f"`prefect worker start --pool {work_pool}`")  # fmt: skip
        return
    from prefect import serve

    serve(*build_deployments(names))
