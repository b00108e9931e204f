"""Bad counts given to a benchmark end with one `error:` line naming the option and exit code 2, before
any work (review M, M5: `bench attention --repeats 0` raised a TypeError after setting up its tensors,
`bench quality --max-texts -3` a ValueError from inside calibration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsepilot.cli import app

ATTENTION = ["bench", "attention", "--lengths", "512", "--dtypes", "fp32", "--kernels", "gather"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([*ATTENTION, "--repeats", "0"], "--repeats must be >= 1, got 0"),
        ([*ATTENTION, "--repeats", "-2"], "--repeats must be >= 1, got -2"),
        (["bench", "quality", "--quick", "--max-texts", "-3"], "--max-texts must be 0 (by mode) or >= 2"),
        (["bench", "quality", "--quick", "--max-texts", "1"], "--max-texts must be 0 (by mode) or >= 2"),
        (["bench", "quality", "--quick", "--gate-steps", "-1"], "--gate-steps must be >= 0, got -1"),
        (["bench", "quality", "--quick", "--max-checks", "-5"], "--max-checks must be >= 0, got -5"),
        (["bench", "dashboard", "--use-cases", "0"], "--use-cases must be >= 1, got 0"),
        (["bench", "dashboard", "--observations", "-1"], "--observations must be >= 0, got -1"),
        (["bench", "dashboard", "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["bench", "gate", "--replications", "0"], "--replications must be >= 1, got 0"),
        (["bench", "gate", "--nogo-replications", "0"], "--nogo-replications must be >= 1, got 0"),
        (["bench", "decode-scorers", "--prompts", "1"], "--prompts must be >= 2, got 1"),
    ],
)
def test_a_bad_count_is_an_error_line_before_any_work(tmp_path: Path, args: list[str], said: str) -> None:
    out = tmp_path / "result.json"
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert f"error: {said}" in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not out.exists() and not (tmp_path / "result.log").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DASHBOARD = ["bench", "dashboard", "--use-cases", "1", "--observations", "0", "--repeats", "1"]


def test_bench_dashboard_refuses_a_password_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s46 A10: `--database-url` took the password where `ps` shows it to every local user. A URL
    with a password is refused, naming the variable that takes it; nothing is seeded or written."""
    monkeypatch.delenv("SPARSEPILOT_BENCH_DATABASE_URL", raising=False)
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))  # its log file
    out = tmp_path / "result.json"
    url = f"postgresql+psycopg://app:S3cretDbPw@127.0.0.1:{_closed_port()}/bench"
    res = CliRunner().invoke(
        app, [*DASHBOARD, "--out", str(out), "--home", str(tmp_path / "h"), "--database-url", url]
    )
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "error: --database-url holds a password" in said and "set SPARSEPILOT_BENCH_DATABASE_URL" in said
    assert "S3cretDbPw" not in res.output and "Traceback" not in res.output and not out.exists()
    assert not (tmp_path / "h" / "state.db").exists()


@pytest.mark.parametrize("how", ["option", "variable"])
def test_bench_dashboard_on_an_unreachable_database_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Review s46 A10: an unreachable database ended in two tracebacks (157 lines) and exit 1. Now one
    `error:` line naming the host, its password masked, and exit 2."""
    port = _closed_port()
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "home"))  # its log file
    out = tmp_path / "result.json"
    args = [*DASHBOARD, "--out", str(out), "--home", str(tmp_path / "h")]
    if how == "option":
        args += ["--database-url", f"postgresql+psycopg://app@127.0.0.1:{port}/bench"]
        monkeypatch.delenv("SPARSEPILOT_BENCH_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv(
            "SPARSEPILOT_BENCH_DATABASE_URL", f"postgresql+psycopg://app:S3cretDbPw@127.0.0.1:{port}/b"
        )
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    user = "app:***" if how == "variable" else "app"
    assert f"error: the benchmark's database postgresql+psycopg://{user}@127.0.0.1:{port}/" in said, said
    assert "cannot be used: OperationalError" in said and "Traceback" not in res.output
    assert "S3cretDbPw" not in res.output and not out.exists()
    logs = [*(tmp_path / "home" / "logs").glob("bench-dashboard-*.log"), out.with_suffix(".log")]
    assert out.with_suffix(".log").is_file() and not any("S3cretDbPw" in log.read_text() for log in logs)
    assert "error: the benchmark's database" in out.with_suffix(".log").read_text()
