"""One run at a time per use case, through the real flows (rollout.leases): while a calibration runs, a
manual pilot or gate of the same use case is refused naming it (exit 2 on the CLI) and a scheduled cycle
skips its tick, writing nothing; the cycle's own subflows (pilot, gate) run under the cycle's lease; every
flow lets go of the use case when it ends."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import func, select

from tests.fixtures.flows import PAYS, QUICK_CAL, QUICK_EVAL, price_evaluation
from tests.fixtures.trust import run_cli


def _counts(name: str) -> tuple[int, int, int]:
    from rollout.db.models import CalibrationRun, GateDecision, Observation, UseCase
    from rollout.db.session import session_scope

    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == name))
        return tuple(
            int(s.scalar(select(func.count()).select_from(m).where(m.use_case_id == uc.id)))
            for m in (CalibrationRun, Observation, GateDecision)
        )  # type: ignore[return-value]


_GO_ON = threading.Event()


def _long_work_flow():  # noqa: ANN202
    """A flow that works on a use case until the test lets it finish: a long calibration, as another run
    sees it."""
    from prefect import flow

    from flows.common import under_lease

    @flow(name="long-work")
    @under_lease("calibrate")
    def long_work(use_case: str) -> tuple[str, str]:
        from flows.common import this_run

        assert _GO_ON.wait(timeout=300)
        return use_case, this_run()

    return long_work


def test_a_run_in_progress_holds_its_use_case_against_every_other_run(flow_use_case, trust_env) -> None:  # noqa: ANN001
    from flows.calibrate import calibrate_flow
    from flows.cycle import cycle_flow
    from flows.gate import gate_flow
    from flows.pilot import pilot_flow
    from rollout import leases

    name = flow_use_case()
    long_work = _long_work_flow()
    _GO_ON.clear()
    done: dict[str, object] = {}
    worker = threading.Thread(
        target=lambda: done.update(zip(("result", "run"), long_work(name), strict=True))
    )
    worker.start()
    deadline = time.monotonic() + 60
    while not leases.busy_with(name).startswith("calibrate (flow run ") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leases.busy_with(name).startswith("calibrate (flow run "), leases.busy_with(name)
    try:
        busy = rf"^{name} is busy: calibrate \(flow run [0-9a-f-]+\) pid \d+ on .+, since .+ UTC"
        for other in (pilot_flow, gate_flow, calibrate_flow):
            with pytest.raises(leases.UseCaseBusy, match=busy):
                other(name)
        skipped = cycle_flow(name)
        assert skipped["skipped"].startswith(f"{name} is busy: calibrate (flow run ")
        cli = run_cli("gate", name, user="olga")
        assert cli.returncode == 2, cli.stdout + cli.stderr
        assert f"{name} is busy: calibrate (flow run " in cli.stdout + cli.stderr
        assert _counts(name) == (0, 0, 0)  # the refused and skipped runs wrote nothing
        shown = run_cli("usecase", "show", name)
        assert shown.returncode == 0 and "working now: calibrate (flow run " in shown.stdout, shown.stderr
    finally:
        _GO_ON.set()
        worker.join(timeout=300)
    assert done["result"] == name and done["run"] and leases.busy_with(name) == "free"
    assert "working now" not in run_cli("usecase", "show", name).stdout

    # a holder whose flow run has ended (here: completed; a worker killed mid-run ends Crashed) holds
    # nothing, though its lease has minutes left: the next run goes ahead at once
    leases.acquire(name, "ended", "calibrate (flow run of the past)", flow_run_id=done["run"], seconds=300)
    assert leases.busy_with(name).startswith("calibrate (flow run of the past)")
    calibrate_flow(name, limits=QUICK_CAL)  # the next run works, and lets go when it ends
    assert _counts(name)[0] == 1 and leases.busy_with(name) == "free"


def test_a_cycle_runs_its_subflows_under_its_own_lease_and_a_dead_holder_blocks_only_until_it_lapses(
    flow_use_case,
) -> None:
    from flows.calibrate import calibrate_flow
    from flows.cycle import cycle_flow
    from flows.evaluate import evaluate_flow
    from rollout import leases

    name = flow_use_case()
    calibrate_flow(name, limits=QUICK_CAL)
    evaluate_flow(name, suite=QUICK_EVAL)
    price_evaluation(name, **PAYS)  # a plan worth piloting: the cycle pilots only such a plan

    # a cycle whose process died a moment ago: its lease has not lapsed, so this tick does nothing
    leases.acquire(name, "dead-run", "use-case cycle (flow run r-0), pid 1 on gone", seconds=10)
    lapses = leases.holder(name).expires_at.timestamp()
    skipped = cycle_flow(name)["skipped"]
    assert skipped.startswith(f"{name} is busy: use-case cycle (flow run r-0), pid 1 on gone"), skipped
    assert _counts(name)[1:] == (0, 0)
    time.sleep(max(lapses - time.time(), 0) + 0.1)

    out = cycle_flow(name)  # the lease lapsed: this tick takes it over; pilot and gate run inside it
    assert "skipped" not in out, out
    assert out["pilot"]["batches"] and out["pilot"]["batches"][0]["passed"] is True
    assert out["gate"]["outcome"] in {"EXTEND", "NO-GO", "GO"}
    assert _counts(name)[1] > 0 and _counts(name)[2] == 1
    assert leases.busy_with(name) == "free"


_LOSE = threading.Event()


def test_a_run_that_lost_its_lease_writes_nothing_more(flow_use_case) -> None:
    """A cycle stopped longer than its lease (a host paused, a state DB out of reach): another run takes
    the use case over, and when the cycle goes on, its calibration subflow is refused at its first write."""
    from prefect import flow

    from flows.calibrate import calibrate_flow
    from flows.common import under_lease
    from rollout import leases
    from rollout.db.models import UseCase, UseCaseLease, utcnow
    from rollout.db.session import session_scope
    from rollout.settings import get_settings
    from tests.rollout.usecase_helpers import snapshot

    @flow(name="paused-cycle")
    @under_lease("use-case cycle")
    def paused_cycle(use_case: str) -> None:
        assert _LOSE.wait(timeout=300)
        calibrate_flow(use_case, limits=QUICK_CAL)

    name = flow_use_case()
    _LOSE.clear()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            paused_cycle(name)
        except BaseException as exc:  # noqa: BLE001 - what the flow raised is the test's to judge
            failed.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not leases.busy_with(name).startswith("use-case cycle") and time.monotonic() < deadline:
            time.sleep(0.02)
        # the paused holder's lease lapsed and another run took it over (written in one transaction: a
        # lapse written apart from the takeover could meet a renewal of the paused run's renewer between
        # the two; rollout's own takeover is tests/rollout/test_leases.py's)
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == name))
            lease = s.get(UseCaseLease, uc.id)
            lease.holder, lease.work = "next-run", "gate (flow run r-9) pid 9 on host-b"
            lease.acquired_at, lease.expires_at = utcnow(), utcnow() + dt.timedelta(seconds=300)
        before = snapshot(get_settings().database_url)
    finally:
        _LOSE.set()
        worker.join(timeout=300)
    assert len(failed) == 1 and isinstance(failed[0], leases.LeaseLost), failed
    assert str(failed[0]).startswith(f"{name}: this run lost its lease while it worked (gate (flow run r-9)")
    assert snapshot(get_settings().database_url) == before  # its calibration wrote nothing: no run, no audit
    assert _counts(name) == (0, 0, 0)
    assert leases.busy_with(name).startswith("gate (flow run r-9) pid 9 on host-b")  # the new holder's still


def test_a_calibration_that_lost_its_lease_stops_at_its_next_step(flow_use_case, monkeypatch) -> None:
    """Taken over right after the calibration opened its run: the renewer sees it, and the calibration
    stops at its next progress step (`leases.check_held`), before it logs or registers anything; its
    run's failure cannot be recorded either (fenced), so the row stays as the new holder will find it."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from sqlalchemy import event

    from flows.calibrate import calibrate_flow
    from rollout import leases, tracking
    from rollout.db.models import CalibrationRun, ModelVersion, UseCase, UseCaseLease, utcnow
    from rollout.db.session import StateSession, session_scope

    monkeypatch.setattr(leases, "RENEW_SECONDS", 0.05)
    name = flow_use_case()
    taken: list[str] = []

    def take_over() -> None:  # another run, as a direct write from a thread with no lease of its own
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == name))
            if taken or not s.scalar(select(CalibrationRun.id).where(CalibrationRun.use_case_id == uc.id)):
                return
            lease = s.get(UseCaseLease, uc.id)
            lease.holder, lease.work = "next", "gate (flow run r-5) pid 5 on host-d"
            lease.acquired_at, lease.expires_at = utcnow(), utcnow() + dt.timedelta(seconds=300)
            taken.append(lease.work)

    def after_commit(_session) -> None:  # noqa: ANN001
        held = leases._HELD.get()  # noqa: SLF001 - the flow's own commits only
        if taken or not held or name not in held:
            return
        worker = threading.Thread(target=take_over)
        worker.start()
        worker.join()
        deadline = time.monotonic() + 30
        while taken and held[name] not in leases._LOST and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.01)

    event.listen(StateSession, "after_commit", after_commit)
    try:
        with pytest.raises(leases.LeaseLost, match=r"gate \(flow run r-5\)"):
            calibrate_flow(name, limits=QUICK_CAL)
    finally:
        event.remove(StateSession, "after_commit", after_commit)
    assert taken, "the calibration never opened its run"
    with session_scope() as s:
        (run,) = s.scalars(select(CalibrationRun)).all()
        assert run.status == "running"  # its failure was not recorded over the new holder's use case
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 0
    logged = mlflow.search_runs(experiment_names=[tracking.experiment_name(name)], output_format="list")
    assert logged == []  # stopped before its MLflow run: at a progress step, not at the registry's write
    assert leases.busy_with(name).startswith("gate (flow run r-5) pid 5 on host-d")
    # and no task of it was retried: a retry cannot win the use case back (flows.common._worth_retrying)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="calibration-run-failed"))
        )
    assert runs and all(r.run_count == 1 for r in runs), [(r.name, r.run_count) for r in runs]


