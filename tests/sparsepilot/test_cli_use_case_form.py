"""The use-case form of `calibrate NAME` / `evaluate NAME` and the flow commands' settings: what the form
does not read is refused by name (never silently ignored), and a setting the flows cannot use is
`error: ...` and exit 2 before a flow starts (review O2, O3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsepilot.cli import app

runner = CliRunner()

# option, value, what the refusal says the use case uses instead
CALIBRATE_ONLY = [
    ("--budget", "kl=0.5", "its spec's quality_budget"),
    ("--estimator", "quest", "its spec's quality_budget.estimator"),
    ("--seed", "7", "its spec's quality_budget.calibration.seed"),
    ("--max-texts", "4", "its spec's quality_budget.calibration"),
    ("--seq-len", "256", "its spec's quality_budget.calibration"),
    ("--gate-steps", "3", "its spec's quality_budget.calibration"),
    ("--checkpoint-dir", "ckpt", "its spec's quality_budget.calibration"),
    ("--max-seconds", "60", "its spec's quality_budget.calibration"),
    ("--confidence", "0.95", "its spec's quality_budget.calibration"),
    ("--bound-unit", "window", "its spec's quality_budget.calibration"),
    ("--drop-measure", "output", "its spec's quality_budget.calibration"),
    ("--sensitivity-windows", "2", "its spec's quality_budget.calibration"),
    ("--sharpen", "1.4", "its spec's quality_budget.calibration"),
    ("--dataset", "rows.jsonl", "its spec's dataset.path"),
    ("--task", "contains", "its spec's dataset.task"),
    ("--device", "cuda", "SPARSEPILOT_DEVICE"),
    ("--device", "cpu", "SPARSEPILOT_DEVICE"),
]
EVALUATE_ONLY = [
    ("--dataset", "rows.jsonl", "its spec's dataset and traffic"),
    ("--task", "contains", "its spec's dataset and traffic"),
    ("--probe-lengths", "2048", "its spec's dataset and traffic"),
    ("--probe-kinds", "passkey", "its spec's dataset and traffic"),
    ("--probe-depths", "0.5", "its spec's dataset and traffic"),
    ("--speed-lengths", "4096", "its spec's dataset and traffic"),
    ("--repeats", "3", "its spec's dataset and traffic"),
    ("--pictures", "pics", "its spec's dataset and traffic"),
    ("--out", "report.json", "its spec's dataset and traffic"),
    ("--device", "cuda", "SPARSEPILOT_DEVICE"),
]


def _one_line(res) -> str:  # noqa: ANN001
    """The output on one line from its `error:` on (the log file's path may be announced before it)."""
    said = " ".join(res.output.split())
    return said[said.find("error: ") :] if "error: " in said else said


def test_the_use_case_form_refuses_every_standalone_only_option_by_name(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    """`calibrate NAME --budget kl=0.5 --device cuda` calibrated to the spec's budget on the CPU, exit 0;
    now each such option is refused naming itself and what the use case uses instead, before any work
    (no flow run: an unknown NAME is not even looked up)."""
    for command, options in (("calibrate", CALIBRATE_ONLY), ("evaluate", EVALUATE_ONLY)):
        for option, value, instead in options:
            res = runner.invoke(app, [command, "no-such-case", "--quick", option, value])
            assert res.exit_code == 2, (command, option, res.output)
            said = _one_line(res)
            assert said.startswith(f"error: {option} applies to the standalone form only;"), said
            assert instead in said, (command, option, said)
            assert "unknown use case" not in said and "Traceback" not in said
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "report.json").exists()


def test_quick_and_thorough_exclude_each_other_in_both_forms(sp_home, tmp_path: Path) -> None:  # noqa: ANN001
    for args in (
        ["evaluate", "no-such-case"],
        ["evaluate", "--model", "smollm2-135m", "--plan", str(tmp_path / "plan")],
    ):
        res = runner.invoke(app, [*args, "--quick", "--thorough"])
        assert res.exit_code == 2, res.output
        assert _one_line(res).startswith("error: --quick and --thorough exclude each other"), res.output
    res = runner.invoke(app, ["evaluate", "no-such-case", "--thorough"])
    assert res.exit_code == 2 and "--thorough applies to the standalone form only" in _one_line(res)


def _flow_commands(tmp_path: Path) -> list[list[str]]:
    """Commands whose flows load the model in this process, all stopped before their flow starts."""
    return [
        ["calibrate", "no-such-case", "--quick"],
        ["evaluate", "no-such-case", "--quick"],
        ["run", "--specs", str(tmp_path / "no-specs")],
        ["serve"],
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gpu", "error: SPARSEPILOT_DEVICE='gpu': device 'gpu': choose one of auto, cpu, cuda"),
        ("cuda", "error: SPARSEPILOT_DEVICE='cuda': device 'cuda': torch sees no CUDA device"),
    ],
)
def test_a_device_setting_the_flows_cannot_use_is_one_error_line_and_exit_2(
    sp_home,  # noqa: ANN001
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    message: str,
) -> None:
    """SPARSEPILOT_DEVICE=gpu (or cuda on a host without CUDA) ended `evaluate NAME` with three tracebacks
    and exit 1 from inside the flow run; now the CLI checks it first."""
    import torch

    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this host has CUDA: SPARSEPILOT_DEVICE=cuda is usable here")
    monkeypatch.setenv("SPARSEPILOT_DEVICE", value)
    for args in _flow_commands(tmp_path):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        said = _one_line(res)
        assert message in said, (args, said)
        assert "Traceback" not in said and "Finished in state" not in said, (args, said)


