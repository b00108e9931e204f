"""Pure pieces of the pilot: deterministic arm assignment at the step's traffic %, the pilot's traffic
order (independent of the assignment hash), the CLI's two forms of calibrate/evaluate, and the
calibrate flow's limits from the spec."""

from __future__ import annotations

from collections.abc import Callable

from typer.testing import CliRunner


def test_arm_assignment_is_deterministic_and_follows_the_traffic_share() -> None:
    from rollout.pilots import assign_arm, hash_unit

    ids = [f"req-{i}" for i in range(20_000)]
    arms = [assign_arm(r, "salt-1", 10.0) for r in ids]
    assert arms == [assign_arm(r, "salt-1", 10.0) for r in ids]  # same request, same arm, every time
    share = arms.count("treatment") / len(arms)
    assert 0.09 < share < 0.11  # 10% +- 5 binomial sd (sd = 0.0021)
    assert sum(a != b for a, b in zip(arms, (assign_arm(r, "salt-2", 10.0) for r in ids), strict=True)) > 2000
    # a ramp only ever adds requests to the treatment arm
    assert all(
        assign_arm(r, "salt-1", 50.0) == "treatment"
        for r, a in zip(ids, arms, strict=True)
        if a == "treatment"
    )
    assert all(0.0 <= hash_unit(r, "s") < 1.0 for r in ids[:100])


def test_pilot_traffic_order_does_not_bias_the_split_and_never_replays() -> None:
    from rollout.pilots import assign_arm
    from rollout.traffic import DatasetSource

    rows = [{"id": f"r{i}", "prompt": "p"} for i in range(400)]
    source = DatasetSource(rows, "salt")
    used: set[str] = set()
    first = source.take(100, used)
    used.update(r.id for r in first)
    share = sum(assign_arm(r.id, "salt", 50.0) == "treatment" for r in first) / 100
    assert 0.3 < share < 0.7  # ordering by the assignment hash itself would give 1.0
    second = source.take(350, used)  # only 300 are left: the dataset is finite, nothing is replayed
    used.update(r.id for r in second)
    ids = [r.id for r in first + second]
    assert len(ids) == len(set(ids)) == 400 and set(ids) == {r["id"] for r in rows}
    assert source.take(10, used) == [] and source.remaining(used) == 0
    assert [r.id for r in DatasetSource(rows, "salt").take(5, set())] == ids[:5]  # stable per salt


def test_calibrate_has_a_use_case_form_and_a_standalone_form() -> None:
    from sparsepilot.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["calibrate"])
    assert res.exit_code == 2 and "give a use case NAME, or --model --texts --out" in res.output
    res = runner.invoke(app, ["calibrate", "some-use-case", "--model", "smollm2-135m"])
    assert res.exit_code == 2 and "either a use case NAME or --model" in res.output
    res = runner.invoke(app, ["evaluate", "--model", "smollm2-135m"])
    assert res.exit_code == 2 and "--plan" in res.output
    assert "--texts" in runner.invoke(app, ["calibrate", "--help"]).output


def test_main_job_sizes_extra_shadow_requests_by_the_projection_and_the_clock() -> None:
    from flows.main_job import extra_requests

    extend = {"outcome": "EXTEND", "projected_requests": 30, "n_pairs": 12}
    assert extra_requests(extend, seconds_per_request=10.0, seconds_left=1000.0) == 21  # 1.1 * 30 - 12
    assert extra_requests(extend, seconds_per_request=10.0, seconds_left=105.0) == 10  # what fits
    assert extra_requests(extend, seconds_per_request=10.0, seconds_left=95.0) == 0  # < half: no look
    assert extra_requests(extend, seconds_per_request=10.0, seconds_left=-1.0) == 0
    assert extra_requests({**extend, "outcome": "GO"}, 10.0, 1000.0) == 0
    assert extra_requests({**extend, "projected_requests": None}, 10.0, 1000.0) == 0
    split = {
        "outcome": "EXTEND",
        "projected_requests": 100,
        "n_pairs": None,
        "n_control": 40,
        "n_treatment": 10,
    }
    assert extra_requests(split, 1.0, 1000.0) == 60


