"""Calibration to the use case's task (budget.task_delta) and the per-layer estimator choice."""

from __future__ import annotations

import pytest
import torch

from sparse_core import sparsify, unsparsify
from sparse_core.calibration import (
    Budget,
    BudgetError,
    CalibrationLimits,
    Sensitivity,
    allocate_choice,
    calibrate,
    calibrate_many,
    task_scores,
)
from sparse_core.task_bound import drop_upper_bound, rows_to_certify
from sparse_core.tasks import TaskRow

LIMITS = CalibrationLimits(
    max_texts=4, max_seq_len=768, taus=(0.3, 0.5, 0.7, 0.9), max_joint_checks=4, max_task_rows=8
)
LOOSE = "kl=1,agree=0.3"  # fidelity never binds: only the task bound can


@pytest.fixture(scope="module")
def task_rows(quality_tiny, quality_texts):
    """16 loglik rows (600-token prompt, the next 32 tokens as reference); even rows calibrate, odd
    rows are the held-out split."""
    _, tok = quality_tiny
    rows = []
    for t in quality_texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= 700:
            rows.append(TaskRow(prompt=tok.decode(ids[:600]), reference=tok.decode(ids[600:632])))
        if len(rows) == 16:
            break
    return rows[::2], rows[1::2]


def _delta(model, tok, plan, rows) -> float:
    dense, _ = task_scores(model, tok, rows, "loglik", LIMITS, dense=True)
    sparsify(model, plan)
    try:
        sparse, _ = task_scores(model, tok, rows, "loglik", LIMITS, dense=False)
    finally:
        unsparsify(model)
    return (sum(dense) - sum(sparse)) / len(rows)


def test_too_few_rows_to_certify_the_bound_keep_the_plan_dense(quality_tiny, quality_texts, task_rows):
    model, tok = quality_tiny
    cal, _ = task_rows
    # A random-weight model puts ~1/500 probability on every token, so task scores are ~0.002 and
    # what sparsity changes is ~1e-5; a valid bound of 1e-6 on drops in [-1, 1] needs millions of rows.
    free, free_rep = calibrate(model, tok, quality_texts, LOOSE, seed=3, limits=LIMITS)
    assert free_rep.task is None and free_rep.met_budget and free_rep.density < 1.0
    plan, rep = calibrate(
        model, tok, quality_texts, f"{LOOSE},task=1e-6", seed=3, limits=LIMITS, task_rows=cal, task="loglik"
    )
    assert rep.task["certifiable"] is False and rep.task["rows_needed"] is None
    assert rep.search == [] and not rep.met_budget and rep.density == 1.0
    assert len(plan.dense_layers) == model.config.num_hidden_layers
    assert rep.task["task_delta"] == 0.0 and rep.task["n_rows"] == len(cal)


def test_task_bound_holds_on_the_heldout_split(quality_tiny, quality_texts, task_rows):
    model, tok = quality_tiny
    cal, held = task_rows
    # the loosest bound 8 rows can certify at the search's per-step level (4 steps: alpha 0.05 / 4)
    bound = 0.5
    assert rows_to_certify(bound, alpha=0.05 / 4) == 8 > rows_to_certify(bound)
    plan, rep = calibrate(
        model,
        tok,
        quality_texts,
        f"{LOOSE},task={bound}",
        seed=3,
        limits=LIMITS,
        task_rows=cal,
        task="loglik",
    )
    assert rep.task["bound"] == bound and rep.task["n_rows"] == len(cal) == rep.task["rows_needed"]
    assert rep.task["alpha"] == 0.05 and rep.task["step_alpha"] == pytest.approx(0.05 / 4)
    assert rep.task["certifiable"] and rep.met_budget and rep.density < 1.0
    assert rep.task["task_delta"] <= rep.task["task_delta_upper"] < bound
    assert plan.metadata["task"] == rep.task
    assert all(s.task_delta is not None for s in rep.search if s.fidelity["agree"] >= 0.3)
    assert _delta(model, tok, plan, cal) == pytest.approx(rep.task["task_delta"], abs=1e-9)
    assert _delta(model, tok, plan, held) < bound


def test_task_bound_needs_rows_and_parses():
    assert Budget.parse("kl=0.01,task=0.03").task_delta == 0.03
    assert Budget.from_mapping({"agree": 0.98, "task_delta": 0.02}).task_delta == 0.02
    with pytest.raises(BudgetError, match="task_delta"):
        Budget(task_delta=-1)
    with pytest.raises(BudgetError, match="needs task rows"):
        calibrate(None, None, ["a", "b"], "kl=0.01,task=0.01")


