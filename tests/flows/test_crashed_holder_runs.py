"""A cycle killed mid-pilot (review s50 E5): `serve`'s runner marked the cycle's own run Crashed, or nothing
did (the runner died too), but its `pilot` subflow stayed "Running" in Prefect forever. The next run that
takes the use case's lease over from the dead holder marks what Prefect still shows unfinished of it
Crashed, naming the take-over (flows.crashed_holder), on a real Prefect server: never a run of a deployment
it started (an approval run waiting in its own process), never a holder whose lease only lapsed."""

from __future__ import annotations

import socket
import subprocess

import pytest
from sqlalchemy import select

NAME = "orphaned"


def _use_case() -> None:
    from rollout.db.models import UseCase, UseCaseLease
    from rollout.db.session import session_scope

    with session_scope() as s:  # as `usecase add` makes one: with its free lease row
        uc = UseCase(name=NAME, owner="o", criticality="low")
        s.add(uc)
        s.flush()
        s.add(UseCaseLease(use_case_id=uc.id))


def _set_lease(**columns: object) -> None:
    from rollout.db.models import UseCase, UseCaseLease
    from rollout.db.session import session_scope

    with session_scope() as s:
        lease = s.get(UseCaseLease, s.scalar(select(UseCase.id).where(UseCase.name == NAME)))
        for field, value in columns.items():
            setattr(lease, field, value)


def _killed_cycle(client, runner_crashed_it: bool) -> dict[str, object]:  # noqa: ANN001
    """What a cycle killed mid-pilot leaves on the server: its run (Crashed by the runner, or still
    Running), its in-process `pilot` subflow Running, and an approval run it requested earlier from a
    deployment, Paused in its own process."""
    from prefect import flow, task
    from prefect.states import Crashed, Paused, Running

    @flow(name="use-case-cycle")
    def cycle() -> None: ...

    @flow(name="pilot")
    def pilot() -> None: ...

    @task(name="slot")
    def slot() -> None: ...

    cycle_run = client.create_flow_run(cycle, state=Running())
    pilot_slot, approval_slot = (
        client.create_task_run(slot, cycle_run.id, dynamic_key=str(k), state=Running()) for k in (0, 1)
    )
    pilot_run = client.create_flow_run(pilot, parent_task_run_id=pilot_slot.id, state=Running())
    approval = client.create_deployment(flow_id=client.create_flow_from_name("approval"), name=f"appr-{NAME}")
    approval_run = client.create_flow_run_from_deployment(
        approval, parent_task_run_id=approval_slot.id, state=Paused()
    )
    if runner_crashed_it:
        client.set_flow_run_state(cycle_run.id, Crashed(message="Flow run process exited"), force=True)
    return {"cycle": cycle_run.id, "pilot": pilot_run.id, "approval": approval_run.id}


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.mark.parametrize(
    "how", ["runner crashed the cycle", "the cycle's process is gone", "its lease lapsed on another host"]
)
def test_the_run_taking_over_a_dead_holders_use_case_crashes_what_it_left_running(
    trust_env, prefect_harness, how: str
) -> None:  # noqa: ANN001
    import datetime as dt

    from prefect.client.orchestration import get_client

    from flows.common import use_case_lease
    from rollout import leases

    _use_case()
    with get_client(sync_client=True) as client:
        runs = _killed_cycle(client, runner_crashed_it=how == "runner crashed the cycle")
        work = f"use-case cycle (flow run {runs['cycle']}) pid 4321 on {socket.gethostname()}"
        leases.acquire(NAME, "killed", work, flow_run_id=str(runs["cycle"]), seconds=300)
        if how == "the cycle's process is gone":
            _set_lease(pid=_dead_pid())
        elif how == "its lease lapsed on another host":  # maybe only stalled: not known dead
            _set_lease(host="another-host", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))

        with use_case_lease(NAME, "use-case cycle"):  # the next tick takes the use case over
            pass

        state = {k: client.read_flow_run(v).state for k, v in runs.items()}
    assert state["approval"].name == "Paused"  # a deployment's run, in its own process: never touched
    if how == "its lease lapsed on another host":
        assert (state["cycle"].name, state["pilot"].name) == ("Running", "Running")
        return
    assert (state["cycle"].name, state["pilot"].name) == ("Crashed", "Crashed")
    message = state["pilot"].message
    assert message.startswith(f"{NAME}: this run stopped without ending; use-case cycle, pid "), message
    assert f"took the use case over from {work}: " in message
    if how == "the cycle's process is gone":
        assert message.endswith(" is gone") and state["cycle"].message == message
    else:
        assert message.endswith(f": its flow run {runs['cycle']} has ended"), message
        assert state["cycle"].message == "Flow run process exited"  # the runner's word stays


def test_an_observations_import_taking_over_crashes_what_the_dead_holder_left_running(
    trust_env, prefect_harness, tmp_path
) -> None:  # noqa: ANN001
    """`sparsepilot pilot NAME --observations FILE` runs the import in the CLI's process, no flow run of
    its own: it takes the lease as every run does (flows.common.use_case_lease), so a cycle killed
    mid-pilot is marked Crashed by it too. (It took the lease through `rollout.leases.holding` directly
    and left the dead cycle and its pilot "Running".) The take-over comes before the file is read: a use
    case without a spec refuses the import after it."""
    from prefect.client.orchestration import get_client

    from flows.pilot import import_observations
    from rollout import leases
    from rollout.pilots import PilotStateError

    _use_case()
    with get_client(sync_client=True) as client:
        runs = _killed_cycle(client, runner_crashed_it=False)
        work = f"use-case cycle (flow run {runs['cycle']}) pid 4321 on {socket.gethostname()}"
        leases.acquire(NAME, "killed", work, flow_run_id=str(runs["cycle"]), seconds=300)
        _set_lease(pid=_dead_pid())
        with pytest.raises(PilotStateError, match="has no spec version 1"):
            import_observations(NAME, str(tmp_path / "answers.jsonl"))
        state = {k: client.read_flow_run(v).state for k, v in runs.items()}
    assert (state["cycle"].name, state["pilot"].name, state["approval"].name) == (
        "Crashed",
        "Crashed",
        "Paused",
    )
    message = state["pilot"].message
    assert message.startswith(f"{NAME}: this run stopped without ending; observations import, pid "), message
    assert f"took the use case over from {work}: " in message and message.endswith(" is gone"), message
    assert leases.busy_with(NAME) == "free"  # released as the import ended