def test_waits_for_quotes_the_gates_projection_in_the_steps_unit() -> None:
    from rollout.queries import waits_for

    running = {"pilot_status": "running", "decision": "EXTEND", "min_samples": 12}
    shadow = {**running, "step_kind": "shadow", "step_observations": 24}  # 12 requests, both arms
    assert waits_for(shadow) == "more samples (12, inconclusive)"
    assert waits_for({**shadow, "step_observations": 16}) == "more samples (8/12)"
    assert waits_for({**shadow, "projected_requests": 31}) == "more samples (12/~31)"
    split = {**running, "step_kind": "split", "step_observations": 40, "projected_requests": 400}
    assert waits_for(split) == "more samples (40/~400)"
    at_10pct = {**split, "projected_requests": None, "step_observations": 8}
    assert waits_for({**at_10pct, "decision_n_control": 8, "decision_n_treatment": 0}) == (
        "more samples (0/12 in the smaller arm)"
    )
    assert waits_for(
        {**at_10pct, "step_observations": 92, "decision_n_control": 80, "decision_n_treatment": 12}
    ) == ("more samples (92, inconclusive)")
    assert waits_for({**split, "decision": "GO", "awaiting": "approval"}) == "approval to promote"
    assert waits_for({**split, "decision": "GO"}) == "next gate look"  # the projection belongs to EXTEND


def _flow_limits(quick: bool, edit: Callable[[dict], None] | None = None) -> dict:
    """flows.calibrate.limits_for on docs-qa's example spec, after `edit` changed the spec's dict."""
    from pathlib import Path

    from flows.calibrate import limits_for
    from flows.common import UseCaseContext
    from rollout.spec import parse_spec
    from tests.rollout.usecase_helpers import example_spec

    data = example_spec("docs-qa")
    if edit is not None:
        edit(data)
    spec = parse_spec(data)
    ctx = UseCaseContext("docs-qa", 1, spec, 1, spec.content_hash(), Path("x.jsonl"), [])
    return limits_for(ctx, quick, None)


def _calibration(**settings: object) -> Callable[[dict], None]:
    return lambda d: d["quality_budget"].setdefault("calibration", {}).update(settings)


def _decode(**settings: object) -> Callable[[dict], None]:
    return lambda d: d["quality_budget"]["decode"].update(settings)


def test_calibrate_flow_takes_the_specs_drop_measure_and_keeps_old_run_keys() -> None:
    from sparse_core.calibration import CalibrationLimits

    for quick in (False, True):
        # the default stays out of the settings (the run's idempotency key) and means "mass"
        plain = _flow_limits(quick)
        assert "drop_measure" not in plain and _flow_limits(quick, _calibration(drop_measure="mass")) == plain
        assert CalibrationLimits(**plain).drop_measure == "mass"
        assert CalibrationLimits(**_flow_limits(quick, _calibration(drop_measure="output"))).drop_measure == (
            "output"
        )


def test_calibrate_flow_takes_the_specs_sensitivity_windows_and_keeps_its_windows() -> None:
    """quality_budget.calibration.sensitivity_windows reaches CalibrationLimits; unset, the run's
    settings (its idempotency key) are as before; quick mode keeps the spec's windows then, since
    quick's 2 calibration windows would leave the learned estimator none of its own."""
    from sparse_core.calibration import CalibrationLimits

    for quick in (False, True):
        assert "sensitivity_windows" not in _flow_limits(quick)
        assert _flow_limits(quick, _calibration(sensitivity_windows=0)) == _flow_limits(quick)
        apart = _flow_limits(quick, _calibration(sensitivity_windows=4))
        lim = CalibrationLimits(**apart)
        assert lim.sensitivity_windows == 4
        assert (lim.max_texts, lim.max_seq_len, lim.heldout_windows) == (8, 3072, 2)
    assert apart["max_joint_checks"] == 3  # the rest of quick still applies


