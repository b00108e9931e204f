"""The model commands besides `run` (calibrate, evaluate, pilot, the model benchmarks) keep library
warnings and weight-loading bars out of the console too: a real process on the tiny model, stdout not a
terminal, every Python warning enabled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flows.test_quiet_console import NOISE, sparsepilot_cli


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """One real standalone `calibrate` (stdout and stderr pipes, every Python warning enabled), which the
    two tests below judge, each its own behaviour: (exit code, console, its tmp dir)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    env = {**os.environ, "SPARSEPILOT_HOME": str(tmp / "home"), "PYTHONWARNINGS": "default"}
    args = ["calibrate", "--model", str(tiny_llama_dir), "--texts", "stdlib", "--quick", "--seq-len", "256"]
    args += ["--max-texts", "12", "--estimator", "pooled", "--budget", "kl=0.05,agree=0.9"]
    rc, out = sparsepilot_cli([*args, "--out", str(tmp / "plan")], env)
    return rc, out, tmp


def test_standalone_calibrate_keeps_library_output_in_its_log_file(calibrated: tuple[int, str, Path]) -> None:
    rc, out, tmp = calibrated
    assert rc == 0, out
    assert (tmp / "plan" / "plan.json").exists()
    assert not NOISE.search(out), NOISE.search(out).group(0) + "\n" + out
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", out).group(1))
    assert log.parent == tmp / "home" / "logs" and log.name.startswith("calibrate-")
    assert log.exists()


# One real process per side, two started side by side, as a command runs after its log file is set up
# (`to_log_file`, its path printed first): a library's own tqdm bar, the state DB's mappers configured and
# GX imported, Prefect's service loggers warning as they drain. The tests below each judge one behaviour.
AFTER_LOG_FILE = """
import logging, sys; from pathlib import Path
from sparsepilot.quiet import progress_logger, to_log_file
print(to_log_file(Path(sys.argv[1]), 'bench-quality'), flush=True)
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'): pass
import great_expectations  # noqa: F401
import sqlalchemy.orm
from rollout.db import models  # noqa: F401
sqlalchemy.orm.configure_mappers()
logging.getLogger('sqlalchemy.orm.mapper.Mapper').warning('a mapper warning')
progress_logger().info('calibration sensitivity 1/2')
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
for worker in (EventsWorker, APILogWorker):
    logging.getLogger(worker.__name__).warning('Still processing items: 3 items remaining...')
"""


@pytest.fixture(scope="module")
def after_log_file(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, Path, str, str]]:
    """The two processes of `AFTER_LOG_FILE` (tqdm's TQDM_* unset: it reads them when first imported):
    (exit code, log file, stdout, stderr) of each."""
    home = tmp_path_factory.mktemp("after-log-file")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AFTER_LOG_FILE, str(home)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    ran = [(p, *p.communicate(timeout=300)) for p in procs]
    return [(p.returncode, Path(out.split("\n", 1)[0].strip()), out, err) for p, out, err in ran]


def test_a_librarys_own_tqdm_bar_stays_off_the_console(after_log_file: list) -> None:
    """transformers converts a GGUF checkpoint under a bare `tqdm` bar (a fresh model cache, i.e. every
    first `make run`); tqdm reads TQDM_DISABLE when it is first imported, and MLflow imports it inside
    to_log_file. A real process, as a command runs it: log file first, then the library's bar."""
    for rc, _, out, err in after_log_file:
        assert rc == 0, err
        assert "de-quantizing" not in out + err, err


def test_two_processes_in_the_same_second_get_two_log_files(after_log_file: list) -> None:
    """Two benches started side by side used to write one log file (its name had the second only)."""
    assert all(rc == 0 for rc, *_ in after_log_file)
    paths = {path for _, path, _, _ in after_log_file}
    assert len(paths) == 2 and all(p.exists() and p.name.startswith("bench-quality-") for p in paths)


