"""One-shot setup of the Prefect side of the stack (docker-compose's `deploy-flows` service; the native
stack test runs this same file). Safe to run again: every step updates in place.

1. the work pools (process type): SPARSEPILOT_WORK_POOL and SPARSEPILOT_GPU_WORK_POOL;
2. the crashed-run detector: a Prefect automation that marks a flow run Crashed when its heartbeats
   (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, sent by the run's process) stop for SPARSEPILOT_CRASH_AFTER_S
   seconds, i.e. its worker died with it. Without it such a run stays Running forever and holds its
   use case;
3. the SparsePilot deployments with one schedule per use case (flows.deployments, the same code
   `sparsepilot serve` uses).

Needs PREFECT_API_URL (a Prefect server) and the SparsePilot settings (SPARSEPILOT_DATABASE_URL, ...).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CRASH_AUTOMATION = "sparsepilot: crash flow runs whose heartbeats stopped"
# A run stops being watched once any of these arrives; Suspended runs have left their process on purpose.
_ALIVE_OR_DONE = (
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.Suspended",
)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def ensure_pool(name: str) -> str:
    """Create the process work pool when missing; returns 'created' or 'exists'."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return "created"
        except ObjectAlreadyExists:
            return "exists"


def ensure_crash_automation(crash_after_s: int) -> str:
    """The heartbeat watchdog (Prefect's documented zombie-run pattern), replaced when its window changed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    heartbeat_s = int(_env("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"))
    if crash_after_s < 2 * heartbeat_s:
        raise SystemExit(
            f"SPARSEPILOT_CRASH_AFTER_S={crash_after_s} must be at least twice "
            f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat_s}, or one late heartbeat crashes a healthy run"
        )
    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        if existing.trigger.within == timedelta(seconds=crash_after_s):
            return "exists"
        existing.delete()
    Automation(
        name=CRASH_AUTOMATION,
        description="The run's process stopped sending heartbeats (its worker died): mark it Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect=set(_ALIVE_OR_DONE),
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {crash_after_s} s: the worker running this flow run died",
            )
        ],
    ).create()
    return "created" if existing is None else "replaced"


def deploy_flows(pool: str, gpu_pool: str) -> list[str]:
    """The SparsePilot deployments on the pool(s), sourced from this checkout/image (REPO)."""
    from flows import deployments

    return deployments.deploy_to_work_pool(None, pool)


def main() -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("stack_setup: PREFECT_API_URL is not set; it needs a Prefect server", file=sys.stderr)
        return 2
    from rollout.settings import configure_environment

    configure_environment()
    pool = _env("SPARSEPILOT_WORK_POOL", "sparsepilot")
    gpu_pool = _env("SPARSEPILOT_GPU_WORK_POOL", "sparsepilot-gpu")
    for name in (pool, gpu_pool):
        print(f"stack_setup: work pool {name!r}: {ensure_pool(name)}")
    crash_after = int(_env("SPARSEPILOT_CRASH_AFTER_S", "120"))
    print(f"stack_setup: crashed-run detector ({crash_after} s): {ensure_crash_automation(crash_after)}")
    if _env("SPARSEPILOT_SKIP_DEPLOYMENTS", "") in ("1", "true"):
        print("stack_setup: deployments skipped (SPARSEPILOT_SKIP_DEPLOYMENTS)")
        return 0
    names = deploy_flows(pool, gpu_pool)
    print(f"stack_setup: {len(names)} deployment(s): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
