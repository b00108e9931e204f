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

from tests.fixtures.trust import run_cli
from tests.rollout.test_not_piloted import DENSE, _challenger, _pilots


def test_an_import_refused_as_not_piloted_names_the_import(trust_env, tmp_path: Path) -> None:  # noqa: ANN001
    _challenger(tmp_path, "dense-plan", **DENSE)
    f = tmp_path / "obs.jsonl"
    row = {"request_id": "r1", "arm": "control", "quality": 1.0, "latency_ms": 10, "error": False}
    f.write_text(json.dumps(row) + "\n")
    out = run_cli("pilot", "dense-plan", "--observations", str(f), user="olga")
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: dense-plan: not piloted: the plan keeps 100.00% of blocks"), err
    assert f"(`sparsepilot pilot dense-plan --observations {f} --pilot-anyway` pilots it regardless)" in err
    assert _pilots("dense-plan") == 0


def test_pilot_refuses_a_plan_not_piloted_before_any_flow_run(
    trust_env, prefect_harness: str, tmp_path: Path
) -> None:  # noqa: ANN001
    from prefect.client.orchestration import get_client

    _challenger(tmp_path, "dense-plan", **DENSE)
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    out = run_cli("pilot", "dense-plan", user="olga", env={**os.environ, "PREFECT_API_URL": prefect_harness})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: dense-plan: not piloted: the plan keeps 100.00% of blocks (as dense): nothing to pilot; "
        "nothing was started (`sparsepilot pilot dense-plan --pilot-anyway` pilots it regardless)"
    )
    assert "Flow run" not in out.stderr and "Task run" not in out.stderr, out.stderr
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # no (Failed) pilot run left in Prefect
    assert _pilots("dense-plan") == 0
