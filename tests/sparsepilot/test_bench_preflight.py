"""What a benchmark can check without the model's weights it checks before loading them, and it never
times another length than the one asked for (review of the bench commands, fix B):

- `bench decode` silently shortened a cache length over the model's positions (a 16k ask on an 8k
  model gave an 8k table) and had no `--lengths`; `bench decode-scorers` did the same with
  `--prompt-tokens`. An asked-for length that does not fit is now refused up front; the mode's
  defaults are still shortened to fit, and the table and the JSON say so.
- `bench prefill` refused lengths none of which fit, and a bad `--model`, only after loading the model.
- `bench gate` wrote no progress log.

The refusals are shown on a model directory whose config and tokenizer are real and whose weights are
not: a run that loaded it would end with "cannot load weights" instead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsepilot.cli import app
from tests.sparsepilot.test_bench_verdicts import check_gate_rows


@pytest.fixture
def config_only_model(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """The tiny model's config (2,048 positions) and tokenizer, with weights that cannot be read."""
    path = tmp_path / "config-only"
    shutil.copytree(tiny_llama_dir, path)
    (path / "model.safetensors").write_text("not safetensors")
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _refused(args: list[str], out: Path) -> str:
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    said = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "cannot load weights" not in said and "Traceback" not in said, said  # refused before loading
    # nothing ran: no JSON, no progress log
    assert not out.exists() and not out.with_suffix(".log").exists(), said
    return said


