"""`sparsepilot bench decode-scorers`: the statistics over prompts (pure; their coverage by simulation),
the end-to-end run on a tiny model, and bad options refused with exit 2 naming the option."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from sparse_core.bench.decode_scorers import (
    _pages_ratio,
    _pages_ratios,
    budget_at_kl,
    equal_kl_pages,
    expanded_tail,
    mean_interval,
    paired_kl_ratio,
)
from sparsepilot.cli import app

BUDGETS = [512, 1024, 2048]


def _covers(hits: int, reps: int, level: float) -> bool:
    """Is `level` inside the exact 99.9% binomial interval of hits / reps?"""
    ci = stats.binomtest(hits, reps).proportion_ci(confidence_level=0.999)
    return ci.low <= level <= ci.high


def test_budget_at_kl_inverts_a_power_law_and_never_extrapolates():
    kls = [0.08 * (b / 512) ** -2 for b in BUDGETS]  # KL falls as budget^-2
    assert budget_at_kl(BUDGETS, kls, 0.08 * (700 / 512) ** -2) == pytest.approx(700)
    assert budget_at_kl(BUDGETS, kls, kls[1]) == pytest.approx(1024)
    assert budget_at_kl(BUDGETS, kls, 1.0) is None  # above every measured KL
    assert budget_at_kl(BUDGETS, kls, 1e-4) is None  # below every one
    assert budget_at_kl(BUDGETS, [0.1, 0.01, 0.05], 0.03) == pytest.approx(
        512 * 2 ** (math.log(10 / 3) / math.log(10))
    )


def test_equal_kl_pages_finds_the_budget_factor_and_says_which_side_it_leaves():
    b = np.array(BUDGETS, float)[None]
    scale = np.linspace(0.5, 2.0, 10)[:, None]  # prompts differ in level, not in shape
    ref = scale * (b / 512) ** -2
    other = scale * (1.5 * b / 512) ** -2  # reads 1.5x fewer pages for any KL
    rows = equal_kl_pages(BUDGETS, ref, other, resamples=400)
    assert rows[0]["pages_ratio"] is None and rows[0]["beyond"] == "fewer"  # would need < 512
    for r in rows[1:]:
        assert r["pages_ratio"] == pytest.approx(1.5) and r["beyond"] is None
        assert r["pages_ratio_lo"] == pytest.approx(1.5) and r["pages_ratio_hi"] == pytest.approx(1.5)
    assert rows[1]["equal_kl_budget"] == pytest.approx(1024 / 1.5)
    worse = equal_kl_pages(BUDGETS, other, ref, resamples=400)  # the other way round
    assert worse[2]["pages_ratio"] is None and worse[2]["beyond"] == "more"
    assert worse[0]["pages_ratio"] == pytest.approx(1 / 1.5)
    with pytest.raises(ValueError, match="prompts"):
        equal_kl_pages(BUDGETS, ref, other[:, :2])


@pytest.mark.parametrize("n", [8, 12])
def test_the_kl_ratio_interval_covers_the_geometric_mean_ratio(n):
    """Per-prompt log ratios normal (the KL of one prompt is lognormal-ish across scorers): the t
    interval over prompts covers the true geometric mean ratio 95% of the time."""
    rng = np.random.default_rng(n)
    reps, true = 4000, 0.6
    base = rng.lognormal(-5, 1.0, size=(reps, n))  # prompts' own KL levels: they cancel in the ratio
    other = base * true * rng.lognormal(0, 0.5, size=(reps, n))
    hits = 0
    for a, b in zip(base, other, strict=True):
        r = paired_kl_ratio(a, b)
        hits += r["kl_ratio_lo"] <= true <= r["kl_ratio_hi"]
    assert _covers(hits, reps, 0.95), hits / reps


def test_the_sign_test_holds_its_level_when_neither_scorer_is_better():
    rng = np.random.default_rng(3)
    reps, n = 4000, 12
    a = rng.lognormal(-5, 1.0, size=(reps, n))
    b = a * rng.lognormal(0, 0.5, size=(reps, n))  # symmetric around a ratio of 1
    rejected = sum(paired_kl_ratio(x, y)["sign_p"] < 0.05 for x, y in zip(a, b, strict=True))
    assert stats.binomtest(int(rejected), reps, 0.05, alternative="greater").pvalue > 0.001, rejected / reps
    r = paired_kl_ratio([0.1] * 10, [0.01] * 10)  # lower on every prompt
    assert r["lower_kl"] == 10 and r["higher_kl"] == 0 and r["sign_p"] == pytest.approx(2 * 0.5**10)


def test_the_pages_ratio_interval_covers_at_a_dozen_prompts():
    """The expanded percentile bootstrap at 12 prompts, KL falling as budget^-2 with prompt levels
    (cv 0.5) and per-(prompt, budget) noise (cv 0.3): it covers the true ratio (1.5) about 95% of the
    time (measured 0.94-0.95 with 400 draws; the plain percentile interval 0.90)."""
    rng = np.random.default_rng(11)
    reps, n, true = 300, 12, 1.5
    b = np.array(BUDGETS, float)[None]
    hits = 0
    for i in range(reps):
        level = rng.lognormal(0, 0.5, size=(n, 1))
        ref = level * (b / 512) ** -2 * rng.lognormal(0, 0.3, size=(n, 3))
        other = level * (true * b / 512) ** -2 * rng.lognormal(0, 0.3, size=(n, 3))
        r = equal_kl_pages(BUDGETS, ref, other, resamples=1000, seed=i)[1]
        hits += (r["pages_ratio_lo"] or 0) <= true <= (r["pages_ratio_hi"] or math.inf)
    assert hits / reps >= 0.90, hits / reps
    assert expanded_tail(0.95, 12) < 0.025 < expanded_tail(0.95, 1000) + 1e-3


@pytest.mark.parametrize("n_budgets", [1, 3, 5])
def test_the_bootstraps_ratios_at_once_are_the_one_at_a_time_ratios(n_budgets: int) -> None:
    """The bootstrap takes every resample's ratio at once (_pages_ratios): the same first downward
    crossing, interpolation and inf / 0 / NaN ends as _pages_ratio, on rising, falling, flat, tied and
    floored (zero) KL curves."""
    rng = np.random.default_rng(n_budgets)
    budgets = [64.0, 128.0, 512.0, 1024.0, 4096.0][:n_budgets]
    shape = (400, n_budgets)
    cases = [
        (rng.lognormal(0, 2, shape), rng.lognormal(0, 2, shape)),
        (-np.sort(-rng.lognormal(0, 1, shape)), -np.sort(-rng.lognormal(0, 1, shape))),
        (rng.choice([0.0, 1e-12, 0.5, 1.0], shape), rng.choice([0.0, 1e-12, 0.5, 1.0], shape)),
        (rng.choice([0.1, 0.2], shape), np.repeat(rng.choice([0.1, 0.2], (400, 1)), n_budgets, axis=1)),
    ]
    for ref, other in cases:
        for j in range(n_budgets):
            one = np.array([_pages_ratio(budgets, r, o, j) for r, o in zip(ref, other, strict=True)])
            np.testing.assert_allclose(_pages_ratios(budgets, ref, other, j), one, rtol=1e-12)


def test_mean_interval_is_students_t():
    m, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = stats.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2
    assert (m, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert math.isnan(mean_interval([1.0])[1])


def test_bench_decode_scorers_on_a_tiny_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "scorers.json"
    args = ["bench", "decode-scorers", "--model", str(tiny_llama_dir), "--budgets", "64,128,4096"]
    r = CliRunner().invoke(
        app,
        [*args, "--prompts", "3", "--prompt-tokens", "512", "--new-tokens", "4", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["scorers"] == ["quest", "page_gate"] and res["reference"] == "quest"
    assert res["prompt_tokens"] == 512 and res["page_gate_training"]["windows"] == 2
    rows = {(p["scorer"], p["budget"]): p for p in res["plan_rows"]}
    assert set(rows) == {(s, b) for s in ("quest", "page_gate") for b in (64, 128, 4096)}
    for s in ("quest", "page_gate"):
        assert rows[s, 64]["density"] < rows[s, 128]["density"] < 0.5
        assert rows[s, 4096]["kl"] < 1e-6 and rows[s, 4096]["agree"] == 1  # the budget covers the cache
        assert all(len(v) == 3 for v in res["per_prompt"][s]["64"].values())
    pairs = res["pair_rows"]
    assert [(p["scorer"], p["against"], p["budget"]) for p in pairs] == [
        ("page_gate", "quest", b) for b in (64, 128, 4096)
    ]
    assert all(p["lower_kl"] + p["higher_kl"] <= 3 and 0 < p["sign_p"] <= 1 for p in pairs)
    assert (tmp_path / "scorers.png").is_file()
    log = (tmp_path / "scorers.log").read_text()
    assert "prompt 3/3: 6 plans scored" in log and "page gate training" in log


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--scorers", "quest"], "--scorers"),
        (["--scorers", "quest,magic"], "--scorers"),
        (["--scorers", "quest,quest"], "--scorers"),
        (["--scorers", "quest,gate_v2"], "--scorers gate_v2: these read a plan's learned weights"),
        (["--budgets", "512"], "--budgets"),
        (["--budgets", "a,b"], "--budgets"),
        (["--prompts", "1"], "--prompts"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--plan", "/nonexistent/plan"], "--plan /nonexistent/plan"),
    ],
)
def test_bench_decode_scorers_refuses_bad_options(option, message, tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["bench", "decode-scorers", *option, "--out", str(out)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists()


def test_bench_decode_scorers_names_the_option_when_the_corpus_is_too_short(tiny_llama_dir, tmp_path):
    out = tmp_path / "s.json"
    args = ["--model", str(tiny_llama_dir), "--prompts", "500", "--prompt-tokens", "2000", "--out", str(out)]
    r = CliRunner().invoke(app, ["bench", "decode-scorers", *args])
    assert r.exit_code == 2 and "--prompts 500" in r.output, r.output
    assert not out.exists()


def test_bench_decode_scorers_cuts_its_prompts_from_a_use_cases_own_text(tiny_llama_dir, tmp_path):
    """--texts FILE: the prompts (and page_gate's training windows) come from that file, here a sample
    use case's dataset (its prompts and references), and the result says so; a file too short for the
    prompts asked, or no file, is a one-line error naming it, exit 2, nothing written."""
    dataset = Path(__file__).resolve().parents[2] / "examples" / "usecases" / "docs_qa.jsonl"
    out = tmp_path / "s.json"
    base = ["bench", "decode-scorers", "--model", str(tiny_llama_dir), "--budgets", "64,128"]
    base += ["--prompt-tokens", "256", "--new-tokens", "3", "--out", str(out)]
    r = CliRunner().invoke(app, [*base, "--prompts", "2", "--texts", str(dataset)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["texts"] == str(dataset) and res["prompt_tokens"] == 256
    assert res["page_gate_training"]["windows"] == 2
    assert all(len(res["per_prompt"][s]["64"]["kl"]) == 2 for s in ("quest", "page_gate"))
    out.unlink()
    short = tmp_path / "short.jsonl"
    short.write_text(
        "".join(json.dumps({"text": f"Question {i}: where is the manual?"}) + "\n" for i in range(3))
    )
    r = CliRunner().invoke(app, [*base, "--prompts", "2", "--texts", str(short)])
    assert r.exit_code == 2 and f"{short} holds 0 window(s) of 256 tokens" in " ".join(r.output.split())
    r = CliRunner().invoke(app, [*base, "--prompts", "2", "--texts", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "texts file not found" in r.output, r.output
    assert not out.exists()


def test_bench_decode_scorers_reads_a_plans_learned_weights(tiny_llama_dir, tmp_path):
    from tests.sparse_core.test_bench_decode import _gate_v2_plan_dir

    plan = _gate_v2_plan_dir(tiny_llama_dir, tmp_path / "plan")
    out = tmp_path / "s.json"
    base = ["bench", "decode-scorers", "--model", str(tiny_llama_dir), "--scorers", "quest,gate_v2"]
    base += ["--plan", str(plan), "--budgets", "64,128", "--prompts", "2", "--prompt-tokens", "512"]
    r = CliRunner().invoke(app, [*base, "--out", str(out)])  # gate_v2 pools pages like the plan's blocks
    assert r.exit_code == 2 and "pass --page-size 32" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(app, [*base, "--page-size", "32", "--new-tokens", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["page_gate_training"] is None and res["page_size"] == 32
    assert [(p["scorer"], p["budget"]) for p in res["pair_rows"]] == [("gate_v2", 64), ("gate_v2", 128)]
