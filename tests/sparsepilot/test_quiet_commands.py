"""The model commands besides `run` (calibrate, evaluate, pilot, the model benchmarks) keep library
warnings and weight-loading bars out of the console too: a real process on the tiny model, stdout not a
terminal, every Python warning enabled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.flows.test_quiet_console import NOISE


def test_standalone_calibrate_keeps_library_output_in_its_log_file(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "SPARSEPILOT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "default"}
    args = ["calibrate", "--model", str(tiny_llama_dir), "--texts", "stdlib", "--quick", "--seq-len", "256"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsepilot",
            *args,
            "--estimator",
            "pooled",
            "--out",
            str(tmp_path / "plan"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert (tmp_path / "plan" / "plan.json").exists()
    assert not NOISE.search(out), NOISE.search(out).group(0) + "\n" + out
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", out).group(1))
    assert log.parent == tmp_path / "home" / "logs" and log.name.startswith("calibrate-")
    assert log.exists()
