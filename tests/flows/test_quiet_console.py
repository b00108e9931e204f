"""`sparsepilot run` as a user sees it with stdout not a terminal (CI, `make run | tee`): one line per
finished stage with its time, no third-party warnings or weight-loading bars on the console, and all of
that kept in the log file. A real process on the tiny model, against the session's Prefect server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rollout.auth import hash_password
from tests.fixtures.env import fresh_cli_env
from tests.fixtures.flows import tiny_spec
from tests.fixtures.trust import sparsepilot_as

# real commands: the main job (313 s at -n 0 on a host at load 12), init + usecase add + gate (188 s there)
pytestmark = pytest.mark.slow

NOISE = re.compile(
    r"Warning:|WARNING|warnings\.warn|Loading (checkpoint|weights)|it/s\]|s/it\]|Traceback"
    r"|[Rr]egistered model|CloudPickle"
)


def sparsepilot_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> tuple[int, str]:
    """`python -m sparsepilot ARGS` in a real process, stdout not a terminal: (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sparsepilot", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_run_prints_stage_lines_and_keeps_library_noise_in_the_log(
    prefect_harness: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "tiny-chat.yaml").write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "tiny-chat")))
    home = tmp_path / "home"
    env = {
        **os.environ,
        "SPARSEPILOT_HOME": str(home),
        "PREFECT_API_URL": prefect_harness,
        "COLUMNS": "160",
        "PYTHONWARNINGS": "default",  # every warning is raised, none silenced by Python's defaults
        # the use cases `run --specs` adds are an operator's (as `usecase add`): olga signs in
        "SPARSEPILOT_ACCOUNTS": f"olga:operator:{hash_password('olga-pw-1234')}",
        "SPARSEPILOT_USER": "olga",
    }
    for key in ("SPARSEPILOT_DATABASE_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    subprocess.run([sys.executable, "-m", "sparsepilot", "init"], env=env, check=True, capture_output=True)
    args = ["run", "--specs", str(specs), "--max-new-tokens", "4", "--password-stdin"]
    proc = subprocess.run(
        [sys.executable, "-m", "sparsepilot", *args],
        env=env,
        input="olga-pw-1234\n",
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), out  # 1 = a use case failed; the output is still judged below
    took = r"(\d+ s|\d+ min \d\d s)"  # main_job._duration: "1 min 34 s" from 90 s on (a busy host)
    assert re.search(rf"tiny-chat: validate\+calibrate done in {took} \({took} into the run\)", out), out
    assert re.search(r"tiny-chat: evaluate done in \d+", out), out
    assert not NOISE.search(out), NOISE.search(out).group(0) + "\n" + out
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", out).group(1))
    text = log.read_text()
    assert "sparsepilot.progress" in text and "validate+calibrate done" in text
    assert re.search(r"WARNING (py\.warnings|transformers|mlflow)", text), (
        "no library warning reached the log"
    )

    # A use-case flow command after it (here the evaluation the job made, found again by its key): its
    # console is Prefect's flow-run lines and the result, never the libraries' INFO records (SQLAlchemy's
    # mapper set-up and httpx's requests to the Prefect API printed ~860 lines here before)
    rc, out = sparsepilot_cli(["evaluate", "tiny-chat", "--quick"], env)
    assert rc == 0, out
    assert "evaluation of tiny-chat" in out and re.search(r"quality_low\s+│", out), out
    library = re.search(
        r"\| (INFO|WARNING)\s+\| (sqlalchemy|httpx|alembic|mlflow|urllib3|great_expectations)", out
    )
    assert library is None and not NOISE.search(out), out


def test_a_flow_command_refused_by_a_known_error_says_it_in_one_line(
    prefect_harness: str, tiny_model_dir: Path, trust_accounts: str, tmp_path: Path
) -> None:
    """A SparsePilot error raised inside a flow (here a gate look with no pilot; a busy use case, bad
    input and a lost lease alike), against a configured Prefect server: the console has the flow run's
    state line and the command's `error:` line, exit 2, not Prefect's traceback (~30 lines before); the
    traceback is in the log file, with the flow run's other records (which a Prefect logging set-up after
    the file's had kept out of it). (An unknown use case is refused before any flow starts now.)"""
    home = tmp_path / "home"
    env = {**fresh_cli_env(home, trust_accounts, COLUMNS="160"), "PREFECT_API_URL": prefect_harness}
    subprocess.run([sys.executable, "-m", "sparsepilot", "init"], env=env, check=True, capture_output=True)
    spec = tmp_path / "tiny-chat.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, "tiny-chat")))
    assert sparsepilot_as(["usecase", "add", str(spec)], env, "olga")[0] == 0
    rc, out = sparsepilot_as(["gate", "tiny-chat"], env, "olga")
    assert rc == 2, out
    assert "error: tiny-chat: no active pilot" in out
    assert "Flow run" in out and "Finished in state Failed" in out, out
    assert "Traceback" not in out and "Encountered exception" not in out, out
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", out).group(1)).read_text()
    assert "ERROR prefect.flow_runs: Encountered exception during execution: GateError" in log
    assert "Traceback" in log and "INFO prefect.flow_runs: Beginning flow run" in log
    assert "temporary server" not in log  # the configured server answered
