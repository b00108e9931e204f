"""`sparsepilot serve --work-pool` (flows.deployments.deploy_to_work_pool, the stack's `deploy-flows`
too) against the session's real Prefect test server: the approval deployment goes to the pool's
`approvals` queue (never the model workers' default queue), and re-running after a use case's spec lost
its schedule deletes that use case's cycle deployment, saying so, instead of leaving it on its old cron."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from flows.deployments import serve_schedules
from rollout.usecases import add_usecase

POOL = "wp-test-pool"


def _serve(work_pool: str) -> str:
    out = io.StringIO()
    serve_schedules(None, work_pool=work_pool, console=Console(file=out, width=400))
    return out.getvalue()


def _deployments() -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def _pool(prefect_harness: str, monkeypatch: pytest.MonkeyPatch) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except ObjectAlreadyExists:
            pass
    return POOL


def test_serve_work_pool_puts_the_approval_deployment_on_the_approvals_queue(
    flow_use_case, prefect_harness: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like `deploy-flows`: on the pool's default queue an approval run, waiting days for a person, would
    hold a model worker's only slot."""
    pool = _pool(prefect_harness, monkeypatch)
    flow_use_case("wp-cycle")

    out = _serve(pool)
    found = _deployments()
    cycle = found["sparsepilot-wp-cycle"]
    assert (cycle.work_pool_name, cycle.work_queue_name) == (pool, "default"), out
    approval = found["sparsepilot-approval"]
    assert (approval.work_pool_name, approval.work_queue_name) == (pool, "approvals"), out
    assert "sparsepilot-approval -> wp-test-pool/approvals" in out


def test_serve_work_pool_deletes_the_cycle_of_a_use_case_that_lost_its_schedule(
    flow_use_case, prefect_harness: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(prefect_harness, monkeypatch)
    flow_use_case("wp-keep")
    flow_use_case("wp-drop", schedule={"cron": "30 2 * * *", "timezone": "UTC"})
    first = _serve(pool)
    assert {"sparsepilot-wp-keep", "sparsepilot-wp-drop"} <= set(_deployments()), first

    # a new spec version without `schedule:` (the field is optional), then the documented re-run
    spec_file = tmp_path / "wp-drop.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec.pop("schedule")
    spec_file.write_text(yaml.safe_dump(spec))
    add_usecase(spec_file, actor="test-owner", new_version=True)

    again = _serve(pool)
    assert "sparsepilot-wp-drop: no schedule in spec v2, deleted" in again, again
    found = _deployments()
    assert "sparsepilot-wp-drop" not in found
    assert [s.schedule.cron for s in found["sparsepilot-wp-keep"].schedules] == ["15 4 * * *"]
    assert "deleted" not in _serve(pool)  # nothing left to remove: said once