def _sens(err: list[list[float]], dens: list[list[float]]) -> Sensitivity:
    """One selection head, taus (0.5, 0.9): err/dens per layer x tau."""
    e = torch.tensor(err)[:, :, None]
    d = torch.tensor(dens)[:, :, None]
    return Sensitivity((0.5, 0.9), e, d, heads=1, group=1)


def test_each_layer_takes_the_estimator_that_keeps_fewer_blocks():
    a = _sens([[0.01, 0.001], [0.2, 0.1]], [[0.3, 0.5], [0.2, 0.4]])  # good on layer 0 only
    b = _sens([[0.01, 0.001], [0.01, 0.001]], [[0.4, 0.6], [0.3, 0.5]])  # layer 1 only works with b
    lo, ho, dense, pred, dmat, chosen = allocate_choice({"a": a, "b": b}, 0.02, per_head=True)
    assert chosen == ["a", "b"]
    assert lo[0] == {"tau": 0.5} and lo[1] == {"tau": 0.5, "estimator": "b"}
    assert dense == () and pred == pytest.approx((0.3 + 0.3) / 2)
    _, _, dense, _, _, chosen = allocate_choice({"a": a}, 0.02, per_head=True)
    assert dense == (1,), "alone, estimator a keeps layer 1 dense"


def test_mixed_plan_records_layer_estimators_and_runs(quality_tiny, quality_texts):
    model, tok = quality_tiny
    out = calibrate_many(
        model,
        tok,
        quality_texts,
        LOOSE,
        estimators=("quest+pooled", "pooled", "quest"),
        seed=3,
        limits=LIMITS,
    )
    mixed, rep = out["quest+pooled"]
    n = model.config.num_hidden_layers
    assert len(rep.layer_estimators) == n and plan_estimators(mixed) == rep.layer_estimators
    assert mixed.metadata["layer_estimators"] == rep.layer_estimators
    assert rep.estimator == "quest+pooled" and mixed.estimator == "quest"
    # the per-layer choice is never worse than either estimator alone at the same eps grid
    assert (
        rep.predicted_density
        <= min(out["pooled"][1].predicted_density, out["quest"][1].predicted_density) + 1e-6
    )
    sparsify(model, mixed)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1] * 300]))
    finally:
        unsparsify(model)


def plan_estimators(plan) -> list[str]:
    return [
        "dense" if i in plan.dense_layers else plan.layer_params(i).estimator
        for i in range(len(plan.metadata["layer_density"]))
    ]


