"""`sparsepilot bench monitor`: a monitor look timed on a scratch state DB holding N rows, through the
monitor's own domain calls, in a fresh process per size; and `bench import`, which shares its runner."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from rollout.bench_home import in_fresh_processes
from sparsepilot.cli import app


def test_a_look_judges_every_row_since_promotion(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "monitor.json"
    args = ["bench", "monitor", "--rows", "400", "--rows", "1000", "--batch", "50", "--looks", "2"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [r["rows"] for r in result["results"]] == [400, 1000]
    for r in result["results"]:
        # the seeded rows, then two looks of 50 requests in both arms; the detector sees every look
        assert r["rows_judged"] == r["rows"] + 2 * 100
        assert r["looks_judged"] == r["rows"] // 100 + 2
        assert r["outcome"] == "GO" and r["breached"] == ""  # a healthy champion: 1% errors
        assert r["host_load"]["overloaded"] == r["overloaded"] and "wait_share" in r["host_load"]
        parts = ("target_s", "target_import_s", "store_s", "read_s", "judge_s", "look_s")
        assert all(r[p] > 0 for p in parts)
        assert r["peak_rss_mib"] > 0 and r["database"] == "sqlite"
    assert "one monitor look" in " ".join(res.output.split())
    # progress, as the model benchmarks keep it: a timestamped line per size in the log beside the JSON
    log = (tmp_path / "monitor.log").read_text().splitlines()
    assert log[0].endswith("monitor benchmark: started") and log[-1].endswith("monitor benchmark: done")
    assert any(line.endswith("monitor at 400 rows: started") for line in log)
    assert any(" monitor at 1,000 rows: done in " in line for line in log), log


def test_the_judgement_is_timed_under_the_promoted_pilots_spec_version(sp_home, tmp_path) -> None:  # noqa: ANN001
    """The bench judged with the use case's newest spec version; the monitor judges with the one its
    promoted pilot started under (`decisions.monitor_look`), so a later version's guardrails are not
    what a look runs."""
    import yaml

    from rollout import monitor_bench
    from rollout.bench_home import setup_home
    from rollout.usecases import add_usecase

    home = tmp_path / "bench-home"
    home.mkdir()
    name = setup_home(home, monitor_bench.NAME)
    monitor_bench._promoted_monitor_step(name)  # under spec version 1
    spec = yaml.safe_load((home / "spec.yaml").read_text())
    spec["gate"]["guardrails"] = {"max_error_rate": 0.2}  # version 2, after the promotion
    (home / "v2.yaml").write_text(yaml.safe_dump(spec))
    assert add_usecase(home / "v2.yaml", actor="bench", new_version=True).status == "new_version"
    assert monitor_bench._spec(name).gate.guardrails.max_error_rate == 0.01  # version 1's (the default)


def test_a_size_below_one_look_is_refused(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "monitor.json"
    res = CliRunner().invoke(app, ["bench", "monitor", "--rows", "99", "--batch", "50", "--out", str(out)])
    assert res.exit_code != 0 and "--rows" in res.output and not out.exists()


def test_bench_import_imports_every_row_in_a_fresh_process(tmp_path) -> None:  # noqa: ANN001
    """`bench import` shares the scratch home and the process-per-size runner (`rollout.bench_home`).
    Review L8: its rows carry the host's whole load record, as the docs say (`host_load`, with the wait
    share that decides `overloaded`; it had only the others' cores and the flag), the load averages are
    numbers (they were /proc/loadavg's strings), and with --json the overload warning goes to stderr (it
    was printed nowhere)."""
    out = tmp_path / "import.json"
    res = CliRunner().invoke(app, ["bench", "import", "--rows", "2000", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert json.loads(res.stdout) == result  # stdout is the JSON alone
    (r,) = result["results"]
    assert r["rows"] == r["inserted"] == 2000 and r["torch_loaded"] is False and r["peak_rss_mib"] > 0
    load = r["host_load"]
    assert load["overloaded"] == r["overloaded"] and load["threads"] == 1 and "wait_share" in load
    assert all(isinstance(x, float) for x in [*result["loadavg"], *load["loadavg"]]), result["loadavg"]
    warned = "warning: 1 of 1 rows were timed while the host was overloaded" in " ".join(res.stderr.split())
    assert warned == r["overloaded"], res.stderr
    log = (tmp_path / "import.log").read_text().splitlines()  # progress, as the model benchmarks keep it
    assert log[0].endswith("import benchmark: started") and log[-1].endswith("import benchmark: done")
    assert any(" import of 2,000 rows: done in " in line for line in log), log


def _dies(code: int, queue) -> None:  # noqa: ANN001 - a bench size whose process dies before it answers
    os._exit(code)


def test_a_bench_process_that_dies_is_an_error_not_a_hang() -> None:
    with pytest.raises(RuntimeError, match=r"\(3,\) exited with code 3 before it answered"):
        in_fresh_processes(_dies, [(3,)])
