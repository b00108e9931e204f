"""The use-case page's "Speed-up" was the prefill's alone, unlabelled: a decode-only plan read "Speed-up
0.97x [0.93x, 1.01x]" beside "$5,603/month saved", and the per-request 1.55x the dollars rest on showed
only in a breakdown row (review s46 D4). Real `add_usecase`, the ROI from `roi_for_spec` and
`decode_outcome`, recorded through `runs.evaluation_succeeded`."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from tests.dashboard.apptest_helpers import new_app, open_page


def test_a_decode_only_plan_shows_the_per_request_speed_up_its_dollars_rest_on(
    dash_env, tmp_path: Path
) -> None:  # noqa: ANN001
    from rollout import roi, runs
    from rollout.db.models import ModelVersion, UseCase
    from rollout.db.session import session_scope
    from rollout.spec import load_spec
    from rollout.usecases import add_usecase
    from tests.rollout.usecase_helpers import example_spec, write_spec, write_tiny_model

    spec = {
        **example_spec(),
        "name": "agent",
        "model": str(write_tiny_model(tmp_path / "model", context=2048)),
    }
    path = write_spec(tmp_path / "agent", spec)
    add_usecase(path, actor="test-owner")
    with session_scope() as s:
        uc = s.scalar(select(UseCase).where(UseCase.name == "agent"))
        mv = ModelVersion(
            use_case_id=uc.id, base_model_ref=spec["model"], plan={}, plan_hash="p", density=1.0
        )
        s.add(mv)
        s.flush()
        ids = uc.id, mv.id
    # prefill keeps every block, timed 0.97x [0.93, 1.01]; decode measured sparse at 64 [60, 68] tok/s vs 40
    res = roi.roi_for_spec(
        load_spec(path),
        dense_tps=2000.0,
        sparse_tps=2000.0 * 0.97,
        speedup_interval=(0.93, 1.01),
        decode_tps=40.0,
        sparse_decode_tps=64.0,
        sparse_decode_interval=(60.0, 68.0),
    )
    out = res.to_dict()
    summary = {
        "sparse_decode": True,
        "break_even_tokens": 128,
        "context_tokens": [300, 700],
        "density": 0.4,
        "weighted_speedup": 1.6,
        "weighted_speedup_low": 1.5,
        "weighted_speedup_high": 1.7,
    }
    out["decode"] = roi.decode_outcome({"summary": summary, "rows": [{"extra": {}}]}, res)
    run = runs.open_evaluation(*ids, "evaluate:agent", None)
    runs.evaluation_succeeded(
        "agent",
        run["id"],
        report={"device": "cuda", "density": 1.0},
        roi=out,
        mlflow_run_id="m",
        spec_version=1,
    )
    assert res.effective_speedup > 1.0 > res.inputs.speedup

    at = new_app()
    at.query_params["name"] = "agent"
    open_page(at, "use_case")
    shown = {m.label: m.value for m in at.metric}
    assert "Speed-up" not in shown
    assert shown["Prefill speed-up"] == "0.97x [0.93x, 1.01x]"
    low, high = res.effective_speedup_low, res.effective_speedup_high
    assert shown["Per-request speed-up"] == f"{res.effective_speedup:.2f}x [{low:.2f}x, {high:.2f}x]"
