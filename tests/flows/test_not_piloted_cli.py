"""`sparsepilot pilot` on a plan that is not piloted (a dense plan: rollout.roi.evaluation_pilot_skip).
An --observations import was told "`sparsepilot pilot NAME --pilot-anyway` pilots it regardless", which
runs our own arms' batches instead of the import (review s46 T2-3): the refusal now names the import.
And `sparsepilot pilot NAME` made the refusal inside a flow run, after starting Prefect: ERROR lines and
a Failed `pilot` run for an ordinary refusal (T2-6); it is now made before any flow run. Real
`sparsepilot` processes, the state DB, a real Prefect API (the flow tests' harness)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fixtures.trust import cli_here, run_cli
from tests.rollout.test_decision_money import _go_awaiting_approval
from tests.rollout.test_not_piloted import DENSE, _challenger, _pilots


def test_an_import_refused_as_not_piloted_names_the_import(trust_env, tmp_path: Path) -> None:  # noqa: ANN001
    _challenger(tmp_path, "dense-plan", **DENSE)
    f = tmp_path / "obs.jsonl"
    row = {"request_id": "r1", "arm": "control", "quality": 1.0, "latency_ms": 10, "error": False}
    f.write_text(json.dumps(row) + "\n")
    out = cli_here("pilot", "dense-plan", "--observations", str(f), user="olga")  # in this process
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: dense-plan: not piloted: the plan keeps 100.00% of blocks"), err
    assert f"(`sparsepilot pilot dense-plan --observations {f} --pilot-anyway` pilots it regardless)" in err
    assert _pilots("dense-plan") == 0


def test_pilot_refuses_a_plan_not_piloted_before_any_flow_run(
    trust_env, prefect_harness: str, tmp_path: Path
) -> None:  # noqa: ANN001
    from prefect.client.orchestration import get_client

    from rollout import pilot_batches

    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    _challenger(tmp_path, "dense-plan", **DENSE)
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    out = run_cli("pilot", "dense-plan", user="olga", env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: dense-plan: not piloted: the plan keeps 100.00% of blocks (as dense): nothing to pilot; "
        "nothing was started (`sparsepilot pilot dense-plan --pilot-anyway` pilots it regardless)"
    )
    assert "Flow run" not in out.stderr and "Task run" not in out.stderr, out.stderr
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # no (Failed) pilot run left in Prefect
    assert _pilots("dense-plan") == 0

    # s47: what stands there is said first, as the flow says it: a pilot waiting for approval (the
    # command said "not piloted", the plan cannot pay, over it) ...
    decision, _ = _go_awaiting_approval("dense-plan", pilot_anyway=True)
    out = cli_here("pilot", "dense-plan", user="olga", env=env)  # the refusal's words, in this process
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: dense-plan: pilot 1 waits for approval of decision {decision}: approve or reject it "
        f"(`sparsepilot approve dense-plan --decision {decision} --reason TEXT`, with --reject to reject)"
    )
    # ... and a challenger whose calibration missed its budget is refused before Prefect starts, in the
    # cycle's words, --pilot-anyway included (it started a pilot flow run that failed inside)
    pilot_batches.abort("dense-plan", actor="olga", reason="test")
    run_id = _missed_budget_challenger("dense-plan")
    out = run_cli("pilot", "dense-plan", "--pilot-anyway", user="olga", env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: dense-plan: not piloted: no sparse plan met the quality budget (calibration run {run_id}): "
        "stays dense, not piloted; nothing was started, --pilot-anyway included (the challenger is the "
        "dense model)"
    )
    assert "Flow run" not in out.stderr and "Task run" not in out.stderr, out.stderr
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before
    assert _pilots("dense-plan") == 1


def _missed_budget_challenger(name: str) -> int:
    """A new challenger of `name` whose calibration missed the quality budget (neither part sparse), as the
    calibrate flow records one. Returns its calibration run's id."""
    from rollout.db.models import CalibrationRun, ModelVersion
    from rollout.db.session import session_scope
    from rollout.pilots import get_use_case
    from sparse_core import SparsePlan

    plan = SparsePlan(tau=1.0)
    with session_scope() as s:
        uc = get_use_case(s, name)
        mv = ModelVersion(use_case_id=uc.id, base_model_ref="m", plan=plan.to_dict(), plan_hash="d" * 64)
        s.add(mv)
        s.flush()
        run = CalibrationRun(
            idempotency_key=f"calibrate:{name}:missed",
            use_case_id=uc.id,
            spec_version=1,
            status="succeeded",
            model_version_id=mv.id,
            metrics={"met_budget": False, "prefill_met_budget": False},
        )
        s.add(run)
        s.flush()
        return run.id
