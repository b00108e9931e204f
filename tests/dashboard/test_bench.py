"""`sparsepilot bench dashboard` on a small portfolio: it seeds exactly what it says and renders every
page (the timings themselves are only printed, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dashboard.bench import seed_portfolio
from rollout import queries
from rollout.bench_verdict import within_target
from rollout.settings import Settings
from sparsepilot.cli import app
from tests.dashboard.apptest_helpers import new_app, open_page


def test_bench_dashboard_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSEPILOT_DATABASE_URL", raising=False)
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "scratch"))  # restored after: the bench sets it
    out = tmp_path / "dashboard.json"
    args = ["bench", "dashboard", "--use-cases", "14", "--observations", "1000", "--repeats", "1"]
    r = CliRunner().invoke(app, [*args, "--home", str(tmp_path / "scratch"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["seeded"]["use_cases"] == 14 and result["seeded"]["observations"] == 1000
    assert result["seeded"]["pending"] == 2  # use cases 4 and 11 wait for approval
    pages = [p["page"] for p in result["pages"]]
    assert pages[1:] == ["portfolio", "use_case", "approvals", "audit"]
    assert all(p["cold_s"] > 0 for p in result["pages"])
    load = result["environment"]["host_load"]  # what the other processes did while it ran
    assert load["seconds"] > 0 and load["threads"] == 1 and isinstance(load["overloaded"], bool)
    # review M, M1: each page metered on its own, its verdict unknown (None) when it missed under overload
    for p in result["pages"][1:]:
        assert isinstance(p["overloaded"], bool) and p["wait_share"] == p["host_load"]["wait_share"]
        assert "others_busy_cores" in p and p["host_load"]["seconds"] > 0
        worst = max(p["cold_s"], p["warm_median_s"])
        assert p["within_target"] is within_target(worst, p["target_s"], p["overloaded"])
    assert "wait_share" in " ".join(r.output.split())  # the table's column
    # its progress lines in the .log next to the JSON, as every other bench's (it wrote none)
    assert f"progress log: {out.with_suffix('.log')}" in " ".join(r.output.split())
    lines = [line.split(" ", 1)[1] for line in out.with_suffix(".log").read_text().splitlines()]
    assert lines[0].startswith("dashboard benchmark: started (14 use cases, 1,000 observations"), lines
    assert "seeded 14/14 use cases" in lines and lines[-1] == "dashboard benchmark: done", lines
    assert [line.split(":")[0] for line in lines if ": cold " in line] == pages[1:], lines
    # a second run into the same scratch home is refused instead of mixing two portfolios
    r = CliRunner().invoke(app, [*args, "--home", str(tmp_path / "scratch"), "--out", str(out)])
    assert r.exit_code == 2 and "needs an empty scratch home" in r.output


def test_the_bench_seeds_only_states_a_real_home_reaches(sp_home: Settings) -> None:
    """Review s48: the bench's promoted use case kept a running pilot (its page: "next gate look"), a
    negative saving had its interval backwards ("-$377/month, at best -$432") and no evaluation had the
    per-request speed-up ("Per-request speed-up -"): the seeder's rows, not a page's fault."""
    seed_portfolio(7, 700)  # one use case in each of the bench's phases
    rows = {r["name"]: r for r in queries.read(queries.portfolio)}
    assert [rows[f"usecase-00{i}"]["pilot_status"] for i in (2, 4, 5, 6)] == [
        "running",
        "awaiting_approval",
        "promoted",
        "stopped",
    ]
    assert all(
        r["savings_month_low"] <= r["savings_month_high"]
        for r in rows.values()
        if r["savings_month_usd"] is not None
    )
    at = new_app()
    at.query_params["name"] = "usecase-005"  # promoted
    open_page(at, "use_case")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Waits for"] == "-" and metrics["Per-request speed-up"].endswith("x]"), metrics
