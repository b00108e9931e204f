"""One-shot setup of the Prefect side of the stack (docker-compose's `deploy-flows` service; the native
stack test runs this same file). Safe to run again: every step updates in place.

1. the work pools (process type): SPARSEPILOT_WORK_POOL and SPARSEPILOT_GPU_WORK_POOL;
2. the crashed-run detector: a Prefect automation that marks a flow run Crashed when its heartbeats
   (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, sent by the run's process) stop for SPARSEPILOT_CRASH_AFTER_S
   seconds, i.e. its worker died with it. Without it such a run stays Running forever and holds its
   use case;
3. the SparsePilot deployments with one schedule per use case (flows.deployments.deploy_to_work_pool,
   the same code `sparsepilot serve --work-pool` runs), GPU use cases (SPARSEPILOT_GPU_USE_CASES) on the
   GPU pool, and the approval deployment on its own `approvals` queue (served by the approvals worker);
   the cycle deployment of a use case whose current spec has no schedule is deleted (and printed).

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


def crash_window(env: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """SPARSEPILOT_CRASH_AFTER_S, checked against the heartbeat: a window shorter than two heartbeats would
    crash a healthy run whose heartbeat is merely late."""
    names = ("SPARSEPILOT_CRASH_AFTER_S", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    try:
        crash_after_s = int(env.get(names[0]) or 120)
        heartbeat_s = int(env.get(names[1]) or 30)
    except ValueError as exc:
        raise SystemExit(f"{' / '.join(names)} must be whole seconds: {exc}") from None
    if heartbeat_s < 30:
        raise SystemExit(f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat_s}: Prefect's minimum is 30 s")
    if crash_after_s < 2 * heartbeat_s:
        raise SystemExit(
            f"SPARSEPILOT_CRASH_AFTER_S={crash_after_s} must be at least twice "
            f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat_s}, or one late heartbeat crashes a healthy run"
        )
    return crash_after_s


def ensure_crash_automation(crash_after_s: int) -> str:
    """The heartbeat watchdog (Prefect's documented zombie-run pattern), replaced when its window changed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

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


def deploy_flows(pool: str, gpu_pool: str, gpu_use_cases: set[str]) -> tuple[list[str], list[str]]:
    """The SparsePilot deployments, sourced from this checkout/image, by the same code as
    `sparsepilot serve --work-pool` (flows.deployments.deploy_to_work_pool): the cycles on `pool`, or
    on `gpu_pool` when named in SPARSEPILOT_GPU_USE_CASES, the approval deployment on the `approvals`
    queue, and the cycles of use cases that lost their schedule deleted. Returns (deployed, removed)."""
    from flows import deployments

    scheduled = [s["use_case"] for s in deployments.scheduled_use_cases()]
    unknown = sorted(gpu_use_cases - set(scheduled))
    if unknown:
        raise SystemExit(
            f"SPARSEPILOT_GPU_USE_CASES names {', '.join(unknown)}: not a use case with a schedule "
            f"(known: {', '.join(scheduled) or 'none'})"
        )
    done = deployments.deploy_to_work_pool(None, pool, gpu_pool=gpu_pool, gpu_use_cases=gpu_use_cases)
    return done.deployed, done.removed


def main() -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("stack_setup: PREFECT_API_URL is not set; it needs a Prefect server", file=sys.stderr)
        return 2
    crash_after = crash_window()  # bad configuration fails before anything is changed on the server
    from rollout.settings import configure_environment

    configure_environment()
    pool = _env("SPARSEPILOT_WORK_POOL", "sparsepilot")
    gpu_pool = _env("SPARSEPILOT_GPU_WORK_POOL", "sparsepilot-gpu")
    for name in (pool, gpu_pool):
        print(f"stack_setup: work pool {name!r}: {ensure_pool(name)}")
    print(f"stack_setup: crashed-run detector ({crash_after} s): {ensure_crash_automation(crash_after)}")
    gpu_use_cases = {n.strip() for n in _env("SPARSEPILOT_GPU_USE_CASES", "").split(",") if n.strip()}
    names, removed = deploy_flows(pool, gpu_pool, gpu_use_cases)
    for line in removed:
        print(f"stack_setup: {line}")
    print(f"stack_setup: {len(names)} deployment(s): {'; '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
