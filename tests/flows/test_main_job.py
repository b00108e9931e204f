"""The main job on a tiny model: sample specs added once, each use case taken through calibrate ->
evaluate -> pilot (shadow + first split step) -> gate without blocking on approval, and a summary."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from tests.fixtures.flows import skip_if_host_overloaded, tiny_spec


def test_main_job_runs_the_short_pilot_and_leaves_go_waiting(
    mlflow_home, prefect_harness, tiny_model_dir: Path, pilot_dataset: Path, tmp_path: Path
) -> None:
    from flows.main_job import MainJobSettings, render_table, run_main_job
    from rollout.usecases import list_usecases

    examples = tmp_path / "examples"
    examples.mkdir()
    spec = tiny_spec(tiny_model_dir, "tiny-chat", dataset_file=pilot_dataset)
    (examples / "tiny-chat.yaml").write_text(yaml.safe_dump(spec))
    console = Console(record=True, width=200)
    # On the tiny model the plan is dense or slower than dense (no saving): --pilot-all pilots it anyway.
    settings = MainJobSettings(
        examples_dir=examples,
        pilot_max_new_tokens=4,
        split_seconds=30,
        shadow_seconds=60,
        pilot_unprofitable=True,
    )
    result = run_main_job(settings, console=console)

    assert result["ok"], result["outcomes"]
    assert [a["name"] for a in result["added"]] == ["tiny-chat"]
    (row,) = result["rows"]
    outcome = result["outcomes"]["tiny-chat"]
    decisions = outcome["decisions"]
    kinds = [d["step_kind"] for d in decisions]
    # Shadow looks until the gate leaves EXTEND (at most 3, each sized by the gate's projection), then
    # the first split step; the support-chat shape on the tiny model settles the shadow step.
    shadow = [d for d in decisions if d["step_kind"] == "shadow"]
    assert 1 <= len(shadow) <= 3 and kinds[: len(shadow)] == ["shadow"] * len(shadow)
    assert all(d["outcome"] == "EXTEND" and d["projected_requests"] for d in shadow[:-1])
    assert [d["n_pairs"] for d in shadow] == sorted({d["n_pairs"] for d in shadow})  # more data each look
    skip_if_host_overloaded(shadow[-1])
    assert shadow[-1]["outcome"] == "GO", shadow[-1]["explanation"]
    assert kinds == ["shadow"] * len(shadow) + ["split"]
    if row["decision"].startswith("GO"):  # promotion waits for a person; the job did not block
        assert row["awaiting"] == "approval" and row["decision"] == "GO (step 1)"
    else:
        assert row["decision"] == "EXTEND (step 1)" and row["waits_for"].startswith("more samples")
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
    assert row["quality_low"] <= row["quality_delta"] <= row["quality_high"]
    assert row["quality_source"] == "gate"  # a gate looked: its interval, not the evaluation's
    console.print(render_table(result["rows"], result["outcomes"]))
    text = console.export_text()
    assert "tiny-chat" in text and "quality delta" in text and "$/month saved" in text
    # support-chat's decode section on the tiny model: no budget breaks even within its short cache,
    # so decode stays dense and the summary says why
    assert row["decode"].startswith("1.00x (") and "< break-even" in row["decode"] and "decode" in text

    settings.split_seconds = 0  # the re-run: one more split batch at most
    again = run_main_job(settings, console=console)
    assert again["added"] == []  # existing use cases are left alone
    assert again["outcomes"]["tiny-chat"]["calibration"]["reused"] is True
    assert [u["name"] for u in list_usecases()] == ["tiny-chat"]


def test_main_job_does_not_pilot_where_nothing_can_be_saved(
    mlflow_home, prefect_harness, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Without --pilot-all a use case whose evaluation projects no saving is calibrated and evaluated,
    then left dense with the reason in the summary: no pilot rows."""
    from sqlalchemy import func, select

    from flows.main_job import MainJobSettings, run_main_job
    from rollout.db.models import Observation, Pilot
    from rollout.db.session import session_scope
    from rollout.roi import evaluation_pilot_skip

    examples = tmp_path / "examples"
    examples.mkdir()
    # A tiny, cheap use case on a tiny model: the sparse path costs more than it saves at 256 tokens.
    spec = tiny_spec(tiny_model_dir, "tiny-chat")
    (examples / "tiny-chat.yaml").write_text(yaml.safe_dump(spec))
    result = run_main_job(
        MainJobSettings(examples_dir=examples, pilot_max_new_tokens=4), console=Console(width=200)
    )
    outcome = result["outcomes"]["tiny-chat"]
    ev = outcome["evaluation"]
    # On a tiny model with ~100-token prompts the plan comes out dense on some machines and sparse but
    # slower than dense on others; either way there is nothing to save, and the note says which.
    # the product's own reading of the evaluation (its decode status and any timing kept under overload
    # included: on a busy host the note says "saving not established", which the figures alone miss)
    reason = evaluation_pilot_skip(ev, met_budget=outcome["calibration"].get("met_budget"))
    assert reason is not None, ev
    reason = reason.said("--pilot-all")  # the main job's words name its own override (`run --pilot-all`)
    assert outcome["decisions"] == [] and outcome["note"] == reason
    assert ("no saving expected" in reason or "saving not established" in reason) == (
        ev["density"] < 0.999 and outcome["calibration"]["met_budget"]
    )
    row = result["rows"][0]
    assert row["decision"] == "-"
    # no gate look: the quality is the evaluation's, on the rows kept apart, with its bounds
    assert row["quality_source"] == "evaluation" and row["evaluation_rows"] == 2
    assert -1 <= row["quality_low"] <= row["quality_delta"] <= row["quality_high"] <= 1
    # what the approval (asked after the first split step) would take, from the gate's planner
    plan = result["plans"]["tiny-chat"]
    assert plan["approval_after"] == 2 and plan["distinct_requests"] > 0
    assert plan["requests_to_approval"] == sum(s["requests"] for s in plan["steps"][:2])
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Pilot)) == 0
        assert s.scalar(select(func.count()).select_from(Observation)) == 0