def test_a_work_pool_without_a_prefect_server_is_one_error_line_and_exit_2(
    sp_home,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve --work-pool p` without PREFECT_API_URL: a 40-line traceback ending in a RuntimeError, exit 1."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = runner.invoke(app, ["serve", "--work-pool", "p"])
    assert res.exit_code == 2, res.output
    assert res.output.endswith("error: --work-pool needs a Prefect server: set PREFECT_API_URL\n"), res.output
    assert "Traceback" not in res.output and "schedule" not in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reason", "wrong mix"], "error: --reason goes with --abort"),
        (["--batches", "2", "--reason", "wrong mix"], "error: --reason goes with --abort"),
        (["--abort", "--reason", "x", "--max-new-tokens", "8"], "error: --abort stops the pilot"),
        (["--abort", "--reason", "x", "--external-assignment"], "error: --abort stops the pilot"),
        (["--abort", "--reason", "x", "--batches", "3"], "error: --abort stops the pilot"),  # review T4
        (["--observations", "rows.jsonl", "--batches", "3"], "error: --observations imports answers"),
        (["--again", "--reason", "x", "--batches", "3"], "error: --again starts a new pilot"),
        (["--again", "--abort", "--reason", "x"], "error: --again starts a new pilot"),
        (["--again", "--observations", "rows.jsonl", "--reason", "x"], "error: --again starts a new pilot"),
    ],
)
def test_pilot_refuses_options_its_form_does_not_read(sp_home, args, message) -> None:  # noqa: ANN001
    """`pilot NAME --reason ...` without --abort ran a pilot batch and dropped the reason (the operator
    meant to stop the pilot); an abort's batch options were ignored. Both are refused before sign-in."""
    res = runner.invoke(app, ["pilot", "no-such-case", *args])
    assert res.exit_code == 2, res.output
    assert _one_line(res).startswith(message), res.output
    assert "sign in" not in res.output.lower()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["calibrate"], ["evaluate"], ["run", "--use-case"]])
def test_a_prefect_server_that_does_not_answer_is_one_error_line_and_exit_2(
    sp_home,  # noqa: ANN001
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """Review X, X2: PREFECT_API_URL at a closed port ended every flow command in 145 lines of three
    chained tracebacks (`RuntimeError: Failed to reach API at ...`), exit 1; checked once, before the flow
    and before the MLflow store is made (a fresh home's store took 5-10 s of a command bound to fail)."""
    import yaml

    from rollout.usecases import add_usecase
    from tests.fixtures.flows import tiny_spec

    spec = tmp_path / "tiny-chat.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_llama_dir, "tiny-chat")))
    # `run` pilots a use case a person added only for a signed-in operator (review s46 A3): here, as the
    # main job's own samples are, the pipeline added it, and the check reached is Prefect's
    from rollout.audit import SYSTEM_ACTOR

    add_usecase(spec, actor=SYSTEM_ACTOR if command[0] == "run" else "test-owner")
    url = f"http://127.0.0.1:{_closed_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    monkeypatch.setenv("SPARSEPILOT_DEVICE", "cpu")
    res = runner.invoke(app, [*command, "tiny-chat"])
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert f"error: PREFECT_API_URL={url}: the Prefect server does not answer (connection refused)" in said
    assert "Traceback" not in res.output
    store = sp_home.home / "mlflow.db"  # said before the MLflow store's seconds of creating (or upgrading)
    assert not store.exists(), "the MLflow store was made before the Prefect server was checked"
    if command == ["calibrate"]:  # in a process of its own, as a user runs it (Prefect reads it at start)
        import os

        from tests.flows.test_quiet_console import sparsepilot_cli

        code, out = sparsepilot_cli(["calibrate", "tiny-chat"], dict(os.environ), timeout=300)
        assert code == 2, out
        assert f"error: PREFECT_API_URL={url}: the Prefect server does not answer" in " ".join(out.split())
        assert "Traceback" not in out
        assert not store.exists(), "the MLflow store was made before the Prefect server was checked"


def test_a_prefect_server_that_answers_passes_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any HTTP answer is a server that answers (what it says is left to Prefect); a URL that is not
    http(s) is named."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flows.common import require_prefect_api
    from rollout.settings import SettingsError

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_address[1]}/api/")
        require_prefect_api()
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("PREFECT_API_URL", "ftp://127.0.0.1/api")
    with pytest.raises(SettingsError, match="PREFECT_API_URL=ftp://127.0.0.1/api: not an http"):
        require_prefect_api()
    monkeypatch.delenv("PREFECT_API_URL")
    require_prefect_api()  # unset: the flows start their own server
