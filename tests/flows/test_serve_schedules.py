"""`sparsepilot serve` registers one cron schedule per use case (from its spec) and serves them, and
deletes the deployment of a use case whose spec lost its schedule; the schedules are read back through the
Prefect client while the command runs (a real subprocess against the session's Prefect test server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _read_deployments() -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


@contextmanager
def _serving(
    prefect_harness: str, log_path: Path, **extra_env: str
) -> Iterator[Callable[[Callable[[set[str]], bool]], dict]]:
    """`sparsepilot serve` running in a subprocess (its output in `log_path`); yields `wait(until)`: the
    deployments on the server once `until(their names)` holds (150 s at most, the serve still running)."""
    from rollout.auth import hash_password

    # the use cases are a person's (flow_use_case): serving their cycles needs an operator, olga
    accounts = f"olga:operator:{hash_password('olga-pw-1234')}"
    env = dict(os.environ, PREFECT_API_URL=prefect_harness, PREFECT_LOGGING_LEVEL="WARNING")
    env.update(SPARSEPILOT_ACCOUNTS=accounts, SPARSEPILOT_USER="olga", **extra_env)
    log = log_path.open("w")
    cmd = [sys.executable, "-m", "sparsepilot", "serve", "--password-stdin"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, text=True,
    )  # fmt: skip
    proc.stdin.write("olga-pw-1234\n")
    proc.stdin.close()

    def wait(until: Callable[[set[str]], bool]) -> dict[str, object]:
        deadline = time.monotonic() + 150
        found: dict[str, object] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            found = _read_deployments()
            if until(set(found)):
                break
            time.sleep(1)
        assert until(set(found)), (sorted(found), log_path.read_text()[-3000:])
        return found

    try:
        yield wait
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_serve_registers_one_schedule_per_use_case(
    flow_use_case, prefect_harness: str, tmp_path: Path
) -> None:
    """... and each flow run it serves, in a process of its own (Prefect's runner), which had none of the
    serve's log-file set-up, writes to the serve's log file: its records and the libraries' warnings
    reached the serve's terminal only, never serve-*.log (review s50 E1). Here an approval run for a
    decision that does not exist: its records and traceback are in the serve's log file; the terminal
    keeps the flow run's own lines, without the traceback."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.deployments import approval_deployment_name
    from rollout.settings import get_settings

    approval = approval_deployment_name()  # this state DB's own (review s50 E3)
    flow_use_case("chat-a")
    flow_use_case("qa-b", schedule={"cron": "30 3 * * 1-5", "timezone": "Europe/Berlin"})
    flow_use_case("unscheduled-c", schedule=None)

    console = tmp_path / "serve.log"
    # the runner looks for due runs every second (every 10 s by default)
    with _serving(prefect_harness, console, PREFECT_RUNNER_POLL_FREQUENCY="1") as wait:
        wanted = {"sparsepilot-chat-a", "sparsepilot-qa-b", approval}
        found = wait(lambda names: wanted <= names)
        assert "sparsepilot-unscheduled-c" not in found

        def schedule(name: str) -> tuple[str, str, bool]:
            (s,) = found[name].schedules
            return s.schedule.cron, s.schedule.timezone, s.active

        assert schedule("sparsepilot-chat-a") == ("15 4 * * *", "UTC", True)
        assert schedule("sparsepilot-qa-b") == ("30 3 * * 1-5", "Europe/Berlin", True)
        assert found["sparsepilot-chat-a"].parameters == {"use_case": "chat-a"}
        assert found["sparsepilot-qa-b"].parameters == {"use_case": "qa-b"}
        assert found[approval].schedules == []

        run = run_deployment(f"approval/{approval}", parameters={"decision_id": 999}, timeout=0)
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while not (state := client.read_flow_run(run.id).state).is_final():
                assert time.monotonic() < deadline, (state, console.read_text()[-3000:])
                time.sleep(0.5)
        (log,) = (get_settings().home / "logs").glob("serve-*.log")
        text, shown = log.read_text(), console.read_text()
    assert state.is_failed(), (state, shown)
    assert "decision 999 does not exist" in text, text[-3000:]
    assert "ERROR prefect.flow_runs: Encountered exception during execution: ApprovalError" in text, text
    assert "Traceback" in text, text[-3000:]
    assert "Task run 'approval-register-run" in shown, shown  # the run's own lines stay on the terminal
    assert "Traceback" not in shown and "Encountered exception" not in shown, shown


def test_serve_deletes_the_cycle_of_a_use_case_that_lost_its_schedule(
    flow_use_case, prefect_harness: str, tmp_path: Path
) -> None:
    """A use case's spec drops its schedule; plain `serve` (no work pool) left its deployment, served
    by no one, on the server, whose scheduler kept making runs that went Late. It is deleted, as
    `serve --work-pool` deletes it, and the serve says so."""
    import yaml

    from flows.deployments import build_deployments
    from rollout.usecases import add_usecase

    flow_use_case("served-keep")
    flow_use_case("served-drop", schedule={"cron": "30 2 * * *", "timezone": "UTC"})
    for deployment in build_deployments():  # what an earlier `serve` registered
        deployment.apply()
    assert {"sparsepilot-served-keep", "sparsepilot-served-drop"} <= set(_read_deployments())
    spec_file = tmp_path / "served-drop.yaml"  # a new spec version without `schedule:` (it is optional)
    spec = yaml.safe_load(spec_file.read_text())
    spec.pop("schedule")
    spec_file.write_text(yaml.safe_dump(spec))
    add_usecase(spec_file, actor="test-owner", new_version=True)

    log = tmp_path / "serve.log"
    with _serving(prefect_harness, log) as wait:
        found = wait(
            lambda names: "sparsepilot-served-keep" in names and "sparsepilot-served-drop" not in names
        )
        assert [s.schedule.cron for s in found["sparsepilot-served-keep"].schedules] == ["15 4 * * *"]
        said = "sparsepilot-served-drop: no schedule in spec v2, deleted"
        deadline = time.monotonic() + 30  # printed just after the deletion
        while said not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert said in log.read_text(), log.read_text()[-3000:]
