"""A flow run that `sparsepilot serve`'s runner starts in a process of its own (as `python -m
prefect.engine` does, with the serve's environment) joins the serve's log file: its progress lines and the
libraries' warnings (MLflow's, Python's) go there, and the libraries' warnings stay off the console, which
keeps the flow run's own lines (review s50 E1: all of them reached the serve's terminal only). A real
process against the session's Prefect server; the serve side (SPARSEPILOT_SERVED_LOG_FILE set for the
runner) is tests/flows/test_serve_schedules.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.quiet import SERVED_LOG_FILE

REPO = Path(__file__).resolve().parents[2]

FLOW_RUN = """
import logging, warnings
from prefect import get_run_logger
from flows.common import sparsepilot_flow

@sparsepilot_flow("served-noise")
def noisy() -> None:
    get_run_logger().info("served-case: batch 1/1 of step 0 (shadow), 5 requests")
    warnings.warn("a library's own warning", UserWarning)
    logging.getLogger("mlflow.pyfunc").warning("Passing a Python object as `python_model` ...")

noisy()
"""


def test_a_flow_run_in_the_serves_environment_writes_to_its_log_file(
    prefect_harness: str, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "serve-20261207T000000Z-1.log"
    log.parent.mkdir()
    log.write_text("2026-12-07 00:00:00,000 INFO sparsepilot: the serve's own line\n")
    # the serve's environment, not this worker's: an in-process `sparsepilot run` earlier in the worker left
    # PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL=WARNING in os.environ (its progress display owns the terminal),
    # which took the flow run's INFO lines off the console (the CI's order: the console read '')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING_")}
    env.update({"PREFECT_API_URL": prefect_harness, SERVED_LOG_FILE: str(log)})
    proc = subprocess.run(
        [sys.executable, "-c", FLOW_RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    text = log.read_text()
    assert text.startswith("2026-12-07 00:00:00,000 INFO sparsepilot: the serve's own line\n")  # appended
    assert "INFO prefect.flow_runs: Beginning flow run " in text, text  # Prefect's first record of the run
    assert "INFO prefect.flow_runs: served-case: batch 1/1 of step 0 (shadow)" in text, text
    assert "WARNING py.warnings:" in text and "a library's own warning" in text, text
    assert "WARNING mlflow.pyfunc: Passing a Python object" in text, text
    assert "served-case: batch 1/1 of step 0" in console, console  # the flow run's own line stays
    assert "a library's own warning" not in console and "python_model" not in console, console