def test_a_calibration_taken_over_after_it_logged_to_mlflow_leaves_its_run_tagged(
    flow_use_case, monkeypatch
) -> None:
    """Taken over between its MLflow run and the registration (the one window that progress checks
    cannot close): the registration is refused, nothing is registered, and the MLflow run, which no
    model version will ever refer to, says why (`sparsepilot.not_recorded`)."""
    import mlflow

    import flows.calibrate as calibrate_module
    from flows.calibrate import calibrate_flow
    from rollout import leases, tracking
    from rollout.db.models import CalibrationRun, ModelVersion, UseCase, UseCaseLease, utcnow
    from rollout.db.session import session_scope

    name = flow_use_case()
    real_log_run = calibrate_module.log_run

    def take_over() -> None:  # another run, as a direct write from a thread with no lease of its own
        with session_scope() as s:
            uc = s.scalar(select(UseCase).where(UseCase.name == name))
            lease = s.get(UseCaseLease, uc.id)
            lease.holder, lease.work = "next", "cycle (flow run r-8) pid 8 on host-f"
            lease.acquired_at, lease.expires_at = utcnow(), utcnow() + dt.timedelta(seconds=300)

    def log_run_then_lose(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        run_id = real_log_run(*args, **kwargs)
        worker = threading.Thread(target=take_over)
        worker.start()
        worker.join()
        return run_id

    monkeypatch.setattr(calibrate_module, "log_run", log_run_then_lose)
    with pytest.raises(leases.LeaseLost, match=r"cycle \(flow run r-8\)"):
        calibrate_flow(name, limits=QUICK_CAL)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 0
        (run,) = s.scalars(select(CalibrationRun)).all()
        assert run.status == "running"  # the new holder's to settle
    (logged,) = mlflow.search_runs(experiment_names=[tracking.experiment_name(name)], output_format="list")
    why = logged.data.tags["sparsepilot.not_recorded"]
    assert why.startswith(f"the state DB did not record this run: LeaseLost: {name}: this run lost its lease")
