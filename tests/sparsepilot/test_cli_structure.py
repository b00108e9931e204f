"""The CLI's shape: one Typer per commands module, every command reachable, one error handler."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
import typer
from typer.testing import CliRunner

import sparsepilot.commands
from sparsepilot.cli import app

TOP_LEVEL = {
    "init", "calibrate", "evaluate", "pilot", "gate", "approve", "promote", "rollback", "monitor", "run",
    "serve", "dashboard", "hash-password", "login", "logout", "whoami", "serve-model",
}  # fmt: skip
GROUPS = {"usecase": {"add", "list", "show"}, "audit": {"verify"}}
BENCHMARKS = {
    "dashboard", "import", "monitor", "quality", "attention", "prefill", "decode", "decode-scorers", "gate"
}  # fmt: skip


def test_every_commands_module_exposes_one_typer_and_no_register_hook() -> None:
    names = [m.name for m in pkgutil.iter_modules(sparsepilot.commands.__path__)]
    assert names, "no command modules found"
    for name in names:
        module = importlib.import_module(f"sparsepilot.commands.{name}")
        assert isinstance(getattr(module, "app", None), typer.Typer), name
        assert not hasattr(module, "register"), name


def test_every_command_and_group_is_reachable_once() -> None:
    root = typer.main.get_command(app)
    assert set(root.commands) == TOP_LEVEL | set(GROUPS) | {"bench"}
    for group, commands in GROUPS.items():
        assert set(root.commands[group].commands) == commands
    assert set(root.commands["bench"].commands) == BENCHMARKS


def test_a_sparsepilot_error_from_any_command_is_one_line_and_exit_2(sp_home) -> None:  # noqa: ANN001
    runner = CliRunner()
    res = runner.invoke(app, ["usecase", "show", "no-such-case"])  # UseCaseError, from rollout
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: unknown use case 'no-such-case'")
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["gate", "no-such-case"])  # UnknownUseCase, via the pipeline commands
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: unknown use case 'no-such-case'")


def test_a_confidence_outside_0_1_is_refused_before_any_work(sp_home, tmp_path) -> None:  # noqa: ANN001
    """calibrate --confidence / bench quality --confidence (the budget judged on one-sided bounds): a
    value outside (0, 1) is a one-line error naming it, exit 2, and nothing is written."""
    runner = CliRunner()
    out = tmp_path / "plan"
    res = runner.invoke(
        app,
        [
            "calibrate",
            "--model",
            "smollm2-135m",
            "--texts",
            "stdlib",
            "--out",
            str(out),
            "--confidence",
            "1.5",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "confidence must be in (0, 1)" in res.output and "1.5" in res.output
    assert not out.exists()
    bench_out = tmp_path / "quality.json"
    res = runner.invoke(app, ["bench", "quality", "--quick", "--confidence", "1.5", "--out", str(bench_out)])
    assert res.exit_code == 2, res.output
    assert "--confidence: 1.5 is not in (0, 1)" in res.output
    assert not bench_out.exists()
    # a margin the quick run's held-out windows cannot give (1 window of 2k at the 7-step level: 4 of the
    # 11 blocks needed) is refused before the model loads
    res = runner.invoke(app, ["bench", "quality", "--quick", "--confidence", "0.95", "--out", str(bench_out)])
    assert res.exit_code == 2, res.output
    assert "needs at least 11 blocks" in " ".join(res.output.split()) and not bench_out.exists()


def test_an_unknown_drop_measure_or_gate_target_is_refused_before_any_work(sp_home, tmp_path) -> None:  # noqa: ANN001
    """calibrate --drop-measure / bench quality --drop-measure and --gate-target: an unknown name is a
    one-line error naming the option and the choices, exit 2, nothing written."""
    runner = CliRunner()
    out = tmp_path / "plan"
    args = ["calibrate", "--model", "smollm2-135m", "--texts", "stdlib", "--out", str(out)]
    res = runner.invoke(app, [*args, "--drop-measure", "entropy"])
    assert res.exit_code == 2, res.output
    assert "--drop-measure" in res.output and "'mass', 'output'" in res.output and not out.exists()
    # the bound's unit: a name of prefill_bound's, and only with a confidence (the bound it is the unit of)
    res = runner.invoke(app, [*args, "--confidence", "0.95", "--bound-unit", "prompt"])
    assert res.exit_code == 2 and "--bound-unit" in res.output and "'block', 'window'" in res.output
    res = runner.invoke(app, [*args, "--bound-unit", "window"])
    assert res.exit_code == 2 and "--bound-unit: needs --confidence" in res.output and not out.exists()
    res = runner.invoke(app, [*args, "--sensitivity-windows", "-1"])
    assert res.exit_code == 2 and "--sensitivity-windows" in res.output and not out.exists()
    for bad, why in (("1.4,x", "could not convert"), ("0", "(0, 8]"), ("9", "(0, 8]")):
        res = runner.invoke(app, [*args, "--sharpen", bad])
        assert res.exit_code == 2 and f"--sharpen: '{bad}'" in res.output and why in res.output
        assert not out.exists()
    bench_out = tmp_path / "quality.json"
    for option, choices in (
        ("--drop-measure", "mass or output"),
        ("--gate-target", "maxpool, mass, output"),
        ("--layer-weights", "none or kl"),
    ):
        res = runner.invoke(app, ["bench", "quality", "--quick", option, "entropy", "--out", str(bench_out)])
        assert res.exit_code == 2, res.output
        assert f"{option}: 'entropy'" in res.output and choices in res.output, res.output
        assert not bench_out.exists()
    res = runner.invoke(
        app, ["bench", "quality", "--quick", "--bound-unit", "prompt", "--out", str(bench_out)]
    )
    assert res.exit_code == 2 and "--bound-unit: 'prompt'; choose block or window" in res.output
    res = runner.invoke(
        app, ["bench", "quality", "--quick", "--bound-unit", "window", "--out", str(bench_out)]
    )
    assert res.exit_code == 2 and "--bound-unit: needs --confidence" in res.output and not bench_out.exists()
    res = runner.invoke(
        app, ["bench", "quality", "--quick", "--sensitivity-windows", "-1", "--out", str(bench_out)]
    )
    assert res.exit_code == 2 and "--sensitivity-windows" in res.output and not bench_out.exists()
    res = runner.invoke(app, ["bench", "quality", "--quick", "--sharpen", "-2", "--out", str(bench_out)])
    assert res.exit_code == 2 and "--sharpen: '-2'" in res.output and not bench_out.exists()
    for bad, why in (("0.9,x", "not a comma-separated list"), ("0.9,1.0", "every tau must be in (0, 1)")):
        res = runner.invoke(app, ["bench", "quality", "--quick", "--taus", bad, "--out", str(bench_out)])
        assert res.exit_code == 2 and f"--taus: '{bad}'" in res.output and why in res.output
        assert not bench_out.exists()


def test_a_device_or_dtype_the_benchmarks_cannot_use_is_refused_before_any_work(sp_home, tmp_path) -> None:  # noqa: ANN001
    """bench attention / prefill / quality --device: an unknown name, or cuda where torch sees no CUDA
    device, is a one-line error naming the option (never a silent CPU run), exit 2, nothing written;
    bench prefill --dtype likewise."""
    import torch

    runner = CliRunner()
    out = tmp_path / "bench.json"
    for bench in ("attention", "prefill", "quality"):
        res = runner.invoke(app, ["bench", bench, "--quick", "--device", "tpu", "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert "--device: device 'tpu': choose one of auto, cpu, cuda" in " ".join(res.output.split())
        if not torch.cuda.is_available():
            res = runner.invoke(app, ["bench", bench, "--quick", "--device", "cuda", "--out", str(out)])
            assert res.exit_code == 2 and "torch sees no CUDA device" in res.output, res.output
    res = runner.invoke(app, ["bench", "prefill", "--quick", "--dtype", "fp16", "--out", str(out)])
    assert res.exit_code == 2 and "--dtype: 'fp16'; choose from fp32, bf16" in res.output, res.output
    assert not out.exists()
    # the standalone calibrate and evaluate load the model where --device says, checked likewise
    plan = tmp_path / "plan"
    standalone = (
        ["calibrate", "--model", "smollm2-135m", "--texts", "stdlib", "--out", str(plan)],
        ["evaluate", "--model", "smollm2-135m", "--plan", str(plan), "--out", str(out)],
    )
    for args in standalone:
        res = runner.invoke(app, [*args, "--device", "tpu"])
        assert res.exit_code == 2, res.output
        assert "--device: device 'tpu': choose one of auto, cpu, cuda" in " ".join(res.output.split())
        if not torch.cuda.is_available():
            res = runner.invoke(app, [*args, "--device", "cuda"])
            assert res.exit_code == 2 and "torch sees no CUDA device" in res.output, res.output
    assert not plan.exists() and not out.exists()


def test_calibrate_with_a_window_unit_shows_what_the_budget_was_judged_on(
    sp_home, tiny_llama_dir, tmp_path
) -> None:  # noqa: ANN001
    """calibrate --confidence 0.95 --bound-unit window on the tiny model: the bounds the budget was
    judged on and their unit are shown below the means, and the plan records them (quick: 36 windows of
    256 tokens, 9 held out, one block each: a search of up to 4 steps needs 9)."""
    import json
    import re

    runner = CliRunner()
    out = tmp_path / "plan"
    args = ["calibrate", "--model", str(tiny_llama_dir), "--texts", "stdlib", "--quick", "--seq-len", "256"]
    args += ["--max-texts", "36", "--estimator", "pooled", "--budget", "kl=0.05,agree=0.9", "--out", str(out)]
    res = runner.invoke(app, [*args, "--confidence", "0.95", "--bound-unit", "window"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    # each step at 1 - 0.05 / steps, the search's 3-4 steps (quick's 4 checks over its candidates)
    assert re.search(r"judged on 95% bounds over 9 windows \(each step at 0\.98(33|75)\): agree >= ", text), (
        text
    )
    fid = json.loads((out / "plan.json").read_text())["metadata"]["fidelity"]
    assert (fid["bound_unit"], fid["bound_units"], fid["confidence"]) == ("window", 9, 0.95)
    assert fid["agree_lower"] <= fid["agree"] and fid["kl_upper"] >= fid["kl"]


def test_calibrate_keeps_the_sensitivity_windows_apart_from_the_gates_training(
    sp_home, tiny_llama_dir, tmp_path
) -> None:  # noqa: ANN001
    """calibrate --sensitivity-windows N on the tiny model: the plan records that its sensitivities
    came from N windows of the calibration's (quick, 6 windows of 256 tokens: 2 held out, 4 calibrate:
    the gate trains on 2 + stops early on 1 and the sensitivities read the last 1); N leaving the gate
    no window of its own is a one-line error before any training, exit 2, nothing written."""
    import json

    import torch

    runner = CliRunner()
    out = tmp_path / "plan"
    args = ["calibrate", "--model", str(tiny_llama_dir), "--texts", "stdlib", "--quick", "--seq-len", "256"]
    args += ["--max-texts", "6", "--estimator", "gate_v2", "--gate-steps", "3"]
    args += ["--budget", "kl=0.05,agree=0.9", "--out", str(out)]
    res = runner.invoke(app, [*args, "--sensitivity-windows", "1", "--sharpen", "2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "plan.json").read_text())["metadata"]
    cal = meta["calibration"]
    assert (cal["n_calibration_windows"], cal["n_sensitivity_windows"]) == (4, 1)
    assert cal["sharpen"] == [1.0, 2.0]  # --sharpen 2: each layer chose between the powers 1 and 2
    # the report gives what the plan kept on the held-out windows beside the planned density
    rep = json.loads((out / "calibration_report.json").read_text())
    assert rep["measured_density"] == meta["measured_density"] and 0 < rep["measured_density"] <= 1
    assert rep["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # --device auto
    other = tmp_path / "other"
    res = runner.invoke(app, [*args[:-1], str(other), "--sensitivity-windows", "4"])
    assert res.exit_code == 2, res.output
    assert "sensitivity_windows=4: the calibration texts fill 4 window(s)" in " ".join(res.output.split())
    assert not other.exists()


def test_bench_quality_names_the_text_it_measured_on(sp_home, tiny_llama_dir, tmp_path) -> None:  # noqa: ANN001
    """bench quality on the tiny model (seed 1) prints each length's table under what its rows were
    measured on, and the JSON records the held-out windows' true lengths and the timed window's; where
    the held-out text runs out before the label (SmolLM2's ~7k tokens at 8k) the title gives them."""
    import json

    from sparsepilot.commands.bench import heldout_label

    out = tmp_path / "quality.json"
    args = ["bench", "quality", "--model", str(tiny_llama_dir), "--lengths", "256", "--estimators", "pooled"]
    args += ["--max-texts", "4", "--max-checks", "2", "--usecases", "none", "--seed", "1", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "256 tokens, budget kl=0.01,agree=0.98: held-out natural text (" in text
    # the host's load beside it; the test workers' OMP_NUM_THREADS=1 (conftest) caps auto on a quiet host
    assert re.search(r"thread\(s\) \(auto(, capped by OMP_NUM_THREADS=1)?\) on", text), text
    assert "other processes kept" in text
    result = json.loads(out.read_text())
    assert result["settings"]["seed"] == 1  # --seed: an independent repeat (split, windows, training)
    (block,) = result["by_length"]
    assert block["speed_tokens"] == 256 and block["heldout_window_tokens"] == [256] * 16
    assert 0 < block["rows"][0]["speed_density"] <= 1
    short = {"seq_len": 8192, "heldout_window_tokens": [6958]}
    assert heldout_label(short) == "held-out natural text, 1 window(s) of 6958 tokens"


def test_a_data_directory_that_is_a_file_is_one_line_and_exit_2(tmp_path) -> None:  # noqa: ANN001
    """configure_environment runs before any command, outside the one error handler: a SPARSEPILOT_HOME
    that names a file used to end in a FileExistsError traceback."""
    import os
    import subprocess
    import sys

    home = tmp_path / "not-a-dir"
    home.write_text("")
    env = dict(os.environ, SPARSEPILOT_HOME=str(home))
    out = subprocess.run(
        [sys.executable, "-m", "sparsepilot", "usecase", "list"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr
    assert f"error: SPARSEPILOT_HOME={home}: cannot be used as the data directory" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "no-such-case"],
        ["evaluate", "no-such-case", "--quick"],
        ["run", "--use-case", "no-such-case", "--specs", "@empty"],
    ],
)
def test_a_mistyped_use_case_is_refused_before_prefect_is_asked(
    argv: list[str],
    sp_home,  # noqa: ANN001
    tmp_path,  # noqa: ANN001
    monkeypatch,  # noqa: ANN001
) -> None:
    """Review U7: `calibrate`/`evaluate` with a mistyped name started a Prefect server and recorded a
    Failed flow run (41-65 s) before the flow's own lookup refused it. The name is resolved first: with
    no Prefect server at all (a closed port), the error is the unknown use case, exit 2."""
    empty = tmp_path / "specs"
    empty.mkdir()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens on port 9
    res = CliRunner().invoke(app, [str(empty) if a == "@empty" else a for a in argv])
    assert res.exit_code == 2, res.output
    assert "no-such-case" in res.output and "Prefect server does not answer" not in res.output, res.output
    assert "unknown use case" in res.output or "nor a registered use case" in res.output, res.output


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["approve", "x", "--decision", "abc", "--reason", "r"], "Invalid value for '--decision'"),
        (["approve", "x", "--decision", "1"], "Missing option '--reason'"),
        (["usecase", "list", "--format", "yaml"], "No such option: --format"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_a_usage_mistake_is_one_error_line_and_exit_2(argv: list[str], said: str) -> None:
    """Review U5: the README promises `error: <what to fix>` and exit 2 for every bad input; option
    mistakes printed Click's boxed usage panel instead."""
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {said}"), res.output
    assert "╭" not in res.output and "--help`" in res.output
