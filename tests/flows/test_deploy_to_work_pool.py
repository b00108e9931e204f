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

from flows.deployments import approval_deployment_name, serve_schedules
from rollout.usecases import add_usecase
from tests.fixtures.dashboard import seed_small_portfolio

POOL = "wp-test-pool"


def _serve(work_pool: str) -> str:
    out = io.StringIO()
    serve_schedules(None, work_pool=work_pool, console=Console(file=out, width=400))
    return out.getvalue()


def _deployments() -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def _pool(prefect_harness: str, monkeypatch: pytest.MonkeyPatch, name: str = POOL) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass
    return name


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
    approval = found[approval_deployment_name()]
    assert (approval.work_pool_name, approval.work_queue_name) == (pool, "approvals"), out
    assert f"{approval_deployment_name()} -> wp-test-pool/approvals" in out


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


def test_two_state_dbs_on_one_prefect_server_keep_their_own_approval_deployment(
    flow_use_case,
    prefect_harness: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    state_template_db: Path,
) -> None:
    """One `sparsepilot-approval` served every state DB on a server: the second DB's deploy took it over
    (its pool), and the first DB's approval runs then ran against the second's state DB ("decision 1 does
    not exist", or another use case's decision 1; review s50 E3). Each state DB deploys its own, named
    and tagged by the state DB's id, which its cycle's approval requests name; the shared one of an
    older build is left alone, said once per deploy."""
    import shutil

    from prefect.client.orchestration import get_client

    from flows.approval import approval_flow
    from flows.cycle import request_approval_run
    from rollout.settings import configure_environment, get_settings, state_db_id

    first_pool = _pool(prefect_harness, monkeypatch, "wp-first")
    flow_use_case("wp-first-case")
    first = approval_deployment_name()
    _serve(first_pool)
    first_db = get_settings().database_url

    home2 = tmp_path / "home2"  # a second state DB, deploying to its own pool on the same server
    monkeypatch.setenv("SPARSEPILOT_HOME", str(home2))
    configure_environment(get_settings())
    shutil.copyfile(state_template_db, home2 / "state.db")
    second = approval_deployment_name()
    assert second != first
    out = _serve(_pool(prefect_harness, monkeypatch, "wp-second"))
    assert f"{second} -> wp-second/approvals" in out, out

    found = _deployments()
    assert (found[first].work_pool_name, found[second].work_pool_name) == ("wp-first", "wp-second")
    assert f"state-db:{state_db_id(first_db)}" in found[first].tags
    assert f"state-db:{state_db_id(get_settings().database_url)}" in found[second].tags
    assert "sparsepilot-approval" not in found

    # an older build's shared deployment on the server: left alone, and the deploy says so
    legacy = approval_flow.to_deployment(name="sparsepilot-approval").apply()
    try:
        again = _serve("wp-second")
        assert (
            "sparsepilot-approval: the approval deployment that every state DB on this server shared" in again
        )
        assert "sparsepilot-approval" in _deployments()
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(legacy)

    # the second state DB's cycle asks for an approval run of a decision waiting there: its own
    # deployment (seeded last: the seeded specs are partial, which a deploy would refuse)
    decision = seed_small_portfolio(tmp_path / "art")["contract-summarisation:decision"]
    run_id = request_approval_run(decision)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).deployment_id == found[second].id
        client.delete_flow_run(run_id)
