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
        (["bench", "decode-scorers", "--prompts", "1"], "--prompts must be >= 2, got 1"),
    ],
)
def test_a_bad_count_is_an_error_line_before_any_work(tmp_path: Path, args: list[str], said: str) -> None:
    out = tmp_path / "result.json"
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert f"error: {said}" in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not out.exists() and not (tmp_path / "result.log").exists()
