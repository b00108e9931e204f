"""The evaluation report: stable schema, flat finite metrics for MLflow, PNG artifacts, and a model
left dense afterwards."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from sparse_core import SparsePlan, is_sparsified
from sparse_core.evaluation import EvalSuite, evaluate, selection_density
from sparse_core.prefill_bound import scored_positions
from sparse_core.testing import sample_text

EXPECTED_KEYS = [
    "schema_version",
    "model",
    "plan_hash",
    "estimator",
    "device",
    "torch_version",
    "fidelity",
    "layer_errors",
    "probes",
    "tasks",
    "speed",
    "speed_summary",
    "decode",
    "density",
    "layer_density",
    "head_density",
    "artifacts",
    "seconds",
    "suite",
]


def test_report_schema_metrics_and_pictures(quality_tiny, tmp_path):
    model, tok = quality_tiny
    ds = tmp_path / "d.jsonl"
    ds.write_text(
        "\n".join(
            json.dumps({"prompt": "Some text about Python. " * 30, "reference": "Python", "task": t})
            for t in ("loglik", "contains")
        )
    )
    suite = EvalSuite(
        n_fidelity_texts=1,
        fidelity_seq_len=512,
        probe_lengths=(512,),
        probe_kinds=("passkey",),
        probe_depths=(0.5,),
        dataset=ds,
        max_new_tokens=3,
        speed_lengths=(512,),
        speed_repeats=2,
        pictures_dir=tmp_path / "pics",
    )
    plan = SparsePlan(tau=0.7)
    report = evaluate(model, tok, plan, suite)
    assert not is_sparsified(model)
    d = report.to_dict()
    assert list(d) == EXPECTED_KEYS
    assert d["schema_version"] == 1
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN/inf anywhere
    means = {"kl", "agree", "nll_dense", "nll_sparse", "nll_delta", "n_positions"}
    bounds = {"confidence", "kl_upper", "agree_lower", "nll_delta_upper", "bound_units"}
    assert set(d["fidelity"]) == means | bounds | {"windows"}
    # one 512-token window scores 256 positions: one block, which bounds nothing (None, not a number)
    assert d["fidelity"]["windows"] == [512] and d["fidelity"]["bound_units"] == 1
    assert d["fidelity"]["agree_lower"] is None and d["fidelity"]["kl_upper"] is None
    assert len(d["layer_errors"]) == model.config.num_hidden_layers
    assert d["probes"]["n"] == 1 and set(d["probes"]["dense"]) >= {"accuracy", "by_kind_length"}
    assert d["tasks"]["n_rows"] == 2
    # bounds valid at any number of rows: two rows vouch for little, whatever they scored
    t = d["tasks"]
    assert -1 <= t["quality_low"] <= t["quality_delta"] <= t["quality_high"] <= 1
    assert t["quality_high"] - t["quality_low"] > 1.2 and t["confidence"] == 0.95
    (row,) = d["speed"]
    assert row["seq_len"] == 512 and len(row["dense_seconds"]) == 2
    assert row["speedup_interval"][0] <= row["speedup_interval"][1]
    # where the sparse prefill's time went: the retrofit's scoring and kernel times, the rest inferred
    split = row["time_split"]
    assert split["dense_seconds"] == statistics.median(row["dense_seconds"])
    assert split["scoring_seconds"] > 0 and split["kernel_seconds"] > 0
    assert split["rest_seconds"] < max(row["sparse_seconds"])
    if split["attention_share"] is not None:  # a tiny model's timings may hide attention in the noise
        assert 0 < split["attention_share"] < 1 and split["attention_speedup"] > 0
        assert split["ideal_speedup"] > 1  # a density below 1 with a perfect kernel saves time
    host = d["speed_summary"]["host"]  # threads from the CPUs really free; the load of every timed pair
    assert 1 <= host["threads"] <= host["cpus"] and host["pairs_timed"] == 2
    assert 0 <= host["pairs_kept_under_overload"] <= 2 and 0 <= host["pairs_retimed_for_overload"] <= 2
    assert 0 < d["density"] < 1
    # no decode section: dense decode timed at the same length, on the served cache, as both arms' price
    (dec,) = d["decode"]["rows"]
    summ = d["decode"]["summary"]
    assert dec["seq_len"] == 512 and dec["extra"]["identical"] and not dec["extra"]["decode_section"]
    assert (
        summ["sparse_decode"] is False
        and summ["weighted_speedup"] == 1.0
        and summ["break_even_tokens"] is None
    )
    assert summ["weighted_dense_tokens_per_s"] == summ["weighted_sparse_tokens_per_s"] > 0
    assert summ["host"]["cache"] == "paged" and 1 <= summ["host"]["threads"] <= summ["host"]["cpus"]
    m = report.metrics()
    assert {
        "fidelity.kl",
        "fidelity.agree",
        "probes.sparse_accuracy",
        "tasks.quality_delta",
        "tasks.quality_low",
        "tasks.quality_high",
        "density",
    } <= set(m)
    assert "fidelity.agree_lower" not in m  # unbounded: left out of MLflow rather than sent as inf
    assert "speed.512.speedup" in m
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    for name in ("density_heatmap", "block_mask"):
        png = d["artifacts"][name]
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_density_weighs_windows_by_their_causal_blocks(quality_tiny):
    """Windows of 320 tokens (55 causal blocks of 32) and 64 (3, all kept): the report's density per
    layer x head and overall is kept over causal blocks, the windows combined by hand from their own
    densities, not their plain mean."""
    model, tok = quality_tiny
    ids = tok(sample_text(8000)).input_ids
    long, short = ids[:320], ids[400:464]
    plan = SparsePlan(block_size=32, tau=0.6, local_blocks=1)
    table_long, d_long = selection_density(model, plan, [long])
    table_short, d_short = selection_density(model, plan, [short])
    table, density = selection_density(model, plan, [long, short])
    assert d_short == 1.0 and d_long < 0.9
    assert density == pytest.approx((d_long * 55 + d_short * 3) / 58, rel=1e-9)
    for row, row_long in zip(table, table_long, strict=True):
        assert row == pytest.approx([(x * 55 + 3) / 58 for x in row_long], rel=1e-9)
    assert not is_sparsified(model)


def test_fidelity_bounds_where_the_text_allows_and_windows_at_their_true_length(quality_tiny):
    model, tok = quality_tiny
    suite = EvalSuite(
        n_fidelity_texts=12, fidelity_seq_len=2048, probe_lengths=(), speed_lengths=(), layer_errors=False
    )
    fid = evaluate(model, tok, SparsePlan(tau=0.7), suite).to_dict()["fidelity"]
    # the held-out text runs out: fewer windows than asked, the last one short, and the report says so
    windows = fid["windows"]
    assert 1 < len(windows) < 12 and windows[:-1] == [2048] * (len(windows) - 1) and windows[-1] < 2048
    assert fid["n_positions"] == sum(scored_positions(w, suite.fidelity_fraction) for w in windows)
    assert fid["bound_units"] >= 6  # enough blocks of 256 scored positions for a 95% bound
    assert 0 <= fid["agree_lower"] <= fid["agree"] and fid["kl_upper"] >= fid["kl"]
    assert fid["nll_delta_upper"] >= fid["nll_delta"]


def test_the_speed_mix_comes_from_the_speed_rows_when_given(quality_tiny):
    """The evaluate flow scores the task on the rows kept apart from calibration but times prefill at
    the whole dataset's length mix: `speed_rows` sets the mix, the task rows stay the task's."""
    from sparse_core.evaluation import length_mix
    from sparse_core.tasks import TaskRow

    model, tok = quality_tiny
    short = [TaskRow("A short prompt about Python. " * 4, "Python")] * 2
    long = [TaskRow("Some longer text about the Python language. " * 60, "Python")] * 3
    suite = EvalSuite(
        n_fidelity_texts=0, probe_lengths=(), layer_errors=False, dataset_rows=short, speed_rows=long,
        max_new_tokens=2, speed_repeats=1, decode_new_tokens=0, max_speed_buckets=1,
    )  # fmt: skip
    d = evaluate(model, tok, SparsePlan(tau=0.9), suite).to_dict()
    assert d["tasks"]["n_rows"] == 2
    (want,), _ = length_mix(tok, long, max_buckets=1)
    assert [r["seq_len"] for r in d["speed"]] == [want] and want > length_mix(tok, short, max_buckets=1)[0][0]
    assert "speed_rows" not in d["suite"]  # rows are data, not a setting


def test_the_mix_throughput_is_its_tokens_over_its_seconds(quality_tiny):
    """Two lengths: the mix's tokens/s is sum(w L) / sum(w t), not the weighted mean of each length's
    tokens/s (which overstates it, and every dollar figure scales with it)."""
    model, tok = quality_tiny
    suite = EvalSuite(
        n_fidelity_texts=0, probe_lengths=(), layer_errors=False, speed_lengths=(128, 512),
        speed_repeats=1, decode_new_tokens=0,
    )  # fmt: skip
    d = evaluate(model, tok, SparsePlan(tau=0.9), suite).to_dict()
    rows, summ = d["speed"], d["speed_summary"]
    assert [r["seq_len"] for r in rows] == [128, 512]
    tokens = sum(r["weight"] * r["seq_len"] for r in rows)
    for arm in ("dense", "sparse"):
        seconds = sum(r["weight"] * statistics.median(r[f"{arm}_seconds"]) for r in rows)
        assert summ[f"weighted_{arm}_tokens_per_s"] == pytest.approx(tokens / seconds, rel=1e-12)


def test_sections_switched_off_are_none(quality_tiny):
    model, tok = quality_tiny
    suite = EvalSuite(
        n_fidelity_texts=1, fidelity_seq_len=256, probe_lengths=(), speed_lengths=(), layer_errors=False
    )
    d = evaluate(model, tok, SparsePlan(tau=0.9), suite).to_dict()
    assert list(d) == EXPECTED_KEYS
    assert d["probes"] is None and d["tasks"] is None and d["speed"] is None and d["layer_errors"] is None
    assert d["decode"] is None  # no lengths to time decode at
    assert d["artifacts"] == {}


def test_decode_section_for_a_plan_that_decodes_sparsely(quality_tiny):
    from sparse_core.decode.plan import DecodePlan

    model, tok = quality_tiny
    suite = EvalSuite(
        n_fidelity_texts=0,
        probe_lengths=(512,),
        probe_kinds=("passkey",),
        probe_depths=(0.5,),
        layer_errors=False,
        speed_lengths=(512, 768),
        speed_weights=(0.75, 0.25),
        speed_repeats=1,
        decode_new_tokens=6,
        decode_repeats=2,
    )
    # break-even 600: the 512-token runs decode densely (timed once, identical arms), 768 sparsely
    # calibration's record of the host while it timed that break-even travels to the ROI (review M, M1)
    be_host = {"budgets": 1, "lengths_timed": 5, "lengths_kept_under_overload": 2, "overloaded": True}
    plan = SparsePlan(
        tau=0.9,
        decode=DecodePlan(page_size=16, budget_tokens=128, break_even_tokens=600),
        metadata={"decode_calibration": {"break_even_host": be_host}},
    )
    report = evaluate(model, tok, plan, suite)
    d = report.to_dict()
    assert not is_sparsified(model)
    rows = d["decode"]["rows"]
    assert [r["seq_len"] for r in rows] == [512, 768] and [r["weight"] for r in rows] == [0.75, 0.25]
    for r in rows:
        assert len(r["dense_seconds_per_token"]) == 2 and r["new_tokens"] == 6
        assert 0 <= r["agree"] <= 1 and r["kl"] >= 0
        assert r["speedup_interval"][0] <= r["speedup_interval"][1]
    short, long = rows
    assert short["extra"]["below_break_even"] and short["speedup"] == 1.0 and short["density"] == 1.0
    assert not long["extra"]["below_break_even"] and 0 < long["density"] < 0.5
    summ = d["decode"]["summary"]
    assert summ["weighted_speedup_low"] <= summ["weighted_speedup"] <= summ["weighted_speedup_high"]
    # the weighted tokens/s are made of what each row's speed-up is made of, the geometric mean of its runs'
    # mean steps (the step medians gave a sparse rate no run measured: review s50 M2)
    geo = statistics.geometric_mean
    dense_s = sum(r["weight"] * geo(r["dense_seconds_per_token"]) for r in rows)
    sparse_s = sum(r["weight"] * geo(r["sparse_seconds_per_token"]) for r in rows)
    assert summ["weighted_dense_tokens_per_s"] == pytest.approx(1 / dense_s, rel=1e-9)
    assert summ["weighted_sparse_tokens_per_s"] == pytest.approx(1 / sparse_s, rel=1e-9)
    assert summ["break_even_tokens"] == 600 and summ["rows_below_break_even"] == summ["rows_identical"] == 1
    assert summ["context_tokens"] == [512, 774] and summ["break_even_host"] == be_host
    json.dumps(d, allow_nan=False)
    m = report.metrics()
    assert "decode.512.speedup" in m and "decode.weighted_speedup" in m
    gen = d["probes"]["generated"]
    assert gen["n"] == 1 and 0 <= gen["sparse_accuracy"] <= 1 and "probes.generated_sparse_accuracy" in m


def test_speed_lengths_over_the_models_positions_are_refused_or_reported(quality_tiny) -> None:
    """Review M, M4: `--speed-lengths 8192` on a 4,096-position model timed nothing and said nothing."""
    from sparse_core.evaluation import within_context

    assert within_context((2048, 4096, 8192), 4096, "x") == ((2048, 4096), [8192])
    assert within_context((8192,), None, "x") == ((8192,), [])
    with pytest.raises(ValueError, match=r"speed_lengths: 8,192 tokens; the model has 4,096 positions"):
        within_context((8192,), 4096, "speed_lengths")
    model, tok = quality_tiny
    suite = EvalSuite(n_fidelity_texts=0, probe_lengths=(), layer_errors=False, speed_lengths=(8192,))
    with pytest.raises(ValueError, match=r"8,192 tokens; the model has 4,096 positions"):
        evaluate(model, tok, SparsePlan(tau=0.9), suite)  # before any work
