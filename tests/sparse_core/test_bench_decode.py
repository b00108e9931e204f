"""`sparsepilot bench decode` on a tiny model: it writes the JSON and tables it promises (timings are
printed, never asserted), and bad options exit 2 with a message naming the option."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparsepilot.cli import app


def test_bench_decode_on_a_tiny_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "decode.json"
    args = ["bench", "decode", "--quick", "--model", str(tiny_llama_dir), "--budgets", "128"]
    more = ["--page-size", "16", "--new-tokens", "4", "--threads", "1", "--runs", "2", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, *more])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    # the table's title wraps where the console's width and the JSON path's length put it
    assert result["runs"] == 2 and "geometric mean of 2 paired runs" in " ".join(r.output.split())
    assert [row["target_density"] for row in result["layer_rows"]] == [0.05, 0.1, 0.25]
    assert all(row["seq_len"] == 16384 and row["speedup"] > 0 for row in result["layer_rows"])
    # review M, M2: a model row's ms columns are what its speed-up is made of (the runs' mean steps,
    # geometric mean per arm); the step medians stay in the JSON under their own names
    for row in result["model_rows"]:
        assert row["dense_ms_per_token"] / row["ms_per_token"] == pytest.approx(row["speedup"], rel=1e-9)
        assert row["median_step_ms"] > 0 and row["dense_median_step_ms"] > 0
    plans = [row["plan"] for row in result["model_rows"]]
    assert plans == [
        "dense attention, paged cache",
        "quest p16 budget 128, dynamic cache",
        "quest p16 budget 128, paged cache",
        "quest p16 budget 128, paged cache, vs dense paged",
    ]
    first, sparse = result["model_rows"][0], result["model_rows"][2]
    # review M, M3: what sparse attention alone saves, sparse against dense both on PagedCache in the
    # same interleaved pairs (every other row's dense arm is stock decode on DynamicCache)
    caches = [(row["dense_cache"], row["sparse_cache"]) for row in result["model_rows"]]
    assert caches == [("dynamic", "paged"), ("dynamic", "dynamic"), ("dynamic", "paged"), ("paged", "paged")]
    alone = result["model_rows"][3]
    assert alone["density"] < 0.2 and alone["pairs_timed"] >= 2 and len(alone["dense_seconds_per_token"]) == 2
    assert alone["speedup_lo"] <= alone["speedup"] <= alone["speedup_hi"]
    assert "vs dense paged" in " ".join(r.output.split())
    assert (
        first["density"] == 1 and first["kl"] == 0 and first["agree"] == 1 and first["greedy_match"] is None
    )
    assert sparse["density"] < 0.2 and sparse["seq_len"] == 2048 - 4 and 0 <= sparse["agree"] <= 1
    assert result["environment"]["threads"] == 1 and (tmp_path / "decode.png").is_file()
    # every timing row carries the host's load (review M, M3): a layer row over its sparse steps and the
    # dense ones its speed-up divides by, a model row its run pairs' record (retimed, kept under overload)
    for row in result["layer_rows"]:
        assert isinstance(row["overloaded"], bool) and "others_busy_cores" in row
    for row in result["model_rows"]:
        assert row["pairs_timed"] >= 2 and row["overloaded"] == (row["pairs_kept_under_overload"] > 0)
        assert row["pairs_retimed_for_overload"] >= 0 and "others_busy_cores" in row
    assert "overloaded" in r.output  # the tables' column
    assert result["environment"]["thread_policy"]["requested"] == 1
    # the console's spinner is transient: every progress message is a timestamped line of the log
    log = (tmp_path / "decode.log").read_text().splitlines()
    assert log[0].endswith("decode benchmark: started") and log[-1].endswith("decode benchmark: done")
    assert any("16384 cached tokens: sparse at ~10%" in line for line in log)
    assert any("2044 tokens, quest p16 budget 128, paged cache" in line for line in log), log


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--budgets", "a,b"], "--budgets"),
        (["--budgets", "0"], "--budgets"),
        (["--estimator", "magic"], "--estimator"),
        (["--estimator", "gate"], "--estimator gate needs --plan"),
        (["--estimator", "quest,gate_v2"], "--estimator gate_v2 needs --plan"),
        (["--estimator", "quest,magic"], "--estimator"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--runs", "1"], "--runs must be >= 2"),
        (["--threads", "0"], "--threads: '0'; give auto or a whole number >= 1"),
        (["--threads", "all"], "--threads: 'all'"),
        (["--plan", "/nonexistent/plan"], "--plan /nonexistent/plan"),
    ],
)
def test_bench_decode_refuses_bad_options(option, message, tmp_path):
    r = CliRunner().invoke(app, ["bench", "decode", "--quick", *option, "--out", str(tmp_path / "d.json")])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "d.json").exists()


def _gate_v2_plan_dir(model_dir, path):
    """A saved plan with gate_v2 weights for the tiny model and no decode section."""
    from sparse_core import SparsePlan, load_model, plan_io
    from sparse_core.estimators.learned_gate import GateShape
    from sparse_core.estimators.learned_gate_v2 import BlockGateV2, model_rope

    model, _ = load_model(model_dir)
    gate = BlockGateV2(GateShape.from_config(model.config), 32, *model_rope(model))
    plan = SparsePlan(block_size=32, estimator="gate_v2", tensors=gate.to_tensors())
    plan_io.save(plan, path, config=model.config)
    return path


def test_bench_decode_scores_budget_rows_with_a_plans_learned_weights(tiny_llama_dir, tmp_path):
    from sparse_core import plan_io
    from sparse_core.bench.decode import model_bench

    plan = plan_io.load(_gate_v2_plan_dir(tiny_llama_dir, tmp_path / "plan"))
    rows, _, _ = model_bench(
        str(tiny_llama_dir),
        (600,),
        budgets=(128,),
        page_size=32,
        estimator="gate_v2",
        plan=plan,
        new_tokens=4,
    )
    assert [r["plan"] for r in rows] == [
        "dense attention, paged cache",
        "gate_v2 p32 budget 128, dynamic cache",
        "gate_v2 p32 budget 128, paged cache",
        "gate_v2 p32 budget 128, paged cache, vs dense paged",
    ]
    assert all(r["density"] < 0.5 for r in rows[1:]) and rows[0]["density"] == 1
    base = ["bench", "decode", "--quick", "--plan", str(tmp_path / "plan"), "--out", str(tmp_path / "d.json")]
    base += ["--model", str(tiny_llama_dir)]  # the plan's model (a plan for another is refused first)
    r = CliRunner().invoke(app, base)  # quest scores no learned weights: the plan needs a decode section
    assert r.exit_code == 2 and "has no decode section" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--estimator", "gate_v2"])  # pages pooled like the plan's blocks
    assert r.exit_code == 2 and "pass --page-size 32" in r.output, r.output
    assert not (tmp_path / "d.json").exists()


def test_bench_decode_trains_page_gate_on_text_after_its_own_window(tiny_llama_dir):
    from sparse_core.bench.decode import model_bench

    rows, _, trained = model_bench(
        str(tiny_llama_dir),
        (600,),
        budgets=(128,),
        page_size=16,
        estimator=("quest", "page_gate"),  # side by side in one run, one page gate trained for it
        new_tokens=4,
    )
    assert [r["plan"] for r in rows] == [
        "dense attention, paged cache",
        "quest p16 budget 128, dynamic cache",
        "quest p16 budget 128, paged cache",
        "quest p16 budget 128, paged cache, vs dense paged",
        "page_gate p16 budget 128, dynamic cache",
        "page_gate p16 budget 128, paged cache",
        "page_gate p16 budget 128, paged cache, vs dense paged",
    ]
    assert all(r["density"] < 0.5 for r in rows[1:])
    assert (
        trained["page_size"] == 16
        and trained["windows"] == 2
        and trained["loss_after"] < trained["loss_before"]
    )


def test_a_model_rows_host_record_is_its_run_pairs_record() -> None:
    from sparse_core.bench.decode import host_fields

    record = {"pairs_timed": 2, "pairs_retimed_for_overload": 3, "pairs_kept_under_overload": 1}
    row = host_fields({**record, "max_others_busy_cores": 1.7, "max_wait_share": 0.5})
    assert row == {**record, "others_busy_cores": 1.7, "max_wait_share": 0.5, "overloaded": True}
    assert host_fields(None)["overloaded"] is False
