"""`sparsepilot bench ... --out`: checked before any work (review P finding 4: a directory given as --out
used to run the whole benchmark, then die with a traceback and lose its table and JSON), and the tables
printed before the files are written, so a write that fails late loses no result. `bench import` and
`bench monitor` show each size's `overloaded` and warn as the other benches do (finding 9)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from sparsepilot.cli import app

# every bench command with arguments that would make it cheap if it ran (it must not)
BENCHES = {
    "attention": [
        "attention",
        "--lengths",
        "2048",
        "--dtypes",
        "fp32",
        "--kernels",
        "gather",
        "--repeats",
        "1",
    ],
    "prefill": ["prefill", "--quick"],
    "quality": ["quality", "--quick"],
    "decode": ["decode", "--quick"],
    "decode-scorers": ["decode-scorers", "--prompts", "2"],
    "dashboard": ["dashboard", "--use-cases", "3", "--observations", "400", "--repeats", "1"],
    "gate": ["gate", "--rows", "4", "--repeats", "1"],
    "import": ["import", "--rows", "2000"],
    "monitor": ["monitor", "--rows", "400", "--batch", "50", "--looks", "1"],
}


@pytest.mark.parametrize("bench", list(BENCHES))
def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    bench: str, sp_home, tmp_path: Path
) -> None:  # noqa: ANN001
    work = tmp_path / "work"
    outdir = work / "outdir"
    outdir.mkdir(parents=True)
    res = CliRunner().invoke(app, ["bench", *BENCHES[bench], "--out", str(outdir)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("log file")]
    assert lines == [f"error: --out {outdir}: {outdir} is a directory; give a file path for the JSON"]
    # nothing ran: no progress log, no plot beside it, nothing in it
    assert sorted(p.name for p in work.iterdir()) == ["outdir"] and not any(outdir.iterdir())
    a_file = work / "a-file"
    a_file.write_text("")
    res = CliRunner().invoke(app, ["bench", *BENCHES[bench], "--out", str(a_file / "x" / "r.json")])
    assert res.exit_code == 2 and f"{a_file} is not a directory" in res.output, res.output
    png = work / "r.png"
    png.mkdir()  # the plot's name next to the JSON
    res = CliRunner().invoke(app, ["bench", *BENCHES[bench], "--out", str(work / "r.json")])
    assert res.exit_code == 2 and f"{png} is a directory" in res.output, res.output


# what a progress log beside /dev/full would be: made in /dev (as root the old code made it there)
BESIDE_DEV_FULL = Path("/dev/full.log")


@pytest.fixture(scope="module")
def dev_full_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SPARSEPILOT_HOME of the `bench import --out /dev/full` runs (their progress log goes to its
    logs folder)."""
    return tmp_path_factory.mktemp("bench-home")


@pytest.fixture(scope="module")
def import_to_dev_full(dev_full_home: Path) -> Iterator[tuple[Result, Result]]:
    """`bench import --out /dev/full`, as a table and with --json: one real run each, shared by the
    tests below (a run is a fresh process with a scratch home of its own, several seconds each).
    /dev/full passes the --out check (a writable file) and every write to it fails (no space left).
    A /dev/full.log an older build made is removed before and after (the runs must make none)."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a write that fails: ENOSPC)")
    BESIDE_DEV_FULL.unlink(missing_ok=True)
    env = {"SPARSEPILOT_HOME": str(dev_full_home)}
    args = ["bench", *BENCHES["import"], "--out", "/dev/full"]
    table = CliRunner(env={**env, "COLUMNS": "200"}).invoke(app, args)
    as_json = CliRunner(env=env).invoke(app, [*args, "--json"])
    yield table, as_json
    BESIDE_DEV_FULL.unlink(missing_ok=True)


def test_a_device_as_out_gets_no_file_beside_it(
    import_to_dev_full: tuple[Result, Result], dev_full_home: Path
) -> None:
    """`--out /dev/full`: the progress log went beside it, to /dev/full.log, a file made in /dev; it goes
    to the home's logs folder, where the run says it is, with or without --json."""
    assert not BESIDE_DEV_FULL.exists()
    log = dev_full_home / "logs" / "full.log"
    said = f"progress log: {log} (--out /dev/full is not a regular file: nothing is written beside it)"
    for res in import_to_dev_full:
        assert said in res.stderr, res.stderr
    lines = log.read_text().splitlines()
    assert [ln[9:] for ln in lines if ln[9:].startswith("import benchmark:")] == [
        "import benchmark: started",
        "import benchmark: done",
    ] * 2, lines