def test_decode_refuses_cache_lengths_over_the_models_positions_before_loading_it(
    config_only_model: Path, home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "decode.json"
    base = ["bench", "decode", "--quick", "--model", str(config_only_model)]
    said = _refused([*base, "--lengths", "1024,4096"], out)
    assert (
        "error: --lengths: 4,096 tokens + 64 new tokens exceed the model's 2,048 positions "
        "(max_position_embeddings): give --lengths <= 1,984"
    ) in said
    said = _refused([*base, "--lengths", "2000", "--new-tokens", "64"], out)  # the new tokens count too
    assert "error: --lengths: 2,000 tokens + 64 new tokens exceed the model's 2,048 positions" in said
    said = _refused([*base, "--new-tokens", "3000"], out)  # whatever the lengths: no room for a cache
    assert "error: --new-tokens 3000: 3,000 new tokens fill the model's 2,048 positions" in said
    said = _refused([*base, "--model", str(tmp_path / "no-such-model")], out)
    assert "error: unknown model ref" in said


def test_decode_scorers_refuses_prompt_tokens_over_the_models_positions_before_loading_it(
    config_only_model: Path, home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scorers.json"
    args = ["bench", "decode-scorers", "--model", str(config_only_model), "--prompt-tokens", "4096"]
    said = _refused(args, out)
    assert (
        "error: --prompt-tokens: 4,096 tokens + 32 new tokens exceed the model's 2,048 positions "
        "(max_position_embeddings): give --prompt-tokens <= 2,016"
    ) in said


def test_decode_shortens_only_its_default_lengths_and_says_so(tiny_llama_dir: Path) -> None:
    """The quick mode's 8,192-token cache on a 2,048-position model: timed at 2,044 (+ 4 new tokens),
    recorded as shortened in the JSON and said in the table's title; an asked-for length over the
    positions raises before any work (here: before the one-layer rows)."""
    from sparse_core.bench import decode
    from sparsepilot.commands.bench import _shortened_line

    result = decode.run(
        quick=True, model_ref=str(tiny_llama_dir), budgets=(128,), new_tokens=4, runs=2, layer=False
    )
    lengths = result["model_lengths"]
    assert lengths["asked"] is None and lengths["timed"] == [2044] and lengths["context"] == 2048
    assert lengths["shortened"] == {"8192": 2044}
    assert {r["seq_len"] for r in result["model_rows"]} == {2044}
    assert _shortened_line(lengths) == (
        "; default cache lengths shortened to fit the model's 2,048 positions with 4 new tokens: "
        "8,192 -> 2,044"
    )
    with pytest.raises(ValueError, match=r"lengths: 4,096 tokens \+ 4 new tokens exceed the model's 2,048"):
        decode.run(quick=True, model_ref=str(tiny_llama_dir), lengths=(1024, 4096), new_tokens=4)


def test_prefill_refuses_what_it_can_check_without_the_weights_before_loading_them(
    config_only_model: Path, home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prefill.json"
    base = ["bench", "prefill", "--model", str(config_only_model), "--kernels", "gather"]
    said = _refused([*base, "--lengths", "4096,8192"], out)
    assert "error: --lengths:" in said and "4,096, 8,192 tokens; the model has 2,048 positions" in said
    # a length asked for by name that does not fit is refused even when another fits (s46 T1-2)
    said = _refused([*base, "--lengths", "128,4096"], out)
    assert "error: --lengths: 4,096 tokens exceed the model's 2,048 positions" in said
    said = _refused([*base, "--quick"], out)  # the quick mode's 8,192 tokens
    assert "error: --quick:" in said and "8,192 tokens; the model has 2,048 positions" in said
    # one block (the pooled plan's 64 tokens) is all dense: nothing sparse to time (1 token: a traceback)
    said = _refused([*base, "--lengths", "1,512"], out)
    assert "error: --lengths: each must exceed the plan's block size 64" in said
    said = _refused([*base, "--model", str(tmp_path / "no-such-model")], out)
    assert "error: unknown model ref" in said
    # and with those right, the run gets as far as the weights
    res = CliRunner().invoke(app, [*base, "--lengths", "512", "--taus", "0.9", "--out", str(out)])
    assert res.exit_code == 2 and "cannot load weights" in " ".join(res.output.split()), res.output


def test_gate_writes_a_progress_log_and_says_where(home: Path, tmp_path: Path) -> None:
    """As the other benchmarks: a timestamped line per step in the .log next to the JSON (the console's
    spinner and bars are transient), its path said, the decide() timing's host load in the log and the
    JSON."""
    out = tmp_path / "gate.json"
    args = ["bench", "gate", "--rows", "4,200", "--repeats", "1", "--simulate", "--replications", "2"]
    args += ["--nogo", "--nogo-replications", "2"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    log = out.with_suffix(".log")
    assert f"progress log: {log}" in " ".join(res.output.split())
    lines = log.read_text().splitlines()
    text = "\n".join(line.split(" ", 1)[1] for line in lines)  # each line: HH:MM:SS message
    assert all(len(line.split(" ", 1)[0]) == 8 for line in lines)
    assert text.startswith("gate benchmark: started\n") and text.endswith("\ngate benchmark: done")
    for said in (
        "decide(): split step of 4 rows, 1 timed call(s)",
        "decide(): paired step of 200 rows, 1 timed call(s)",
        "host during the decide() timing: ",
        "guardrail rate checks (exact)",
        "simulating pilots 1/",
        "simulated pilots: load ",
        "simulating false NO-GO 1/",
        "false NO-GO: load ",
    ):
        assert said in text, text
    nogo = json.loads(out.read_text())["nogo"]["rows"]
    assert len(nogo) == 54 and {r["replications"] for r in nogo} == {2}, nogo[0]
    load = json.loads(out.read_text())["decide"]["environment"]["host_load"]
    assert isinstance(load["overloaded"], bool) and load["seconds"] > 0
    # review M, M1: and each (mode, size) row its own host record, CPU time and verdict
    rows = json.loads(out.read_text())["decide"]["rows"]
    assert [(r["mode"], r["rows"]) for r in rows] == [
        ("split", 4),
        ("split", 200),
        ("paired", 4),
        ("paired", 200),
    ]
    check_gate_rows(rows, res.output)


def test_quality_refuses_windows_over_the_models_positions_before_loading_it(
    config_only_model: Path, home: Path, tmp_path: Path
) -> None:
    """`bench quality` calibrated windows longer than the model's positions (position ids past its
    table) after loading it; the use cases' 2,048-token windows too."""
    out = tmp_path / "quality.json"
    base = ["bench", "quality", "--model", str(config_only_model), "--estimators", "pooled", "--no-speed"]
    said = _refused([*base, "--lengths", "1024,4096", "--usecases", "none"], out)
    assert (
        "error: --lengths: 4,096 tokens; the model has 2,048 positions (max_position_embeddings): "
        "give --lengths <= 2,048"
    ) in said
    config = json.loads((config_only_model / "config.json").read_text())
    (config_only_model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    said = _refused([*base, "--lengths", "512", "--usecases", "docs-qa"], out)
    assert "error: --usecases: their plans are calibrated on 2,048-token windows; the model has 1,024" in said


def test_decode_refuses_a_plan_that_does_not_fit_the_model_before_loading_it(
    config_only_model: Path, home: Path, tmp_path: Path
) -> None:
    """A --plan for another model (here: a dense layer the 2-layer model lacks) was found out only when
    the model was sparsified, after the one-layer rows and the load; its config alone says so."""
    from sparse_core import plan_io
    from sparse_core.decode.plan import DecodePlan
    from sparse_core.plan import SparsePlan

    plan_dir = tmp_path / "plan"
    plan_io.save(SparsePlan(dense_layers=(7,), decode=DecodePlan(page_size=16, budget_tokens=128)), plan_dir)
    out = tmp_path / "decode.json"
    args = ["--model", str(config_only_model), "--plan", str(plan_dir), "--lengths", "512"]
    said = _refused(
        ["bench", "decode-scorers", "--scorers", "quest,gate", "--page-size", "64", *args[:4]], out
    )
    assert f"error: --plan {plan_dir}: plan.dense_layers" in said and "2 layers" in said, said
    said = _refused(["bench", "decode", "--quick", *args], out)
    assert f"error: --plan {plan_dir}: plan.dense_layers" in said and "2 layers" in said, said