def test_the_log_file_needs_no_mlflow(tmp_path: Path) -> None:
    """A machine with only the model stack (a GPU box running `bench`, docs/sparse_core/gpu_bench.sh)
    has no MLflow: the log file is still made and still takes the warnings, in a real process."""
    code = (
        "import sys; sys.modules['mlflow'] = None  # import mlflow now raises ImportError\n"
        "import warnings; from pathlib import Path\n"
        "from sparsepilot.quiet import to_log_file\n"
        f"path = to_log_file(Path({str(tmp_path)!r}), 'bench-prefill')\n"
        "warnings.warn('a library warning')\n"
        "print(path)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "a library warning" not in proc.stderr
    assert "a library warning" in Path(proc.stdout.strip()).read_text()


def test_prefects_service_drain_warning_goes_to_the_log_file(after_log_file: list) -> None:
    """A flow command that ends while Prefect's events worker still drains its queue printed "WARNING |
    EventsWorker - Still processing items: N items remaining..." at the console: the service loggers are
    named after their class, outside the `prefect` tree. A real process, the worker's own logger."""
    for rc, path, _, err in after_log_file:
        assert rc == 0, err
        assert "Still processing items" not in err, err
        log = path.read_text()
        assert log.count("Still processing items") == 2, log
        assert "EventsWorker" in log and "APILogWorker" in log


def test_sqlalchemy_and_gx_reach_the_log_file_at_warning_only(after_log_file: list) -> None:
    """Review P finding 7: a flow command's log was ~95% SQLAlchemy ORM mapper INFO (and GX's docs
    decorators), burying the progress lines. In a real process, as a command runs it: the state DB's
    mappers configured and GX imported after the log file is set up leave no INFO of theirs in it, while
    their warnings and our progress lines still arrive."""
    for rc, path, _, err in after_log_file:
        assert rc == 0, err
        text = path.read_text()
        assert not re.search(r" INFO (sqlalchemy|great_expectations)", text), text[:2000]
        assert "WARNING sqlalchemy.orm.mapper.Mapper: a mapper warning" in text
        assert "INFO sparsepilot.progress: calibration sensitivity 1/2" in text


def test_bench_dashboard_keeps_streamlits_bare_mode_warnings_in_its_log_file(tmp_path: Path) -> None:
    """Review P finding 8: `bench dashboard` renders pages outside `streamlit run`, and Streamlit's own
    stderr handlers printed "missing ScriptRunContext!" on the console for every page. A real process:
    the console has the log file's path and the table; the warnings are in the file."""
    env = {**os.environ, "SPARSEPILOT_HOME": str(tmp_path / "home")}
    args = ["bench", "dashboard", "--use-cases", "3", "--observations", "400", "--repeats", "1"]
    rc, out = sparsepilot_cli([*args, "--home", str(tmp_path / "h"), "--out", str(tmp_path / "d.json")], env)
    assert rc == 0, out
    assert "ScriptRunContext" not in out and "dashboard render times" in " ".join(out.split())
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", out).group(1))
    assert log.parent == tmp_path / "home" / "logs" and log.name.startswith("bench-dashboard-")
    assert "missing ScriptRunContext" in log.read_text()


def test_standalone_calibrate_writes_its_progress_to_the_log_file_and_a_pipe(
    calibrated: tuple[int, str, Path],
) -> None:
    """Review P finding 6: the standalone `calibrate` left its log file empty and, piped, printed a line
    only when a stage ended. A real process, stderr a pipe: lines within a stage as well as at its end,
    each once on the console (Prefect's console handler on the root logger printed them twice when they
    propagated) and each in the log file."""
    rc, out, _ = calibrated
    assert rc == 0, out
    steps = re.findall(r"^(\S[^:\n]*: (\d+)/(\d+)(?: done)? at \d+ s)$", out, flags=re.MULTILINE)
    assert any(int(d) < int(t) for _, d, t in steps), out  # within a stage, not only at its end
    assert any(line.startswith("sensitivity: ") and " done at " in line for line, _, _ in steps), out
    lines = [line for line, _, _ in steps]
    assert len(lines) == len(set(lines)), out  # each once
    assert "sparsepilot.progress" not in out, out  # never a logging record's copy on the console
    log = Path(re.search(r"log file \(warnings and library output\): (\S+)", out).group(1)).read_text()
    logged = re.findall(r"INFO sparsepilot\.progress: (.*)$", log, flags=re.MULTILINE)
    assert logged == lines


def test_progress_lines_are_a_stages_start_each_tenth_and_its_end() -> None:
    from sparsepilot.commands.core import ProgressLines

    lines = ProgressLines()
    shown = [d for d in range(1, 101) if lines("gate training", d, 100)]
    assert shown == [1, *range(10, 101, 10)]
    assert lines("gate training", 100, 100) is None  # the end once
    assert lines("sensitivity", 1, 3).startswith("sensitivity: 1/3 at ")
    assert lines("sensitivity", 3, 3).startswith("sensitivity: 3/3 done at ")
    assert lines("sensitivity", 1, 3) is not None  # the stage again (its count went back): a new run