def test_stage_durations_round_once() -> None:
    """The stage lines' durations: seconds below 90, else minutes and seconds, rounded once (a stage of
    1,199.6 s read "19 min 60 s")."""
    from flows.main_job import _duration

    assert [_duration(s) for s in (0.4, 59.6, 89.4, 89.6, 1199.6, 1260.2)] == [
        "0 s",
        "60 s",
        "89 s",
        "1 min 30 s",
        "20 min 00 s",
        "21 min 00 s",
    ]


def test_summary_table_says_which_figures_were_timed_under_overload() -> None:
    """Review P finding 1: the main job's summary names, under its table, a use case whose evaluation
    kept timings under overload (the evaluate flow's `measured_under_overload`); a clean one is not named."""
    from flows.main_job import render_table

    row = {"use_case": "", "decision": "-", "waits_for": None, "quality_delta": None, "speedup": 1.1,
           "speedup_low": 0.74, "speedup_high": 1.64, "saved_usd_month": 396.0, "saved_usd_month_low": -900.0,
           "saved_usd_month_high": 2000.0, "payback_days": None, "decode": None}  # fmt: skip
    warn = "measured under overload: 7 of 7 timed pairs (prefill 3 of 3, decode 4 of 4)"
    outcomes = {
        "busy": {"ok": True, "note": None, "evaluation": {"measured_under_overload": warn}},
        "quiet": {"ok": True, "note": None, "evaluation": {"measured_under_overload": None}},
    }
    console = Console(record=True, width=200)
    console.print(render_table([{**row, "use_case": "busy"}, {**row, "use_case": "quiet"}], outcomes))
    text = console.export_text()
    assert f"busy: {warn}" in text and "quiet:" not in text


def test_summary_tables_speed_up_column_says_it_is_the_prefill_one() -> None:
    """Review-a P2: the column "speed-up [interval]" held the prefill speed-up, unlabelled, beside dollars
    that rest on the per-request one (prefill and decode together), as the dashboard's unlabelled
    "Speed-up" did before it was relabelled "Prefill speed-up"."""
    from flows.main_job import render_table

    row = {"use_case": "decode-only", "decision": "-", "waits_for": None, "quality_delta": None,
           "speedup": 0.97, "speedup_low": 0.93, "speedup_high": 1.01, "saved_usd_month": 5603.0,
           "saved_usd_month_low": 4000.0, "saved_usd_month_high": 7000.0, "payback_days": 16.0,
           "decode": "1.60x [1.50, 1.70]"}  # fmt: skip
    table = render_table([row], {})
    headers = [c.header for c in table.columns]
    assert headers[4] == "prefill speed-up [interval]" and "speed-up [interval]" not in headers
    assert list(table.columns[4].cells) == ["0.97 [0.93, 1.01]"]


def test_summary_table_says_where_no_interval_was_measured() -> None:
    """Fix-s S3: an evaluation timed with one pair measures no interval (the state DB stores no ends): the
    speed-up and $ cells read "2.00" and "1,200" alone, as if measured, where every other surface says
    `roi.NO_INTERVAL`; they say it too now."""
    from flows.main_job import render_table

    row = {"use_case": "one-pair", "decision": "-", "waits_for": None, "quality_delta": None,
           "speedup": 2.0, "speedup_low": None, "speedup_high": None, "saved_usd_month": 1200.0,
           "saved_usd_month_low": None, "saved_usd_month_high": None, "payback_days": None,
           "decode": None}  # fmt: skip
    table = render_table([row, {**row, "use_case": "none", "speedup": None, "saved_usd_month": None}], {})
    assert list(table.columns[4].cells) == ["2.00 (no interval: one timing pair)", "-"]
    assert list(table.columns[5].cells) == ["1,200 (no interval: one timing pair)", "-"]