@pytest.mark.parametrize("out", ["/dev/stdout", "results/r.json", "results/r"])
def test_a_progress_log_and_plot_go_beside_a_file_out_and_to_the_logs_folder_otherwise(
    out: str, sp_home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: ANN001
    """Every bench's progress log (`_progress_log`) and plot (`side_file`) go beside --out only where it
    is a regular file or none yet, never beside a device or a link such as /dev/stdout (a /dev/stdout.log
    the check makes, as root, is removed)."""
    from sparsepilot.commands import bench

    monkeypatch.chdir(tmp_path)
    beside = Path(out).with_suffix(".log")
    if out.startswith("/dev/") and (not Path(out).exists() or beside.exists()):
        pytest.skip(f"needs {out} and no {beside}")
    try:
        bench.check_out(out)
        with bench._progress_log(out) as log:
            log("a step")
        made_beside = beside.exists()
    finally:
        if out.startswith("/dev/"):
            beside.unlink(missing_ok=True)
    logs, said = sp_home.home / "logs", capsys.readouterr().err
    if out.startswith("/dev/"):
        assert not made_beside
        assert (logs / "stdout.log").read_text().endswith(" a step\n")
        assert said.startswith(f"progress log: {logs}/stdout.log (--out {out} is not a regular file"), said
        assert bench.side_file(out, ".png") == logs / "stdout.png"
    else:
        assert beside.read_text().endswith(" a step\n") and said == ""  # said only with say_where
        assert not logs.exists() or not any(logs.iterdir())
        assert bench.side_file(out, ".png") == Path(out).with_suffix(".png")


@pytest.mark.parametrize("json_out", [False, True])
def test_an_out_that_is_the_commands_own_output_gets_the_json_after_its_tables(
    json_out: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench gate --out /dev/stdout > run.txt`: the JSON was written by opening --out anew with
    truncation, which wiped the tables already printed to run.txt. The JSON follows them on stdout now,
    and with --json (the JSON printed already) it is there once. In process: stdout is a file, and --out
    names it as /dev/stdout names fd 1 (/dev/fd/N)."""
    import sys

    from sparsepilot.commands import bench
    from sparsepilot.console import print_table

    result = {"decide": {"rows": [{"mode": "split", "rows": 4, "best_s": 0.011}]}}
    with (tmp_path / "run.txt").open("w") as redirected:
        out = f"/dev/fd/{redirected.fileno()}"
        if not Path(out).exists():
            pytest.skip("needs /dev/fd")
        monkeypatch.setattr(sys, "stdout", redirected)
        print_table("decide() time", result["decide"]["rows"])  # the bench's table, then its JSON
        if not bench._saved_and_emitted(result, out, json_out):
            bench._write_json(result, out)
        monkeypatch.undo()
    text = (tmp_path / "run.txt").read_text()
    assert text.lstrip().startswith("decide() time"), text[:80]  # the table, kept
    start = text.index("\n{\n") + 1
    assert json.loads(text[start:]) == result  # then the JSON, once


def test_a_write_that_fails_late_loses_no_result(import_to_dev_full: tuple[Result, Result]) -> None:
    """A write to /dev/full fails late: the table is printed first, then a one-line error, exit 2, no
    traceback."""
    res, as_json = import_to_dev_full
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "observation import" in text and "2000" in text and "overloaded" in text  # the table, first
    assert text.index("observation import") < text.index("error: --out /dev/full: the JSON could not be")
    assert "Traceback" not in res.output
    res = as_json
    assert res.exit_code == 2 and '"inserted": 2000' in res.output  # --json: the JSON printed first


def test_import_and_monitor_tables_show_overloaded_and_warn(
    import_to_dev_full: tuple[Result, Result],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Each size runs in its own process and carries its own `overloaded`: the table shows it, and a
    run with an overloaded size ends with the warning the other benches print. The host is what it is
    when the test runs, so the rows are a real run's (the JSON the --json run printed before its write
    failed) with the flag set to each case."""
    from sparsepilot.commands.bench import _state_db_table

    table, as_json = import_to_dev_full
    assert "overloaded" in table.output  # the column
    result = json.loads(as_json.stdout)
    out = tmp_path / "import.json"
    cols = ["rows", "import_s", "others_busy_cores", "overloaded"]
    for flag in (False, True):
        result["results"][0]["overloaded"] = flag
        _state_db_table("observation import", result, str(out), cols)
        text = " ".join(capsys.readouterr().out.split())
        warned = "warning: 1 of 1 rows were timed while the host was overloaded" in text
        assert warned == flag, text
        assert json.loads(out.read_text())["results"][0]["overloaded"] is flag  # then the JSON written


def test_a_model_bench_with_json_prints_its_table_then_the_json_it_writes(tmp_path: Path) -> None:
    """A model benchmark's --json: its table, then the JSON, printed before the PNG and the JSON are
    written (the file the same JSON, naming the PNG beside it)."""
    out = tmp_path / "attention.json"
    # its cheap arguments, at 512 tokens (an option given twice: the last counts)
    args = ["bench", *BENCHES["attention"], "--lengths", "512", "--threads", "1", "--json", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    start = res.stdout.index("\n{\n") + 1
    assert "Attention layer" in res.stdout[:start]  # the table first
    printed = json.loads(res.stdout[start:])
    assert printed == json.loads(out.read_text()) and Path(printed["plot"]) == out.with_suffix(".png")
    assert out.with_suffix(".png").is_file()
