"""The CLI's shape: one Typer per commands module, every command reachable, one error handler."""

from __future__ import annotations

import importlib
import pkgutil

import typer
from typer.testing import CliRunner

import sparsepilot.commands
from sparsepilot.cli import app

TOP_LEVEL = {
    "init", "calibrate", "evaluate", "pilot", "gate", "approve", "promote", "rollback", "monitor", "run",
    "serve", "dashboard", "hash-password", "login", "logout", "whoami", "serve-model",
}  # fmt: skip
GROUPS = {"usecase": {"add", "list", "show"}, "audit": {"verify"}}
BENCHMARKS = {"dashboard", "import", "quality", "attention", "prefill", "decode", "gate"}


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
    bench_out = tmp_path / "quality.json"
    for option, choices in (("--drop-measure", "mass or output"), ("--gate-target", "maxpool, mass, output")):
        res = runner.invoke(app, ["bench", "quality", "--quick", option, "entropy", "--out", str(bench_out)])
        assert res.exit_code == 2, res.output
        assert f"{option}: 'entropy'" in res.output and choices in res.output, res.output
        assert not bench_out.exists()
