"""A pilot batch's MLflow run gives the latencies the gate judges: its `{arm}_latency_p50_ms` took the rows
timed while the host was overloaded among the rest (their latency is the host's; the gate's p95s and
latency guardrail leave them out), and said nothing of them. Real MLflow (the test's home), a real state
DB, a batch logged as the pilot flow logs it and one logged later from its stored rows."""

from __future__ import annotations

from typing import Any


def _pilot_runs(name: str) -> dict[str, dict[str, float]]:
    from rollout import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.experiment_name(name))
    found = c.search_runs([exp.experiment_id], "tags.`sparsepilot.flow` = 'pilot'")
    return {r.data.params["batch_id"]: r.data.metrics for r in found}


def test_a_batchs_latency_metrics_leave_out_the_overloaded_rows_and_count_them(flow_use_case) -> None:
    from flows.common import load_context
    from flows.pilot import log_batch, log_missing_batches
    from rollout import pilot_batches, runs

    name = flow_use_case()
    ctx = load_context(name)
    runs.record_unregistered_challenger(name, ctx.spec.model, key="no-model")
    info = pilot_batches.ensure_pilot(name)
    ids = [r.id for r in ctx.traffic(info["salt"]).take(10, set())]

    def rows(request_ids: list[str], overloaded: Any) -> list[dict[str, Any]]:
        return [
            {
                "request_id": rid,
                "arm": arm,
                "quality": 0.8,
                "latency_ms": 5000.0 if overloaded(arm, i) else 100.0 + i,
                "tokens": 16,
                "error": False,
                "overloaded": overloaded(arm, i),
            }
            for i, rid in enumerate(request_ids)
            for arm in ("control", "treatment")
        ]

    # as the pilot flow logs it, from the rows its arms answered: 3 of 5 treatment rows left out
    live = rows(ids[:5], lambda arm, i: arm == "treatment" and i < 3)
    stored = pilot_batches.store_batch(info["step_id"], live, "b-live", "pilot-flow")
    log_batch.fn(ctx, info, live, stored, "pilot-flow", "b-live")
    # logged later from its stored rows (its first log failed): every control row left out
    pilot_batches.store_batch(info["step_id"], rows(ids[5:], lambda arm, i: arm == "control"), "b-late", "x")
    log_missing_batches.fn(ctx)

    logged = _pilot_runs(name)
    m = logged["b-live"]
    assert m["treatment_latency_p50_ms"] == 104.0 and m["treatment_latency_rows_left_out"] == 3.0
    assert m["control_latency_p50_ms"] == 102.0 and m["control_latency_rows_left_out"] == 0.0
    assert m["treatment_n"] == m["control_n"] == 5.0  # quality and errors count every row
    late = logged["b-late"]
    assert "control_latency_p50_ms" not in late and late["control_latency_rows_left_out"] == 5.0
    assert late["treatment_latency_p50_ms"] == 102.0 and late["treatment_latency_rows_left_out"] == 0.0