def test_cli_calibrate_bounds_the_task_and_reports_the_heldout_split(
    quality_tiny_dir, quality_texts, task_rows, tmp_path
):
    import json

    from typer.testing import CliRunner

    from sparsepilot.cli import app

    cal, held = task_rows
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": r.prompt, "reference": r.reference}) + "\n" for r in cal + held)
    )
    args = [
        "calibrate",
        "--model",
        str(quality_tiny_dir),
        "--out",
        str(tmp_path / "plan"),
        "--estimator",
        "pooled",
    ]
    args += ["--max-texts", "4", "--seq-len", "768", "--json"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--texts", "stdlib", "--budget", "kl=1,agree=0.3,task=1e-6"])
    assert res.exit_code == 2 and "need --dataset" in res.output
    res = runner.invoke(
        app,
        [
            *args,
            "--texts",
            "dataset",
            "--dataset",
            str(data),
            "--task",
            "loglik",
            "--budget",
            "kl=1,task=0.8",  # 8 rows (max_task_rows) certify 0.8 at the 7-step search's level
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "plan" / "calibration_report.json").read_text())
    t = report["task"]
    assert t["certifiable"] and report["met_budget"] and report["density"] < 1.0
    assert t["bound"] == 0.8 and t["task_delta"] <= t["task_delta_upper"] < 0.8 and t["heldout_rows"] > 0
    assert t["heldout_task_delta"] < 0.8 and t["step_alpha"] >= 0.05 / 7
    res = runner.invoke(
        app, [*args[:-1], "--texts", "dataset", "--dataset", str(data), "--budget", "kl=1,task=1e-6"]
    )
    assert res.exit_code == 0, res.output
    assert "cannot be certified from" in res.output and "the plan stays dense" in res.output


def test_each_plan_carries_only_the_weights_it_uses(quality_tiny, quality_texts):
    model, tok = quality_tiny
    lim = CalibrationLimits(max_texts=4, max_seq_len=512, taus=(0.5, 0.9), max_joint_checks=2, gate_steps=5)
    out = calibrate_many(
        model, tok, quality_texts, LOOSE, estimators=("pooled", "gate", "gate_v2+pooled"), limits=lim
    )
    assert out["pooled"][0].tensors == {} and "gate_weights" not in out["pooled"][0].metadata
    assert {k.split(".")[0] for k in out["gate"][0].tensors} == {"gate"}
    assert {k.split(".")[0] for k in out["gate_v2+pooled"][0].tensors} == {"gate_v2"}
    assert out["gate"][1].gate_training["steps"] == 5


def test_sensitivities_can_come_from_windows_kept_apart_from_gate_training(quality_tiny, quality_texts):
    model, tok = quality_tiny
    lim = CalibrationLimits(
        max_texts=5, max_seq_len=512, taus=(0.5, 0.9), max_joint_checks=2, gate_steps=3, sensitivity_windows=1
    )
    out = calibrate_many(model, tok, quality_texts, LOOSE, estimators=("pooled", "gate_v2"), limits=lim)
    for spec in ("pooled", "gate_v2"):  # one call: every spec's sensitivities from the same window
        rep = out[spec][1]
        assert (rep.n_calibration_windows, rep.n_sensitivity_windows) == (4, 1)
        assert out[spec][0].metadata["calibration"]["n_sensitivity_windows"] == 1
    # of the 3 windows left it trains on 2 and stops early on the third
    assert out["gate_v2"][1].gate_training["n_sequences"] == 2
    # nothing learned: every calibration window serves the sensitivities
    ((_, free),) = calibrate_many(
        model, tok, quality_texts, LOOSE, estimators=("pooled",), limits=lim
    ).values()
    assert (free.n_calibration_windows, free.n_sensitivity_windows) == (4, 4)
    few = CalibrationLimits(**{**lim.__dict__, "sensitivity_windows": 4})
    with pytest.raises(ValueError, match=r"sensitivity_windows=4: the calibration texts fill 4 window"):
        calibrate_many(model, tok, quality_texts, LOOSE, estimators=("gate_v2",), limits=few)
    with pytest.raises(ValueError, match="sensitivity_windows must be >= 0"):
        CalibrationLimits(sensitivity_windows=-1)


def test_a_plan_that_gives_no_score_on_a_row_fails_that_row_and_a_broken_dense_model_is_an_error(
    quality_tiny, task_rows
) -> None:
    """A model under test whose logits turn NaN on some rows (here the input embedding of one token, so
    every row holding it) scores those rows as failed answers (0 for loglik), counted, and the drop's
    bound is then computed on them, where before a NaN drop stopped the calibration with an error; the
    same model as the dense reference is an error naming the first row it broke on. The evaluation's
    scoring (`score_dataset`) follows the same rule."""
    import copy

    from sparse_core.tasks import ScoreError, score_dataset

    model, tok = quality_tiny
    rows = task_rows[0] + task_rows[1]
    ids = [set(tok(r.prompt + " " + r.reference, add_special_tokens=False)["input_ids"]) for r in rows]
    counts: dict[int, int] = {}
    for row_ids in ids:
        for t in row_ids:
            counts[t] = counts.get(t, 0) + 1
    token = max((t for t, c in counts.items() if c <= len(rows) // 2), key=lambda t: counts[t])
    breaks = [i for i, row_ids in enumerate(ids) if token in row_ids]
    assert 0 < len(breaks) < len(rows)

    broken = copy.deepcopy(model)
    weight = broken.get_input_embeddings().weight.detach().clone()
    weight[token] = float("nan")
    broken.get_input_embeddings().weight = torch.nn.Parameter(weight)

    dense, none_failed = task_scores(model, tok, rows, "loglik", LIMITS, dense=True)
    sparse, failed = task_scores(broken, tok, rows, "loglik", LIMITS, dense=False)
    assert none_failed == 0 and failed == len(breaks)
    assert [i for i, q in enumerate(sparse) if q == 0.0] == breaks
    assert all(sparse[i] == pytest.approx(dense[i]) for i in range(len(rows)) if i not in breaks)
    drops = [d - q for d, q in zip(dense, sparse, strict=True)]
    mean, upper = sum(drops) / len(drops), drop_upper_bound(drops, m0=0.5)
    assert mean == pytest.approx(sum(dense[i] for i in breaks) / len(rows)) and upper >= mean

    first = breaks[0] + 1
    with pytest.raises(ScoreError, match=rf"^task row {first}: the dense model's loglik score is nan"):
        task_scores(broken, tok, rows, "loglik", LIMITS, dense=True)

    scored = score_dataset(broken, tok, rows, max_new_tokens=4, reference_model=False)
    assert [i for i, r in enumerate(scored.per_row) if r.failed] == breaks
    assert all(r.quality == 0.0 for r in scored.per_row if r.failed)
    with pytest.raises(ScoreError, match=r"the model or the task is broken"):
        score_dataset(broken, tok, rows, max_new_tokens=4, reference_model=True)
