"""One registry drives every estimator list: an estimator added through `register_estimator` alone (no
other edit) is accepted by the spec validator, the CLI (`calibrate`, `bench quality`) and calibration,
and run by the bench; a learned one is trained through its hook. Every registration is undone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sparse_core.bench.quality import default_specs
from sparse_core.estimators import (
    DEPLOYABLE_KINDS,
    KINDS,
    available_estimators,
    estimator_kind,
    get_estimator,
    get_training_hook,
    parse_estimator_spec,
    register_estimator,
    unregister_estimator,
)
from sparse_core.estimators.blocks import causal_block_mask, num_blocks, valid_blocks
from sparse_core.plan import PlanError
from sparsepilot.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS_QA = ROOT / "examples" / "usecases" / "docs-qa.yaml"
REGISTERED_AT_IMPORT = available_estimators()  # what the CLI's --help saw when it was imported


def uniform_scores(q, k, ctx):
    """Equal mass on every visible causal key block: a real (if naive) estimator."""
    b, hq, s, _ = q.shape
    n = num_blocks(s, ctx.block_size)
    allowed = causal_block_mask(n, q.device).expand(b, hq, n, n).float()
    vb = valid_blocks(ctx.key_valid, ctx.block_size, s)
    if vb is not None:
        allowed = allowed * vb[:, None, None, :]
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1.0)


@pytest.fixture
def dummy():
    register_estimator("dummy_uniform", uniform_scores)
    yield "dummy_uniform"
    unregister_estimator("dummy_uniform")


def test_builtins_by_kind_and_the_bench_default():
    assert available_estimators("training-free") == ["pooled", "antidiagonal", "quest", "sampled"]
    assert available_estimators("learned") == ["gate", "gate_v2"]
    assert available_estimators("exact-ceiling") == ["oracle"]
    assert available_estimators() == available_estimators(KINDS)
    assert default_specs() == (
        "pooled",
        "antidiagonal",
        "quest",
        "sampled",
        "gate",
        "gate_v2",
        "gate_v2+pooled",
        "oracle",
    )
    assert [n for n in available_estimators() if get_training_hook(n)] == ["gate", "gate_v2"]


def test_parse_estimator_spec_names_the_bad_part():
    assert parse_estimator_spec("gate_v2+pooled") == ("gate_v2", "pooled")
    with pytest.raises(PlanError, match="unknown estimator 'nope' in 'pooled\\+nope'"):
        parse_estimator_spec("pooled+nope")
    with pytest.raises(PlanError, match="'oracle' \\(exact-ceiling\\) is not allowed"):
        parse_estimator_spec("oracle", DEPLOYABLE_KINDS)
    with pytest.raises(PlanError, match="empty part"):
        parse_estimator_spec("pooled+")


def test_registration_is_checked_and_undone(dummy):
    assert dummy in available_estimators("training-free") and estimator_kind(dummy) == "training-free"
    assert default_specs().index(dummy) == default_specs().index("sampled") + 1
    with pytest.raises(ValueError, match="already registered"):
        register_estimator(dummy, lambda q, k, c: q)
    with pytest.raises(ValueError, match="kind must be one of"):
        register_estimator("dummy_other", uniform_scores, kind="heuristic")
    with pytest.raises(ValueError, match="without '\\+'"):
        register_estimator("a+b", uniform_scores)
    unregister_estimator(dummy)
    assert dummy not in available_estimators()
    with pytest.raises(PlanError, match="unknown estimator 'dummy_uniform'"):
        get_estimator(dummy)
    register_estimator(dummy, uniform_scores)  # for the fixture's teardown


def _spec(estimator: str) -> dict:
    spec = yaml.safe_load(DOCS_QA.read_text())
    spec["quality_budget"]["estimator"] = estimator
    return spec


def test_the_spec_validator_accepts_a_registered_estimator(dummy):
    from rollout.spec import SpecError, parse_spec

    assert parse_spec(_spec(dummy)).quality_budget.estimator == dummy
    assert parse_spec(_spec(f"gate_v2+{dummy}")).quality_budget.estimator == f"gate_v2+{dummy}"
    unregister_estimator(dummy)
    with pytest.raises(SpecError, match="quality_budget.estimator: unknown estimator 'dummy_uniform'"):
        parse_spec(_spec(dummy))
    register_estimator(dummy, uniform_scores)


def test_spec_validation_imports_no_torch():
    code = (
        "import sys, yaml; from rollout.spec import parse_spec; "
        f"s = yaml.safe_load(open({str(DOCS_QA)!r})); s['quality_budget']['estimator'] = 'gate_v2+pooled'; "
        "parse_spec(s); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_cli_lists_the_registry_and_calibrates_with_a_registered_estimator(
    dummy, tiny_llama_dir, tmp_path
):
    r = CliRunner().invoke(app, ["bench", "quality", "--help"])
    assert r.exit_code == 0 and all(name in r.output for name in REGISTERED_AT_IMPORT)
    args = ["calibrate", "--model", str(tiny_llama_dir), "--texts", "stdlib", "--quick", "--seq-len", "256"]
    r = CliRunner().invoke(app, [*args, "--estimator", "nope", "--out", str(tmp_path / "no")])
    assert r.exit_code == 2 and "--estimator: unknown estimator 'nope'" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--estimator", dummy, "--out", str(tmp_path / "plan"), "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["estimator"] == dummy


def test_the_bench_runs_a_registered_estimator(dummy, quality_tiny_dir, tmp_path):
    out = tmp_path / "quality.json"
    args = ["bench", "quality", "--model", str(quality_tiny_dir), "--lengths", "512", "--usecases", "none"]
    args += ["--max-texts", "4", "--max-checks", "2", "--no-speed", "--budget", "kl=0.05,agree=0.5"]
    r = CliRunner().invoke(app, [*args, "--estimators", f"pooled,{dummy}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (block,) = json.loads(out.read_text())["by_length"]
    rows = {row["estimator"]: row for row in block["rows"]}
    assert set(rows) == {"pooled", dummy}
    assert 0 < rows[dummy]["measured_density"] <= 1 and rows[dummy]["n_positions"] > 0


def test_calibration_trains_a_learned_estimator_and_loading_checks_its_weights(tiny_llama_dir, tmp_path):
    from sparse_core import load_model, plan_io
    from sparse_core.calibration import CalibrationLimits, calibrate
    from sparse_core.corpus import corpus_texts

    calls, checked = [], []

    def check(plan, config):
        checked.append(config.num_hidden_layers)
        if "dummy_learned.temperature" not in plan.tensors:
            raise PlanError("plan uses 'dummy_learned' but carries no dummy_learned weights")

    def train(model, windows, *, heldout_windows, limits, seed, progress):
        calls.append((len(windows), len(heldout_windows), limits.block_size, seed))
        return {"dummy_learned.temperature": torch.tensor([2.0])}, {"steps": 0, "note": "dummy"}

    def learned_scores(q, k, ctx):
        assert "dummy_learned.temperature" in ctx.plan.tensors  # the weights its hook returned
        return uniform_scores(q, k, ctx)

    register_estimator("dummy_learned", learned_scores, kind="learned", train=train, check=check)
    try:
        model, tok = load_model(str(tiny_llama_dir))
        lim = CalibrationLimits.quick(max_texts=4, max_seq_len=256)
        plan, report = calibrate(
            model, tok, corpus_texts("all"), "kl=0.05", estimator="dummy_learned", limits=lim
        )
        plan_io.save(plan, tmp_path / "plan", config=model.config)
        loaded = plan_io.load(tmp_path / "plan", config=model.config)
        assert checked == [2] and torch.equal(
            loaded.tensors["dummy_learned.temperature"], torch.tensor([2.0])
        )
        with pytest.raises(PlanError, match="carries no dummy_learned weights"):
            plan_io.check_tensors_fit(plan.with_(tensors={}), model.config)
    finally:
        unregister_estimator("dummy_learned")
    assert len(calls) == 1 and calls[0][0] >= 1 and calls[0][1:] == (1, 64, 0)
    assert list(plan.tensors) == ["dummy_learned.temperature"]
    assert report.gate_training == {"steps": 0, "note": "dummy"} and report.seconds["dummy_learned"] >= 0
