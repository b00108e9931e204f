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
    r = CliRunner().invoke(app, [*args, "--page-size", "16", "--new-tokens", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert [row["target_density"] for row in result["layer_rows"]] == [0.05, 0.1, 0.25]
    assert all(row["seq_len"] == 16384 and row["speedup"] > 0 for row in result["layer_rows"])
    plans = [row["plan"] for row in result["model_rows"]]
    assert plans == [
        "dense attention, paged cache",
        "quest p16 budget 128, dynamic cache",
        "quest p16 budget 128, paged cache",
    ]
    first, sparse = result["model_rows"][0], result["model_rows"][2]
    assert (
        first["density"] == 1 and first["kl"] == 0 and first["agree"] == 1 and first["greedy_match"] is None
    )
    assert sparse["density"] < 0.2 and sparse["seq_len"] == 2048 - 4 and 0 <= sparse["agree"] <= 1
    assert result["environment"]["threads"] == 1 and (tmp_path / "decode.png").is_file()
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
        (["--new-tokens", "1"], "--new-tokens"),
        (["--plan", "/nonexistent/plan"], "--plan /nonexistent/plan"),
    ],
)
def test_bench_decode_refuses_bad_options(option, message, tmp_path):
    r = CliRunner().invoke(app, ["bench", "decode", "--quick", *option, "--out", str(tmp_path / "d.json")])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "d.json").exists()