def test_calibrate_flow_takes_the_specs_decode_confidence_and_keeps_old_run_keys() -> None:
    from sparse_core.calibration import CalibrationLimits

    bounded = _decode(confidence=0.95, n_prompts=12, new_tokens=16)  # over prompts: at least 10 at 0.95
    for quick in (False, True):
        unset = _flow_limits(quick)["decode"]  # earlier runs' settings keys hold
        assert "confidence" not in unset and "sensitivity_prompts" not in unset
        settings = _flow_limits(quick, bounded)
        lim = CalibrationLimits(**settings)
        # a bound needs its prompts: quick mode keeps the spec's prompts and generated tokens then,
        # and the candidates come from the spec's sensitivity windows beyond them
        assert lim.decode.confidence == 0.95 and (lim.decode.n_prompts, lim.decode.new_tokens) == (12, 16)
        assert lim.decode.sensitivity_prompts == 2
        assert "sensitivity_apart" not in settings["decode"] and not lim.decode.sensitivity_apart
    assert CalibrationLimits(**_flow_limits(True)).decode.new_tokens == 32
    # page_gate's sensitivity windows apart from its training windows reach the limits
    apart = _decode(
        confidence=0.95, n_prompts=12, new_tokens=16, estimator="page_gate", sensitivity_apart=True
    )
    assert CalibrationLimits(**_flow_limits(False, apart)).decode.sensitivity_apart is True


def test_calibrate_flow_takes_the_specs_calibration_confidence_and_keeps_its_windows() -> None:
    """quality_budget.calibration.confidence reaches CalibrationLimits with its unit; unset, the run's
    settings (its idempotency key) are as before; quick mode keeps the spec's windows then, since the
    spec was checked to hold out enough of them for the bound (quick's 1 held-out window would not)."""
    from sparse_core.calibration import CalibrationLimits

    for quick in (False, True):
        plain = _flow_limits(quick)
        assert "confidence" not in plain and "bound_unit" not in plain
        windows = _calibration(confidence=0.95, bound_unit="window", max_texts=44)
        lim = CalibrationLimits(**_flow_limits(quick, windows))
        assert (lim.confidence, lim.bound_unit) == (0.95, "window")
        assert (lim.max_texts, lim.max_seq_len, lim.heldout_windows) == (44, 3072, 11)
        assert CalibrationLimits(**_flow_limits(quick, _calibration(confidence=0.9))).bound_unit == "block"
    cheap = _flow_limits(True)
    assert (cheap["max_texts"], cheap["max_seq_len"]) == (3, 2048)  # quick as before
    assert _flow_limits(True, _calibration(confidence=0.95))["max_joint_checks"] == 3  # the rest of quick


def test_the_flows_device_follows_sparsepilot_device_and_refuses_what_it_cannot_use(monkeypatch) -> None:  # noqa: ANN001
    import pytest
    import torch

    from flows.common import pick_device
    from rollout.settings import SettingsError

    monkeypatch.delenv("SPARSEPILOT_DEVICE", raising=False)
    assert pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("SPARSEPILOT_DEVICE", "cpu")
    assert pick_device() == "cpu"
    monkeypatch.setenv("SPARSEPILOT_DEVICE", "gpu")
    # a SettingsError (a SparsePilotError: `error: ...`, exit 2 at the CLI; not retried by a task)
    with pytest.raises(SettingsError, match="SPARSEPILOT_DEVICE='gpu': device 'gpu': choose one of auto"):
        pick_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("SPARSEPILOT_DEVICE", "cuda")
        with pytest.raises(SettingsError, match="SPARSEPILOT_DEVICE='cuda'.*torch sees no CUDA device"):
            pick_device()
